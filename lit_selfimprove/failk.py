"""fail@k builder: keep the problems a model never solves in k samples (SOAR's hard sets).

    python -m lit_selfimprove.failk --model builtin:tiny-student --source problems.jsonl \\
        --out hard.jsonl --k 128 --prompt-template "Q: {question}\\nA: "
    lit-selfimprove failk --model meta-llama/Llama-3.2-3B-Instruct --source math_test.jsonl \\
        --out math_fail128.jsonl --max-new-tokens 1024 --use-chat-template

Samples ``k`` completions per problem (temperature 1.0, the student prompt), stopping early
for a problem as soon as one sample is correct (it cannot be 0/k any more). Writes
``OUT`` (the 0/k problems as id/question/answer jsonl), ``OUT.train.jsonl`` /
``OUT.test.jsonl`` (a deterministic split, 50/50 by default) and ``OUT.summary.json``.
Progress is appended to ``OUT.progress.jsonl`` after every batch, so an interrupted run
resumes where it stopped; each chunk of problems is sampled with its own seed, so a resumed
run gives the same result as an uninterrupted one. The progress file's first line records what
the counts were sampled with (k, model, tokenizer, sampling settings, prompt, source and a digest
of its problems): a run with other settings on the same ``--out`` is refused rather than reusing
counts that mean something else (a k=16 run's progress is not a fail@128 set).

Problems whose prompt plus ``--max-new-tokens`` does not fit the model's context are refused
(file:line and lengths) before the model loads, or dropped and counted with ``--too-long skip``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lit_selfimprove.cli_args import non_negative_float, non_negative_int, open_fraction, positive_int
from lit_selfimprove.datamodules.problem_sources import load_located_problems, split_problems
from lit_selfimprove.datamodules.prompt_length import (
    TOO_LONG_MODES,
    check_prompt_lengths,
    max_positions,
    prompt_token_counter,
)
from lit_selfimprove.prompts import as_user_turn


def records_digest(records: list[dict]) -> str:
    """A digest of the problems in order (ids, questions, answers): the chunks and their seeds
    depend on it."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r["id"], r["question"], r["answer"]]).encode() + b"\n")
    return h.hexdigest()[:16]


def _read_progress(path: Path) -> tuple[dict | None, dict[str, dict]]:
    """``(settings, {id: row})`` of a progress file (``(None, {})`` when there is none)."""
    settings, done = None, {}
    if path.exists():
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash: redo that problem
                    continue
                if "failk_settings" in row:
                    settings = row["failk_settings"]
                else:
                    done[row["id"]] = row
    return settings, done


def _check_settings(path: Path, recorded: dict | None, done: dict, settings: dict) -> None:
    """Refuse to resume from a progress file made with other settings (or that records none)."""
    fresh = f"delete {path} to start fresh (its problems are sampled again), or choose another --out"
    if recorded is None:
        if done:
            raise ValueError(
                f"{path} holds {len(done)} problems' counts but no record of the k, model and sampling "
                f"settings they were sampled with (made by an older failk), so they cannot be reused safely: {fresh}"
            )
        return
    differ = [k for k in settings if recorded.get(k) != settings[k]]
    if differ:
        pairs = "; ".join(f"{k}: {recorded.get(k)!r} there, {settings[k]!r} now" for k in differ)
        raise ValueError(
            f"{path} was made with other settings than this run ({pairs}); its counts would be reused as "
            f"if they were this run's. Rerun with the recorded settings to resume it, or {fresh}"
        )


def _resume(path: Path, settings: dict) -> dict[str, dict]:
    """The finished problems' rows of the progress file ``path`` made with ``settings``; a new file starts
    with a line recording ``settings``. Raises ``ValueError`` for a file made otherwise."""
    recorded, done = _read_progress(path)
    _check_settings(path, recorded, done, settings)
    if recorded is None:  # a new file (or one holding only a header line cut by a crash)
        path.write_text(json.dumps({"failk_settings": settings}) + "\n")
    return done


