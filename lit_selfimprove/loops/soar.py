"""SOAR's sampling, scoring and inner-training loops (no Lightning), driven by
:class:`~lit_selfimprove.modules.teacher_meta_rl.TeacherMetaRL`: the teacher's rejection sampling of
(question, answer) pairs, the greedy accuracy of a student, the inner RLVR trainings of the grounded
reward (each reads its settings from the ``InnerConfig``) and the intrinsic (learnability) reward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lit_selfimprove.distributed import all_reduce_sum, any_rank, gather_objects, world
from lit_selfimprove.generation import Rollouts, generate
from lit_selfimprove.loops.rlvr import rlvr_step
from lit_selfimprove.loops.teacher_pairs import parse_pairs
from lit_selfimprove.rewards.base import score_completions
from lit_selfimprove.rl.teacher_rewards import learnability

if TYPE_CHECKING:  # the module's settings groups and keeper (lit_selfimprove.modules imports Lightning)
    from lit_selfimprove.modules.soar_outer import MedianStudents
    from lit_selfimprove.modules.soar_settings import InnerConfig, TeacherSamplingConfig

__all__ = [
    "Student",
    "greedy_accuracy",
    "grounded_rewards",
    "intrinsic_rewards",
    "sample_valid_pairs",
    "train_inner",
]


@dataclass
class Student:
    """The student as SOAR's loops use it: the model (trained in place), how its prompts are written
    and scored, and the greedy evaluation's batching."""

    # the working student (the baseline between inner trainings)
    model: torch.nn.Module
    # its tokenizer
    tokenizer: Any
    # ``reward(completions, answers) -> Tensor`` (its ``score`` method, if any, says what is correct)
    reward: Callable
    # question -> the student's prompt (template, chat turn)
    format_prompt: Callable[[str], str]
    # prompts per greedy generation call (``None``: all at once)
    eval_batch_size: int | None
    # greedy generation budget
    eval_max_new_tokens: int

    def greedy_accuracy(self, questions: list[str], answers: list[str]) -> float:
        """Greedy accuracy of the model, in its current weights, on the given problems."""
        return greedy_accuracy(
            self.model,
            self.tokenizer,
            self.reward,
            [self.format_prompt(q) for q in questions],
            answers,
            self.eval_batch_size,
            self.eval_max_new_tokens,
        )


