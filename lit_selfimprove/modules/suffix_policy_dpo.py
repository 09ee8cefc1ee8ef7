"""SuffixPolicyDPO: Self-Improving Pretraining's online DPO / RF-NLL on prefix -> suffix.

Each training step (``global_step`` counts optimizer steps: exactly one per batch of prefixes,
also when every prefix of the step is skipped and nothing is updated):

1. sample ``num_rollouts`` continuations per prefix from the policy;
2. candidates = the rollouts + the original suffix + a rewritten suffix (each optional);
3. the injected judge scores every candidate (the original suffix is the reference);
4. per prefix: chosen = best, rejected = worst total score (``nan`` left out; ties broken by a
   seeded random choice). DPO skips prefixes without two different scores, RF-NLL (which needs
   no rejected candidate) only those without any score;
5. loss: DPO on (chosen, rejected) against a frozen reference, or RF-NLL on chosen;
6. manual backward, gradient clipping, optimizer and LR-scheduler step;
7. a judge whose verdicts are mostly unparseable, or that leaves most prefixes skipped, is
   reported on the console and, when it lasts, stops the run (``fail_after_steps``). The share
   of parseable verdicts is logged every step: ``judge/parse_rate`` (summed over ranks; also
   ``parse_rate`` on the progress bar) and ``judge/<component>_parse_rate`` (this rank's).

Batches come from a prefix-suffix data module: ``prefix_ids`` / ``prefix_mask`` ``[B, P]``
LEFT-padded, ``suffix_ids`` / ``suffix_mask`` ``[B, N]`` RIGHT-padded, and the lists
``prefix_text``, ``suffix_text``, ``doc_id``. Validation samples one continuation per held-out
prefix and judges it against the original suffix (``val/quality_win_vs_suffix``, ...).

Candidate tokens always continue the prefix's tokens: rollouts are sampled after them, the
suffix is the document's next tokens, and a rewrite is tokenized in the context of its prefix
(see :func:`~lit_selfimprove.loops.sip.tokenize_after`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_selfimprove.distributed import all_reduce_max, all_reduce_sum, seeded_generator, world_size
from lit_selfimprove.generation import GenerationConfig, Rollouts, attach_backend, generate
from lit_selfimprove.judges.base import CandidateJudge, CandidateScores, Rewriter
from lit_selfimprove.loops.sip import (
    BEST_CLASSES,
    Candidates,
    best_classes,
    continuation_tokens,
    judge_about,
    judge_problems,
    loss_stats,
    pad_to,
    sample_rows,
    step_metrics,
)
from lit_selfimprove.modeling import (
    check_attn_implementation,
    check_lora,
    check_quantization,
    dropout_disabled,
    load_tokenizer,
    warn_if_half_trainable,
)
from lit_selfimprove.modules._shared import (
    adamw_with_warmup,
    as_group,
    check_from_scratch,
    cosine_schedule,
    data_parallel_rank,
    estimated_total_steps,
    generation_config,
    load_policy,
    on_device,
    restore_scratch_seed,
    scratch_seed,
    write_samples,
)
from lit_selfimprove.modules.sip_settings import (
    GROUPS,
    CandidateConfig,
    JudgeHealthConfig,
    ObjectiveConfig,
    OptimConfig,
    ValidationConfig,
)
from lit_selfimprove.rl.logprobs import sequence_logprobs
from lit_selfimprove.rl.losses import dpo_loss, nll_loss
from lit_selfimprove.rl.selection import Selection, select_pairs

SOURCES = ("rollout", "suffix", "rewrite")

BATCH_KEYS = ("prefix_ids", "prefix_mask", "suffix_ids", "suffix_mask", "prefix_text", "suffix_text")


class SuffixPolicyDPO(LightningModule):
    """Online DPO / RF-NLL of a causal LM on prefix -> suffix, supervised by a judge.

    The method's settings are five groups, one argument each (``candidates`` ... ``judge_health``;
    every field documented in :mod:`~lit_selfimprove.modules.sip_settings`): a mapping in YAML, e.g.
    ``candidates: {num_rollouts: 8}``, the defaults when left out, ``module.candidates`` etc. in code.

    Args:
        model: hub id, local folder or ``builtin:tiny-student``.
        judge: a :class:`~lit_selfimprove.judges.CandidateJudge` scoring candidate
            continuations (``class_path:`` in YAML); kept out of the checkpoint.
        tokenizer: defaults to ``model``.
        rewriter: a :class:`~lit_selfimprove.judges.Rewriter`; needed by ``candidates.include_rewrite``.
        candidates: K rollouts, suffix and rewrite per prefix, rollout sampling (:class:`CandidateConfig`).
        objective: ``dpo`` or ``rf_nll``, and DPO's beta (:class:`ObjectiveConfig`).
        optim: AdamW, its schedule, gradient clipping, micro-batches (:class:`OptimConfig`).
        validation: the judged validation continuation (:class:`ValidationConfig`).
        judge_health: when unusable verdicts warn and stop the run (:class:`JudgeHealthConfig`).
        generation: the sampling backend (``GenerationConfig``; YAML ``generation: {backend: vllm}``):
            the built-in sampler (default) or a colocated vLLM engine refreshed from the trained
            weights before each generation that follows a change.
        dtype: compute dtype (bf16 via FSDP2 MixedPrecisionPolicy or Trainer precision
            bf16-mixed) and storage dtype of the frozen reference; the trained policy always
            keeps float32 master weights.
        attn_implementation: e.g. ``sdpa`` or ``flash_attention_2``.
        quantization: ``BitsAndBytesConfig`` kwargs (``gpu`` extra).
        ref_quantization: load the frozen DPO reference in ``4bit`` or ``8bit`` (or
            ``BitsAndBytesConfig`` kwargs) from ``model`` again instead of copying the policy
            (``None``: an unquantized copy in ``dtype``); bitsandbytes, CPU or GPU.
        lora: ``peft.LoraConfig`` kwargs: only the adapters train, and the DPO reference is the policy
            with its adapters disabled (no second copy; not with ``ref_quantization``).
        from_scratch: the paper's from-scratch setting: the policy gets random weights in the
            architecture of ``model`` (only its config is read; drawn from rank 0's global seed at the
            first setup, a seed the checkpoints keep) and the DPO reference is that random initial
            policy (rebuilt from the kept seed on resume). Not with ``quantization``, ``lora``
            or ``ref_quantization``.
        seed: seed of sampling and tie-breaking (default: the global seed, ``seed_everything``).
            Generators are re-seeded from (seed, data-parallel rank, step) every step, so a
            resumed run draws what an uninterrupted one would, and ranks draw differently.
        log_samples_every: append prefixes, candidates, scores and the pair to
            ``samples.jsonl`` in the log dir at the first step and every N-th after (0: never; see
            :func:`~lit_selfimprove.modules._shared.write_samples`).
        num_log_samples: prefixes written each time.
    """

    def __init__(
        self,
        model: str,
        judge: CandidateJudge,
        tokenizer: str | None = None,
        rewriter: Rewriter | None = None,
        candidates: CandidateConfig | None = None,
        objective: ObjectiveConfig | None = None,
        optim: OptimConfig | None = None,
        validation: ValidationConfig | None = None,
        judge_health: JudgeHealthConfig | None = None,
        generation: GenerationConfig | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        quantization: dict | None = None,
        ref_quantization: str | dict | None = None,
        lora: dict | None = None,
        from_scratch: bool = False,
        seed: int | None = None,
        log_samples_every: int = 50,
        num_log_samples: int = 2,
    ):
        super().__init__()
        check_attn_implementation(attn_implementation)  # at start-up, not when the model loads
        check_quantization(ref_quantization)
        check_from_scratch(from_scratch, quantization, lora, ref_quantization)
        check_lora(lora, ref_quantization, model=model)
        # the groups (a dict: from YAML or hparams.yaml), validated as they are built
        self.candidates = as_group(CandidateConfig, candidates, "candidates")
        self.objective = as_group(ObjectiveConfig, objective, "objective")
        self.optim = as_group(OptimConfig, optim, "optim")
        self.validation = as_group(ValidationConfig, validation, "validation")
        self.judge_health = as_group(JudgeHealthConfig, judge_health, "judge_health")
        if self.candidates.include_rewrite and rewriter is None:
            raise ValueError("candidates.include_rewrite=True needs a rewriter")
        self.generation = generation_config(generation)
        self.save_hyperparameters(ignore=["judge", "rewriter"])
        for name in (*GROUPS, "generation"):  # plain data in checkpoints (weights_only loads)
            self.hparams[name] = dataclasses.asdict(getattr(self, name))
        self.automatic_optimization = False
        # judge / rewriter may be nn.Modules (local HF models): a plain dict keeps them out of
        # the module tree, so they are neither in the state_dict nor moved by Lightning
        self._injected = {"judge": judge, "rewriter": rewriter}
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.policy: torch.nn.Module | None = None
        self._frozen: dict[str, torch.nn.Module] = {}  # DPO reference: kept out of state_dict
        self.last_selection: dict[str, float] | None = None  # read by SelectionStats
        self._eval_sums: dict[str, list[float]] = {}
        self._bad_judge_steps = 0  # consecutive steps with unusable verdicts

    @property
    def judge(self) -> CandidateJudge:
        return self._injected["judge"]

    @property
    def rewriter(self) -> Rewriter | None:
        return self._injected["rewriter"]

    @property
    def sources(self) -> list[str]:
        """The source of each candidate column: K rollouts, then suffix, then rewrite."""
        return self.candidates.sources

    # ----------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        load_policy(self, reference=self.objective.loss == "dpo")
        attach_backend(self.policy, self.generation)

    def on_fit_start(self) -> None:
        warn_if_half_trainable("SuffixPolicyDPO", self.policy)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.get("from_scratch"):  # the random initial policy (the DPO reference): its seed
            checkpoint["scratch_seed"] = scratch_seed(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_scratch_seed(self, checkpoint)  # from scratch: the reference of the checkpoint's run

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The frozen initial policy (DPO only; ``None`` for RF-NLL)."""
        return on_device(self._frozen.get("ref"), self.device)

    def configure_optimizers(self):
        o = self.optim
        schedule = cosine_schedule(o.warmup_steps, estimated_total_steps(self), o.min_lr_ratio)
        return adamw_with_warmup(
            self.policy.parameters(), o.lr, o.weight_decay, schedule=schedule, optimizer=o.optimizer
        )

    def _generator(self, stream: str, step: int, device: torch.device | str) -> torch.Generator:
        """A generator for ``stream`` at ``step`` of this data-parallel rank.

        ``seed_everything`` gives all ranks one global RNG state; drawing from it would make
        ranks sample alike. Tensor-parallel peers (same data) share the data-parallel rank.
        """
        rank = data_parallel_rank(self)
        return seeded_generator(device, rank, stream, step, seed=self.hparams.seed, hashed=True)

    # -------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> None:
        c = self.candidates
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"a prefix-suffix batch needs {missing}, got {sorted(batch)}")
        step = self.global_step
        opt, sched = self.optimizers(), self.lr_schedulers()
        prefixes, suffixes = list(batch["prefix_text"]), list(batch["suffix_text"])
        budget = c.max_new_tokens or batch["suffix_ids"].shape[1]

        # 1. K rollouts per prefix (all ranks run the same number of forwards: generate syncs)
        rollouts = None
        if c.num_rollouts > 0:
            rollouts = generate(
                self.policy,
                self.tokenizer,
                prompt_ids=batch["prefix_ids"],
                prompt_mask=batch["prefix_mask"],
                num_samples=c.num_rollouts,
                max_new_tokens=budget,
                temperature=c.temperature,
                top_p=c.top_p,
                generator=self._generator("train", step, self.device),
            )
        # 2. candidates: rollouts + suffix + rewrite
        cands = self.build_candidates(batch, rollouts)
        # 3. judge every candidate against the original suffix
        scores = self.judge.score_candidates(prefixes, cands.texts, references=suffixes)
        total = scores.total.detach().float().cpu().clone()
        if tuple(total.shape) != (len(prefixes), len(cands.sources)):
            raise ValueError(
                f"judge returned total {tuple(total.shape)}, expected {(len(prefixes), len(cands.sources))}"
            )
        total[cands.mask.sum(-1).cpu() == 0] = math.nan  # an empty continuation teaches nothing
        # 4. chosen = best, rejected = worst (RF-NLL: a best one is enough)
        sel = select_pairs(
            total, self._generator("select", step, "cpu"), need_rejected=self.objective.loss == "dpo"
        )
        counts = self._selection_counts(sel, cands.sources, step, total)
        # 5.-6. loss, backward, clip, step (no update, but counters step, when no pair anywhere)
        lr = sched.get_last_lr()[0]  # the rate this step's update uses
        loss_stats = self._update(batch, cands, sel, opt, sched, int(counts["pairs"]))

        self._log_step(scores, total, cands, sel, counts, loss_stats, rollouts, len(prefixes))
        self.log("train/lr", lr, batch_size=len(prefixes))
        hp = self.hparams  # the first num_log_samples prefixes: candidates, scores, the pair
        rows = functools.partial(sample_rows, batch, cands, total, scores, sel, step, hp.num_log_samples)
        write_samples(self, hp.log_samples_every, step, "samples.jsonl", rows)
        # 7. a judge that gives nothing usable must not go unnoticed
        self._check_judge(scores, counts, step)

    def build_candidates(self, batch: dict, rollouts: Rollouts | None) -> Candidates:
        """Tokens and texts of every candidate; all continue the prefix, at most max(L, N) tokens."""
        c = self.candidates
        pad = self.tokenizer.pad_token_id
        rows = len(batch["prefix_text"])
        parts_ids, parts_mask = [], []
        texts: list[list[str]] = [[] for _ in range(rows)]
        if rollouts is not None:
            k = c.num_rollouts
            parts_ids.append(rollouts.completion_ids.view(rows, k, -1))
            parts_mask.append(rollouts.completion_mask.view(rows, k, -1))
            for b in range(rows):
                texts[b] += rollouts.texts[b * k : (b + 1) * k]
        suffix_ids, suffix_mask = batch["suffix_ids"], batch["suffix_mask"]
        if c.include_suffix:
            parts_ids.append(suffix_ids[:, None])
            parts_mask.append(suffix_mask[:, None])
            for b in range(rows):
                texts[b].append(batch["suffix_text"][b])
        unaligned = 0
        if c.include_rewrite:
            ids, mask, rewritten, unaligned = self._rewrite(batch, suffix_ids.shape[1])
            parts_ids.append(ids[:, None].to(suffix_ids.device))
            parts_mask.append(mask[:, None].to(suffix_ids.device))
            for b in range(rows):
                texts[b].append(rewritten[b])
        length = max(p.shape[-1] for p in parts_ids)
        ids = torch.cat([pad_to(p, length, pad) for p in parts_ids], dim=1)
        mask = torch.cat([pad_to(p.long(), length, 0) for p in parts_mask], dim=1)
        return Candidates(ids, mask, texts, self.sources, unaligned)

    def _rewrite(self, batch: dict, max_tokens: int) -> tuple[Tensor, Tensor, list[str], int]:
        """The rewriter's suffixes as tokens after their prefix's, cut to ``max_tokens`` (the judge
        reads the cut text), and the number left out because their text changes the prefix's last
        tokens (:func:`~lit_selfimprove.loops.sip.continuation_tokens`)."""
        prefixes, suffixes = list(batch["prefix_text"]), list(batch["suffix_text"])
        rewritten = [str(t) for t in self.rewriter.rewrite(prefixes, suffixes)]
        if len(rewritten) != len(prefixes):
            raise ValueError(f"rewriter returned {len(rewritten)} texts for {len(prefixes)} prefixes")
        return continuation_tokens(self.tokenizer, prefixes, rewritten, max_tokens)

    def _selection_counts(
        self, sel: Selection, sources: list[str], step: int, total: Tensor | None = None
    ) -> dict[str, float]:
        """Chosen / rejected source counts summed over ranks (``last_selection``, ``select/*``);
        ``pairs`` counts the trained prefixes (RF-NLL: those with a chosen candidate). With the
        scores ``total``, also who holds the best score of each trained prefix before the tie-break
        (:func:`~lit_selfimprove.loops.sip.best_classes`: ``best_rollout_only``, ``best_tied``,
        ``best_corpus_only``)."""
        names = ["prefixes", "pairs", "skipped", "ties_best", "ties_worst"]
        values = [len(sel.valid), int(sel.valid.sum()), int((~sel.valid).sum())]
        values += [int(sel.tie_best.sum()), int(sel.tie_worst.sum())]
        if total is not None:
            best = best_classes(total, sources, rows=sel.valid)
            names += list(BEST_CLASSES)
            values += [best[c] for c in BEST_CLASSES]
        src = [sources[i] if i >= 0 else None for i in sel.chosen.tolist()]
        rej = [sources[i] if i >= 0 else None for i in sel.rejected.tolist()]
        for s in SOURCES:
            names += [f"chosen_{s}", f"rejected_{s}"]
            values += [src.count(s), rej.count(s)]
        summed = all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()
        counts = dict(zip(names, summed))
        self.last_selection = {"step": float(step), **counts}
        return counts

    def _check_judge(self, scores: CandidateScores, counts: dict[str, float], step: int) -> None:
        """Warn when this step's verdicts are mostly unparseable or its prefixes mostly skipped, and
        stop after ``fail_after_steps`` such steps in a row (counts summed over ranks: all agree)."""
        health = self.judge_health
        judged = [float(scores.stats.get("unparseable", 0)), float(scores.stats.get("calls", 0))]
        bad, calls = all_reduce_sum(torch.tensor(judged, dtype=torch.float64, device=self.device)).tolist()
        if calls > 0:  # the share of parseable verdicts, every step (and on the progress bar)
            rate, rows = 1.0 - bad / calls, len(scores.total)
            self.log("judge/parse_rate", rate, batch_size=rows)
            self.log("parse_rate", rate, prog_bar=True, logger=False, batch_size=rows)
        problems = judge_problems(
            bad,
            calls,
            counts["skipped"],
            counts["prefixes"],
            health.max_unparseable_frac,
            health.max_skipped_frac,
        )
        self._bad_judge_steps = self._bad_judge_steps + 1 if problems else 0
        if not problems:
            return
        about = judge_about(self.judge)
        what = " and ".join(problems)
        limits = (
            f"judge_health: max_unparseable_frac={health.max_unparseable_frac}, "
            f"max_skipped_frac={health.max_skipped_frac}, fail_after_steps={health.fail_after_steps}"
        )
        n = health.fail_after_steps
        if n and self._bad_judge_steps >= n:
            raise RuntimeError(
                f"SuffixPolicyDPO: stopping at step {step}, {n} consecutive steps in which {what}. {about}. "
                f"Check the judge's endpoint, model and prompt template ({limits})."
            )
        if self._bad_judge_steps == 1:
            stop = f"stops after {n} such steps in a row" if n else "goes on"
            rank_zero_warn(f"SuffixPolicyDPO step {step}: {what}. {about}. The run {stop} ({limits}).")

    # ------------------------------------------------------------------------------ loss
    def _pair_sequences(self, batch: dict, cands: Candidates, rows: list[int], cols: Tensor):
        """``(input_ids, attention_mask, completion_mask)`` of prefix + candidate ``cols[i]`` of row ``rows[i]``."""
        idx = torch.tensor(rows, device=cands.ids.device)
        cols = cols.to(cands.ids.device)
        cand_ids, cand_mask = cands.ids[idx, cols], cands.mask[idx, cols]
        keep = max(1, int(cand_mask.sum(-1).max()))
        cand_ids, cand_mask = cand_ids[:, :keep], cand_mask[:, :keep]
        prefix_ids, prefix_mask = batch["prefix_ids"][idx], batch["prefix_mask"][idx].long()
        ids = torch.cat([prefix_ids, cand_ids], dim=1)
        attn = torch.cat([prefix_mask, cand_mask], dim=1)
        cmask = torch.cat([torch.zeros_like(prefix_mask), cand_mask], dim=1)
        return ids, attn, cmask

    def _update(self, batch, cands: Candidates, sel: Selection, opt, sched, global_pairs: int) -> dict:
        """Steps 5-6. Every rank runs the same number of forward/backward passes (a rank with
        fewer pairs runs zero-weight ones: FSDP2 collectives and DDP all-reduces must match),
        and the loss is the mean over the pairs of all ranks."""
        rows = sel.valid.nonzero().flatten().tolist()
        if global_pairs == 0:  # nothing to learn anywhere: grads stay None, AdamW skips them
            opt.step()
            sched.step()
            return {}
        size = self.optim.micro_batch_size or max(1, len(rows))
        local_chunks = torch.tensor([math.ceil(len(rows) / size)], device=self.device)
        chunks = int(all_reduce_max(local_chunks).item())
        world = world_size()
        parts: dict[str, list[Tensor]] = {}
        # no dropout in the loss forwards (as TRL's DPO): the policy's log-probs are then those its
        # rollouts were scored with and comparable to the reference's; the backward stays inside
        # (gradient checkpointing re-runs the forward there)
        with dropout_disabled(self.policy):
            for c in range(chunks):
                part = rows[c * size : (c + 1) * size]
                weight = len(part) * world / global_pairs
                if not part:  # a dummy pair with weight 0 keeps this rank in step with the others
                    part, weight = [0], 0.0
                loss, stats = self._pair_loss(batch, cands, sel, part)
                self.manual_backward(loss * weight)
                if weight > 0:
                    for k, v in stats.items():
                        parts.setdefault(k, []).append(v)
        if self.optim.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad()
        sched.step()
        return self._loss_stats({k: torch.cat(v) for k, v in parts.items()})

    def _pair_loss(self, batch, cands: Candidates, sel: Selection, rows: list[int]) -> tuple[Tensor, dict]:
        """Loss of one chunk of pairs (mean over its pairs) and detached per-pair values."""
        index = torch.tensor(rows)
        chosen = sel.chosen[index].clamp(min=0)
        if self.objective.loss == "rf_nll":
            ids, attn, cmask = self._pair_sequences(batch, cands, rows, chosen)
            logps = sequence_logprobs(self.policy, ids, attn, cmask)
            mask = cmask[:, 1:]
            loss = nll_loss(logps, mask)
            stats = {"nll_sum": -logps.detach().sum(-1), "tokens": mask.sum(-1).float()}
            return loss, stats
        rejected = sel.rejected[index].clamp(min=0)
        n = len(rows)
        ids, attn, cmask = self._pair_sequences(batch, cands, rows + rows, torch.cat([chosen, rejected]))
        logps = sequence_logprobs(self.policy, ids, attn, cmask).float()
        with torch.no_grad():  # the reference may be stored in another dtype: compare in float32
            ref_logps = sequence_logprobs(self.ref_model, ids, attn, cmask).float().sum(-1)
        seq = logps.sum(-1)
        loss, _ = dpo_loss(seq[:n], seq[n:], ref_logps[:n], ref_logps[n:], beta=self.objective.beta)
        stats = {
            "policy_chosen": seq[:n].detach(),
            "policy_rejected": seq[n:].detach(),
            "ref_chosen": ref_logps[:n],
            "ref_rejected": ref_logps[n:],
            "nll_sum": -logps[:n].detach().sum(-1),
            "tokens": cmask[:n, 1:].sum(-1).float(),
        }
        return loss, stats

    def _loss_stats(self, v: dict[str, Tensor]) -> dict[str, float]:
        """This rank's per-pair values -> logged numbers."""
        return loss_stats(v, self.objective.loss, self.objective.beta)

    # ------------------------------------------------------------------------------ logs
    def _log_step(
        self, scores: CandidateScores, total, cands, sel, counts, loss_stats, rollouts, rows
    ) -> None:
        metrics = step_metrics(scores, total, cands, sel, counts, loss_stats, rollouts)
        self.log_dict(metrics, batch_size=rows)
        if "select/chosen_rollout" in metrics:
            self.log(
                "chosen_rollout",
                metrics["select/chosen_rollout"],
                prog_bar=True,
                logger=False,
                batch_size=rows,
            )

    # ------------------------------------------------------------------------ validation
    def _evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        """One sampled continuation per prefix, judged as candidate 0 of [continuation, suffix]."""
        v = self.validation
        prefixes, suffixes = list(batch["prefix_text"]), list(batch["suffix_text"])
        budget = v.max_new_tokens or self.candidates.max_new_tokens or batch["suffix_ids"].shape[1]
        rollouts = generate(
            self.policy,
            self.tokenizer,
            prompt_ids=batch["prefix_ids"],
            prompt_mask=batch["prefix_mask"],
            max_new_tokens=budget,
            temperature=v.temperature,
            generator=self._generator(stage, batch_idx, self.device),  # same draws every evaluation
        )
        scores = self.judge.score_candidates(
            prefixes, [[t, s] for t, s in zip(rollouts.texts, suffixes)], references=suffixes
        )
        values = {"score": scores.total, "rollout_len": rollouts.lengths[:, None].float()}
        for name, table in scores.components.items():
            values["quality_win_vs_suffix" if name == "quality" else name] = table
        for name, table in values.items():
            col = table.detach().float().cpu()[:, 0]
            col = col[~torch.isnan(col)]
            acc = self._eval_sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(col.sum())
            acc[1] += col.numel()

    def _log_eval(self, stage: str) -> None:
        """Means over all ranks' prefixes (sums and counts reduced here: ranks may leave out
        different unscored continuations, which ``self.log(sync_dist=True)`` would weigh wrongly)."""
        names = sorted(self._eval_sums)
        if not names:
            return
        sums = torch.tensor([self._eval_sums[n] for n in names], dtype=torch.float64, device=self.device)
        sums = all_reduce_sum(sums).cpu()
        for name, (total, count) in zip(names, sums.tolist()):
            if count > 0:
                self.log(f"{stage}/{name}", total / count, prog_bar=name == "score")
        self._eval_sums = {}

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_start(self) -> None:
        self._eval_sums = {}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