def build_fail_at_k(
    model,
    tokenizer,
    records: list[dict],
    reward,
    out: Path,
    k: int = 128,
    temperature: float = 1.0,
    max_new_tokens: int = 1024,
    prompt_template: str = "{question}",
    use_chat_template: bool = False,
    problems_per_batch: int = 8,
    samples_per_round: int = 32,
    test_fraction: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    model_name: str | None = None,
    tokenizer_name: str | None = None,
    source: str | None = None,
) -> dict:
    """Sample, keep the 0/k problems, write the hard set and its split; return a summary.

    ``model_name`` / ``tokenizer_name`` (default: their ``name_or_path``) and ``source`` are recorded in
    the progress file with the sampling settings: resuming with any of them changed raises ``ValueError``.
    """
    for name, value in (
        ("k", k),
        ("problems_per_batch", problems_per_batch),
        ("samples_per_round", samples_per_round),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    progress_path = out.with_name(out.name + ".progress.jsonl")
    settings = {
        "k": k,
        "model": model_name or getattr(model, "name_or_path", None),
        "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", None),
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "prompt_template": prompt_template,
        "use_chat_template": use_chat_template,
        "problems_per_batch": problems_per_batch,
        "samples_per_round": samples_per_round,
        "seed": seed,
        "source": source,
        "problems_digest": records_digest(records),
    }
    done = _resume(progress_path, settings)
    prompt = functools.partial(_render, tokenizer, prompt_template, use_chat_template)
    sample = functools.partial(
        _count_correct, model, tokenizer, prompt, reward, k=k, samples_per_round=samples_per_round,
        max_new_tokens=max_new_tokens, temperature=temperature,
    )  # fmt: skip
    _sample_unfinished_chunks(records, done, progress_path, sample, problems_per_batch, seed, k, progress)
    about = {"model": settings["model"], "source": source}
    return _write_hard_set(out, records, done, k=k, test_fraction=test_fraction, seed=seed, about=about)


def _sample_unfinished_chunks(
    records: list[dict],
    done: dict[str, dict],
    progress_path: Path,
    sample: Callable[[list[dict], torch.Generator], dict[str, dict]],
    problems_per_batch: int,
    seed: int,
    k: int,
    progress: bool,
) -> None:
    """Count the correct samples of every problem not yet in ``done`` (updated in place), a chunk at a
    time, appending each chunk's rows to the progress file.

    Fixed chunks of the input order, each with its own seed: a resumed run redoes only the
    unfinished chunks and samples exactly what an uninterrupted run would have.
    """
    chunks = [records[i : i + problems_per_batch] for i in range(0, len(records), problems_per_batch)]
    todo = [(i, c) for i, c in enumerate(chunks) if any(r["id"] not in done for r in c)]
    bar = tqdm(
        total=len(records),
        initial=len(records) - sum(len(c) for _, c in todo),
        desc=f"fail@{k}",
        unit="problem",
        disable=not progress,
        postfix=_bar_counts({i: done[i] for i in {r["id"] for r in records} & done.keys()}),
    )
    with open(progress_path, "a") as log:
        if progress_path.stat().st_size and not progress_path.read_bytes().endswith(b"\n"):
            log.write("\n")  # close a line cut by a crash, so the next row stays readable
        for index, batch in todo:
            counts = sample(batch, torch.Generator().manual_seed(seed * 1_000_003 + index))
            for r in batch:
                row = {"id": r["id"], **counts[r["id"]]}
                done[r["id"]] = row
                log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(_bar_counts(done), refresh=False)  # shown by the update
            bar.update(len(batch))
    bar.close()


def _count_correct(
    model,
    tokenizer,
    prompt: Callable[[str], str],
    reward,
    batch: list[dict],
    gen: torch.Generator,
    k: int,
    samples_per_round: int,
    max_new_tokens: int,
    temperature: float,
) -> dict[str, dict]:
    """``{id: {"n": samples drawn, "correct": correct ones}}`` of one chunk: rounds of
    ``samples_per_round`` samples per problem, a problem leaving at its first correct sample (it
    cannot be 0/k any more) or after ``k`` samples."""
    from lit_selfimprove.generation import generate
    from lit_selfimprove.rewards.base import score_completions

    counts = {r["id"]: {"n": 0, "correct": 0} for r in batch}
    active = list(batch)
    while active:
        per = min(samples_per_round, k - counts[active[0]["id"]]["n"])
        ro = generate(model, tokenizer, [prompt(r["question"]) for r in active], num_samples=per,
                      max_new_tokens=max_new_tokens, temperature=temperature, generator=gen)  # fmt: skip
        answers = [r["answer"] for r in active for _ in range(per)]
        _, correct = score_completions(reward, ro.texts, answers)
        still = []
        for r, c in zip(active, correct.view(len(active), per)):
            counts[r["id"]]["n"] += per
            counts[r["id"]]["correct"] += int(c.sum())
            if counts[r["id"]]["correct"] == 0 and counts[r["id"]]["n"] < k:
                still.append(r)
        active = still
    return counts