def sample_valid_pairs(
    sample_round: Callable[[int], Rollouts],
    total: int,
    cfg: TeacherSamplingConfig,
    answer_ok: Callable[[list[str]], list[bool]] | None,
    pad_token_id: int,
    device: torch.device | str,
) -> tuple[list[tuple[str, str]], Rollouts, dict[str, float]]:
    """Rejection sampling of this rank's share of ``total`` valid pairs: ``(pairs, rollouts, stats)``,
    the teacher rollouts the pairs came from (row i wrote pair i). ``sample_round(k)`` samples k teacher
    completions, ``cfg.batch`` per round in all (``None``: ``total``); answers longer than
    ``cfg.max_answer_chars`` are invalid. Raises ``RuntimeError`` (naming the validity rate) when
    ``cfg.max_rounds`` rounds do not give enough valid pairs."""
    world_size, _ = world()
    if total % world_size:
        raise ValueError(
            f"num_datasets * dataset_size = {total} pairs must split evenly over {world_size} ranks"
        )
    needed = total // world_size  # this rank's share
    teacher_batch, max_rounds = cfg.batch, cfg.max_rounds
    per_round = -(-teacher_batch // world_size) if teacher_batch else needed
    pairs: list[tuple[str, str]] = []
    kept: list[Rollouts] = []
    sampled = valid = rounds = 0
    lengths, truncated = [], []
    # every rank samples until all ranks have their share (same number of teacher forwards)
    while any_rank(len(pairs) < needed, device):
        if rounds == max_rounds:
            rate = valid / max(1, sampled)
            raise RuntimeError(
                f"TeacherMetaRL: the teacher wrote {valid} valid (question, answer) pairs in {sampled} "
                f"samples ({rounds} rounds of {per_round}): validity rate {rate:.1%}, but "
                f"{needed} are needed (num_datasets * dataset_size / ranks). Raise teacher_sampling.max_rounds "
                "or teacher_sampling.batch, or check teacher_prompt, teacher_sampling.max_new_tokens and "
                "teacher_sampling.answer_check."
            )
        ro = sample_round(per_round)
        rounds += 1
        sampled += len(ro)
        lengths.append(ro.lengths.float())
        truncated.append((~ro.finished).float())
        parsed = parse_pairs(ro.texts, answer_ok, cfg.max_answer_chars)
        good = [i for i, p in enumerate(parsed) if p is not None]
        valid += len(good)
        take = good[: needed - len(pairs)]
        if take:
            kept.append(ro.select(take))
            pairs.extend(parsed[i] for i in take)
    stats = {
        "validity": valid / sampled,
        "sampling_rounds": float(rounds),
        "completion_len": float(torch.cat(lengths).mean()),
        "truncated_frac": float(torch.cat(truncated).mean()),
    }
    return pairs, Rollouts.cat(kept, pad_token_id), stats


def greedy_accuracy(
    model: torch.nn.Module,
    tokenizer,
    reward: Callable,
    prompts: list[str],
    answers: list[str],
    batch_size: int | None,
    max_new_tokens: int,
) -> float:
    """Greedy accuracy of ``model`` on the prompts, ``batch_size`` prompts per generation (``None``: all)."""
    step = batch_size or len(prompts)
    correct = []
    for i in range(0, len(prompts), step):
        ro = generate(
            model,
            tokenizer,
            prompts[i : i + step],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            sync_ranks=False,
        )
        correct.append(score_completions(reward, ro.texts, answers[i : i + step])[1])
    return float(torch.cat(correct).float().mean())


def train_inner(
    student: Student,
    data: list[tuple[str, str]],
    cfg: InnerConfig,
    ref_model: torch.nn.Module | None,
    generator: torch.Generator,
) -> dict[str, float]:
    """One inner training: ``cfg.steps`` RLVR steps of ``student.model`` in place on the (question,
    answer) pairs ``data``, with a fresh optimizer (``cfg.new_optimizer``: ``cfg.optimizer``, ``cfg.lr``,
    ``cfg.weight_decay``); batches of ``cfg.batch`` questions walk through a shuffle of the dataset,
    reshuffled when it is used up. Returns the mean of ``rlvr_step``'s stats."""
    prompts = [student.format_prompt(q) for q, _ in data]
    answers = [a for _, a in data]
    optimizer = cfg.new_optimizer(student.model.parameters())
    params = [p for p in student.model.parameters() if p.requires_grad]
    gen = generator
    order: list[int] = []
    sums: dict[str, float] = {}
    for _ in range(cfg.steps):
        idx = []
        while len(idx) < cfg.batch:
            if not order:
                order = torch.randperm(len(prompts), generator=gen, device=gen.device).tolist()
            idx.append(order.pop())
        stats, _, _ = rlvr_step(
            student.model,
            student.tokenizer,
            student.reward,
            [prompts[i] for i in idx],
            [answers[i] for i in idx],
            cfg,
            optimizer=optimizer,
            ref_model=ref_model,
            clip=lambda norm: torch.nn.utils.clip_grad_norm_(params, norm),
            generator=gen,
        )
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
    return {key: value / cfg.steps for key, value in sums.items()}


def grounded_rewards(
    student: Student,
    cfg: InnerConfig,
    datasets: list[list[tuple[str, str]]],
    q_r: tuple[list[str], list[str]],
    base_acc: float,
    *,
    snapshot: dict,
    ref_model: torch.nn.Module | None,
    keeper: MedianStudents,
    keep_students: bool,
    job_generator: Callable[[int], torch.Generator],
    device: torch.device,
) -> dict:
    """SOAR's reward: R_k = mean over ``keeper.repeats`` inner trainings on X_k of (greedy accuracy on
    Q_R = ``q_r`` (questions, answers) - ``base_acc``).

    Training j = k * r + i (dataset k, repeat i) runs on rank j % world: ``student.model`` is reset to
    ``snapshot`` (an :func:`~lit_selfimprove.modeling.adapter_state`: LoRA students restore their
    adapters only), trained in place by :func:`train_inner` (``cfg``, ``ref_model``, the RNG
    ``job_generator(j)``, the same whichever rank runs it) and scored. The per-repeat deltas are
    all-reduced; ``keeper`` (a ``MedianStudents``) settles the median repeat of each dataset and, with
    ``keep_students``, is offered every trained student. ``student.model`` ends on ``snapshot``."""
    from lit_selfimprove.modeling import load_adapter_state

    r, model = keeper.repeats, student.model
    world_size, rank = world()
    per_repeat: list[list[float]] = []
    inner: list[dict] = []
    median_jobs, owners = [], []
    try:
        for k, data in enumerate(datasets):
            deltas = torch.zeros(r)
            for j in range(k * r, (k + 1) * r):
                if j % world_size != rank:
                    continue
                load_adapter_state(model, snapshot)
                stats = train_inner(student, data, cfg, ref_model, job_generator(j))
                acc = student.greedy_accuracy(*q_r)
                stats["accuracy_after"] = acc
                inner.append(stats)
                deltas[j - k * r] = acc - base_acc
                if keep_students:
                    keeper.offer(j, model, float(deltas[j - k * r]))
            per_repeat.append(all_reduce_sum(deltas, device).tolist())
            j = keeper.settle(k, per_repeat[k])  # the median-reward repeat of dataset k
            median_jobs.append(j)
            owners.append(j % world_size)
    finally:
        load_adapter_state(model, snapshot)  # the baseline again, whatever happened
    medians = [keeper.states.get(j) for j in median_jobs]  # what the keeper still holds
    inner = [s for part in gather_objects(inner) for s in part]
    inner_stats = {key: sum(s[key] for s in inner) / len(inner) for key in inner[0]}
    return {
        "rewards": [sum(d) / len(d) for d in per_repeat],
        "per_repeat": per_repeat,
        "median_students": medians,
        "median_owner": owners,
        "inner_stats": inner_stats,
    }


def intrinsic_rewards(
    student: Student,
    cfg: InnerConfig,
    datasets: list[list[tuple[str, str]]],
    samples: int,
    job_generator: Callable[[int], torch.Generator],
) -> dict:
    """Intrinsic-T: per question of X_k, success rate s of ``samples`` student samples (``cfg.batch``
    questions per generation, ``cfg.max_new_tokens``, ``cfg.temperature``) against the teacher's answer;
    r = 0 if s == 0 else 1 - s; R_k = mean over X_k. Dataset k runs on rank k % world (with
    ``job_generator(k)``); the rates are all-gathered."""
    m = samples
    world_size, rank = world()
    local: dict[int, list[float]] = {}
    for k in range(rank, len(datasets), world_size):  # dataset k on rank k % world
        data, gen = datasets[k], job_generator(k)
        success = []
        for i in range(0, len(data), cfg.batch):
            chunk = data[i : i + cfg.batch]
            ro = generate(
                student.model,
                student.tokenizer,
                [student.format_prompt(q) for q, _ in chunk],
                num_samples=m,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                generator=gen,
                sync_ranks=False,
            )
            _, correct = score_completions(student.reward, ro.texts, [a for _, a in chunk for _ in range(m)])
            success.append(correct.float().view(-1, m).mean(-1))
        local[k] = torch.cat(success).tolist()
    gathered = {k: v for part in gather_objects(local) for k, v in part.items()}
    rates = [gathered[k] for k in range(len(datasets))]
    rewards = [learnability(torch.tensor(s)) for s in rates]
    flat = torch.tensor([x for r in rates for x in r])
    return {
        "rewards": rewards,
        "per_repeat": [[r] for r in rewards],
        "median_students": [None] * len(datasets),
        "median_owner": [0] * len(datasets),
        "success_rates": rates,
        "inner_stats": {
            "success_rate": float(flat.mean()),
            "unsolved_frac": float((flat == 0).float().mean()),
        },
    }
