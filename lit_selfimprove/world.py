"""Tools for the embedded tiny world.

    python -m lit_selfimprove.world eval --model builtin:tiny-student --levels 1 2 3 4 5
    python -m lit_selfimprove.world export --levels 5 6 --num 400 --out hard_candidates.jsonl
    python -m lit_selfimprove.world build            # rebuild every bundled asset (~20 min CPU)

``build`` retrains the tiny student and teacher bases from ``configs/tiny/pretrain_*.yaml``
and rebuilds the bundled fail@k hard set, i.e. the full recipe of ``assets/``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from lit_selfimprove.assets import ASSETS_DIR, build_char_tokenizer
from lit_selfimprove.cli_args import non_negative_int, number, positive_int
from lit_selfimprove.prompts import TINY_STUDENT_PROMPT, TINY_TEACHER_PROMPT
from lit_selfimprove.worlds.arithmetic import LEVELS, generate_problems, quick_correct

__all__ = [
    "LEVELS",
    "level_accuracy",
    "main",
    "quick_correct",
    "teacher_stats",
    "world_level",
]
_PAIR = re.compile(r"<question>(.*?)</question>[^<]*<answer>\s*\\boxed\{([^{}]*)\}\s*</answer>", re.S)


@torch.no_grad()
def level_accuracy(
    model, tokenizer, levels, num: int = 200, seed: int = 12345, samples: int = 0, batch: int = 200
):
    """Greedy accuracy per level (and the mean sampled accuracy when ``samples`` > 0)."""
    from lit_selfimprove.generation import generate

    result = {}
    for level in levels:
        probs = generate_problems([level], num, seed)
        correct = sampled = 0
        for i in range(0, num, batch):
            chunk = probs[i : i + batch]
            prompts = [TINY_STUDENT_PROMPT.format(question=p["question"]) for p in chunk]
            ro = generate(model, tokenizer, prompts, max_new_tokens=24 + 8 * level, temperature=0.0)
            correct += sum(quick_correct(t, p["answer"]) for t, p in zip(ro.texts, chunk))
            if samples:
                ro = generate(model, tokenizer, prompts, num_samples=samples, max_new_tokens=24 + 8 * level)
                answers = [p["answer"] for p in chunk for _ in range(samples)]
                sampled += sum(quick_correct(t, a) for t, a in zip(ro.texts, answers))
        result[level] = {"greedy": correct / num}
        if samples:
            result[level]["sampled"] = sampled / (num * samples)
    return result


@torch.no_grad()
def teacher_stats(model, tokenizer, num: int = 200) -> dict:
    """Validity, correctness and level mix of the teacher's sampled problems."""
    from lit_selfimprove.generation import generate

    ro = generate(model, tokenizer, [TINY_TEACHER_PROMPT], num_samples=num, max_new_tokens=160)
    valid = correct = 0
    levels: dict[int, int] = {}
    for text in ro.texts:
        m = _PAIR.search(text)
        if not m:
            continue
        valid += 1
        q, a = m.group(1), m.group(2)
        parts = q.split("+")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            correct += str(int(parts[0]) + int(parts[1])) == a.strip()
            levels[len(parts[0])] = levels.get(len(parts[0]), 0) + 1
    return {"valid": valid / num, "correct": correct / num, "levels": dict(sorted(levels.items()))}


def world_level(text: str) -> int:
    """argparse type: a level of the tiny world."""
    value = number(text, int, lambda v: True, "a level (an integer)")
    if value not in LEVELS:
        raise argparse.ArgumentTypeError(
            f"no level {value}: the tiny world has levels {LEVELS[0]}-{LEVELS[-1]}"
        )
    return value


def _run_cli(config: str, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "lit_selfimprove", "fit", "--config", config, *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build(configs_dir: Path, out_dir: Path, steps: int | None, k: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    build_char_tokenizer().save_pretrained(out_dir / "tiny-tokenizer")
    extra = [f"--trainer.max_steps={steps}"] if steps else []
    for role in ("student", "teacher"):
        _run_cli(
            str(configs_dir / f"pretrain_{role}.yaml"),
            f"--model.init_args.save_to={out_dir / f'tiny-{role}'}",
            *extra,
        )
    # the fail@k hard set, and the strict one: sums with >= 5 carries that are also 0/k
    hard_set(out_dir / "tiny-hard" / "hard.jsonl", generate_problems([5, 6], 384, seed=2026), out_dir, k)
    strict = generate_problems([5, 6], 192, seed=2027, min_carries=5)
    hard_set(out_dir / "tiny-hard" / "strict.jsonl", strict, out_dir, k)


def hard_set(out: Path, candidates: list[dict], assets: Path, k: int) -> None:
    """fail@k of the tiny student in ``assets`` on ``candidates`` -> ``out`` and its train / test split."""
    from lit_selfimprove import failk

    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.with_name(out.stem + ".candidates.jsonl")
    _write_jsonl(source, candidates)
    failk.main(
        [
            "--model", str(assets / "tiny-student"),
            "--source", str(source),
            "--out", str(out),
            "--k", str(k),
            "--prompt-template", TINY_STUDENT_PROMPT,
            "--max-new-tokens", "80",
        ]
    )  # fmt: skip
    source.unlink()
    out.with_name(out.name + ".progress.jsonl").unlink(missing_ok=True)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lit_selfimprove.world", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="greedy accuracy of a student per level; teacher validity")
    ev.add_argument("--model", default="builtin:tiny-student")
    ev.add_argument("--role", choices=["student", "teacher"], default="student")
    ev.add_argument("--levels", type=world_level, nargs="+", default=[1, 2, 3, 4, 5])
    ev.add_argument("--num", type=positive_int, default=200)
    ev.add_argument(
        "--samples", type=non_negative_int, default=0, help="also report mean accuracy of N samples at T=1"
    )
    ex = sub.add_parser("export", help="write problems of some levels as id/question/answer jsonl")
    ex.add_argument("--levels", type=world_level, nargs="+", required=True)
    ex.add_argument("--num", type=positive_int, required=True)
    ex.add_argument("--seed", type=non_negative_int, default=0)
    ex.add_argument("--out", required=True)
    bd = sub.add_parser("build", help="rebuild the bundled tokenizer, bases and hard set")
    bd.add_argument("--configs", default="configs/tiny")
    bd.add_argument("--out-dir", default=str(ASSETS_DIR))
    bd.add_argument(
        "--steps", type=positive_int, default=None, help="override the pre-training steps (tests use few)"
    )
    bd.add_argument("--k", type=positive_int, default=128)
    args = parser.parse_args(argv)

    if args.cmd == "eval":
        from lit_selfimprove.modeling import load_causal_lm, load_tokenizer

        torch.manual_seed(0)
        model, tok = load_causal_lm(args.model), load_tokenizer(args.model)
        if args.role == "teacher":
            print(json.dumps(teacher_stats(model, tok, args.num)))
        else:
            print(json.dumps(level_accuracy(model, tok, args.levels, args.num, samples=args.samples)))
    elif args.cmd == "export":
        _write_jsonl(Path(args.out), generate_problems(args.levels, args.num, args.seed))
    else:
        build(Path(args.configs), Path(args.out_dir), args.steps, args.k)


if __name__ == "__main__":
    main()