def _bar_counts(done: dict[str, dict]) -> dict[str, int]:
    """The progress bar's postfix: the finished problems kept as 0/k so far and those solved."""
    hard = sum(1 for row in done.values() if row["correct"] == 0)
    return {"hard": hard, "solved": len(done) - hard}


def source_part(
    records: list[dict], origins: list[str], part: str, test_fraction: float, seed: int
) -> tuple[list[dict], list[str]]:
    """The ``part`` (``train`` / ``test``) half of ``split_problems(records, test_fraction, seed)`` and its
    origins: the split ProblemDataModule(test_fraction=..., split_seed=...) makes of the same records."""
    train, test = split_problems(records, test_fraction=test_fraction, seed=seed)
    kept = train if part == "train" else test
    where = dict(zip((r["id"] for r in records), origins))
    return kept, [where[r["id"]] for r in kept]


def _render(tokenizer, template: str, use_chat_template: bool, question: str) -> str:
    """The student prompt of ``question``."""
    return as_user_turn(tokenizer, template.format(question=question), use_chat_template)


def _fitting_records(
    records: list[dict],
    origins: list[str],
    model: str,
    tokenizer,
    render: Callable[[str], str],
    max_new_tokens: int,
    too_long: str,
) -> list[dict]:
    """``records`` whose prompt plus ``max_new_tokens`` fits ``model``'s context, checked from its config
    before the model loads (minutes for a 3B model): ``too_long="error"`` raises naming file:line."""
    limit = max_positions(model)
    if limit is None:
        return records
    where = dict(zip((r["id"] for r in records), origins))
    counter = prompt_token_counter(tokenizer, render)
    return check_prompt_lengths(
        records, counter, limit, max_new_tokens, too_long, origin=lambda r: where[r["id"]]
    )


def _write_hard_set(
    out: Path,
    records: list[dict],
    done: dict[str, dict],
    k: int,
    test_fraction: float,
    seed: int,
    about: dict | None = None,
) -> dict:
    """Write the 0/k problems to ``out``, their train/test split and ``OUT.summary.json`` (with ``about``:
    the model and source); return the summary."""
    hard = [r for r in records if done[r["id"]]["correct"] == 0]
    _write(out, hard)
    summary = {"problems": len(records), "hard": len(hard), "k": k, "source_seed": seed, **(about or {})}
    if len(hard) >= 2:
        train, test = split_problems(hard, test_fraction=test_fraction, seed=seed)
        _write(out.with_name(out.stem + ".train.jsonl"), train)
        _write(out.with_name(out.stem + ".test.jsonl"), test)
        summary.update(train=len(train), test=len(test))
    out.with_name(out.stem + ".summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps({"id": r["id"], "question": r["question"], "answer": r["answer"]}) + "\n")
    tmp.replace(path)


def _parser() -> argparse.ArgumentParser:
    """The command line of ``lit-selfimprove failk`` (every number checked as it is parsed)."""
    p = argparse.ArgumentParser(prog="lit_selfimprove.failk", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="hub id, local folder or builtin:tiny-student")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--source", required=True, help="problems: MATH/HARP/OlympiadBench/jsonl file or hub id")
    p.add_argument("--format", default="auto")
    p.add_argument("--hub-split", default="test")
    p.add_argument("--out", required=True, help="output jsonl of the 0/k problems")
    p.add_argument("--k", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=1.0)
    p.add_argument("--max-new-tokens", type=positive_int, default=1024)
    p.add_argument("--prompt-template", default=None, help="student prompt with {question} (default: SOAR's)")
    p.add_argument("--use-chat-template", action="store_true")
    p.add_argument("--problems-per-batch", type=positive_int, default=8)
    p.add_argument("--samples-per-round", type=positive_int, default=32)
    p.add_argument("--test-fraction", type=open_fraction, default=0.5)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N problems")
    p.add_argument(
        "--levels",
        type=positive_int,
        nargs="+",
        default=None,
        help="keep only the MATH problems at these levels (as ProblemDataModule(levels=...))",
    )
    p.add_argument(
        "--source-part",
        choices=["all", "train", "test"],
        default="all",
        help="use only this half of the source's split_problems(--source-test-fraction, "
        "--source-split-seed) split, as ProblemDataModule makes it: 'train' keeps a hard set "
        "drawn from a training split free of that split's test problems",
    )
    p.add_argument(
        "--source-test-fraction",
        type=open_fraction,
        default=0.5,
        help="test_fraction of the source split (--source-part)",
    )
    p.add_argument(
        "--source-split-seed",
        type=non_negative_int,
        default=0,
        help="split_seed of the source split (--source-part)",
    )
    p.add_argument("--too-long", choices=TOO_LONG_MODES, default="error",
                   help="problems whose prompt + --max-new-tokens exceed the model's context: "
                   "error (name them) or skip (drop and count them)")  # fmt: skip
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=["builtin", "vllm"], default="builtin",
                   help="generation backend (vllm: a colocated vLLM engine)")  # fmt: skip
    return p


def _source_problems(args: argparse.Namespace) -> tuple[list[dict], list[str], str]:
    """``(records, origins, source)`` of ``--source`` after ``--limit`` / ``--levels`` /
    ``--source-part``; ``source`` names them all (it is recorded with the progress settings)."""
    records, _, origins = load_located_problems(
        args.source, format=args.format, split=args.hub_split, limit=args.limit, levels=args.levels
    )
    source = args.source
    if args.levels is not None:
        source += f" levels={sorted(args.levels)}"
    if args.source_part != "all":
        records, origins = source_part(
            records, origins, args.source_part, args.source_test_fraction, args.source_split_seed
        )
        source += (
            f" part={args.source_part} test_fraction={args.source_test_fraction} "
            f"split_seed={args.source_split_seed}"
        )
    return records, origins, source


def main(argv: list[str] | None = None) -> dict:
    """``lit-selfimprove failk``: build the fail@k hard set of ``--source``; returns its summary."""
    p = _parser()
    args = p.parse_args(argv)

    from lit_selfimprove.modeling import load_causal_lm, load_tokenizer
    from lit_selfimprove.prompts import SOAR_STUDENT_PROMPT
    from lit_selfimprove.rewards import MathVerifyReward

    template = args.prompt_template or SOAR_STUDENT_PROMPT
    if "{question}" not in template:
        p.error("--prompt-template must contain a {question} field")
    records, origins, source = _source_problems(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    render = functools.partial(_render, tokenizer, template, args.use_chat_template)
    records = _fitting_records(
        records, origins, args.model, tokenizer, render, args.max_new_tokens, args.too_long
    )
    model = load_causal_lm(args.model, dtype=args.dtype).to(args.device)
    from lit_selfimprove.generation import GenerationConfig, attach_backend

    attach_backend(model, GenerationConfig(backend=args.backend))
    reward = MathVerifyReward(mode="binary")
    try:
        summary = build_fail_at_k(
            model, tokenizer, records, reward, Path(args.out), k=args.k, temperature=args.temperature,
            max_new_tokens=args.max_new_tokens, prompt_template=template,
            use_chat_template=args.use_chat_template, problems_per_batch=args.problems_per_batch,
            samples_per_round=args.samples_per_round, test_fraction=args.test_fraction, seed=args.seed,
            model_name=args.model, tokenizer_name=args.tokenizer or args.model, source=source,
        )  # fmt: skip
    finally:
        reward.close()
    print(json.dumps(summary))
    print(f"fail@{args.k} hard set: {args.out} (+ .train.jsonl / .test.jsonl)")
    return summary


if __name__ == "__main__":
    main()
