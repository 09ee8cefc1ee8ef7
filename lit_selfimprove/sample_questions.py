"""Sample (question, answer) pairs from a teacher into a jsonl (SOAR's Grounded-T / Intrinsic-T sets).

    python -m lit_selfimprove sample-questions --teacher runs/soar/version_0/teacher --num 256 \\
        --out grounded_t.jsonl

``--teacher`` is a Hugging Face folder / hub id (``TeacherMetaRL`` writes its final teacher to
``<log dir>/teacher``) or a ``TeacherMetaRL`` Lightning checkpoint (``.ckpt``: the teacher weights
are read from its state dict, the base model, the prompt, ``use_chat_template`` and
``teacher_prefill`` from its hyper-parameters; ``--prompt`` / ``--use-chat-template`` / ``--prefill``
override them). The teacher sees the prompt as training showed it: as the user turn of its chat
template when ``use_chat_template``, followed by the prefill, which is put back before each
completion when it is parsed. Sampling
rejects invalid completions (the module's lenient parser) until ``--num`` pairs exist, with a
progress bar; the output holds ``id``/``question``/``answer`` rows, and ``OUT.summary.json`` the
validity rate and the Vendi score of the questions (built-in n-gram embedding).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from lit_selfimprove.assets import resolve_model
from lit_selfimprove.cli_args import non_negative_float, non_negative_int, positive_int, probability
from lit_selfimprove.datamodules.prompt_length import (
    check_prompt_lengths,
    max_positions,
    prompt_token_counter,
)
from lit_selfimprove.generation import GenerationConfig, attach_backend, generate
from lit_selfimprove.loops.teacher_pairs import math_verify_parseable, parse_pairs
from lit_selfimprove.metrics.vendi import HashingNgramEmbedding, vendi_score
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer
from lit_selfimprove.prompts import as_user_turn


def load_teacher(path: str, dtype: str = "float32") -> tuple[torch.nn.Module, object, str | None]:
    """``(model, tokenizer, prompt)``: the prompt is the checkpoint's ``teacher_prompt`` (``None`` for a folder)."""
    if not str(path).endswith(".ckpt"):
        return load_causal_lm(path, dtype=dtype), load_tokenizer(path), None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = ckpt.get("hyper_parameters") or {}
    if "teacher" not in hp:
        raise ValueError(f"{path} is not a TeacherMetaRL checkpoint (no 'teacher' hyper-parameter)")
    model = load_causal_lm(hp["teacher"], dtype=dtype)
    state = {k[len("teacher.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("teacher.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise ValueError(f"{path}: teacher weights do not match {hp['teacher']} (missing {missing[:3]})")
    return model, load_tokenizer(hp.get("teacher_tokenizer") or hp["teacher"]), hp.get("teacher_prompt")


def checkpoint_prompt_settings(path: str) -> dict:
    """``{"use_chat_template": bool, "teacher_prefill": str}`` of a TeacherMetaRL checkpoint (defaults for
    a folder): how training showed the prompt to the teacher."""
    hp = {}
    if str(path).endswith(".ckpt"):
        hp = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("hyper_parameters") or {}
    return {
        "use_chat_template": bool(hp.get("use_chat_template", False)),
        "teacher_prefill": hp.get("teacher_prefill") or "",
    }


def sample_questions(
    model,
    tokenizer,
    prompt: str,
    num: int,
    batch: int = 64,
    max_new_tokens: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_rounds: int = 100,
    answer_check: str = "math_verify",
    seed: int = 0,
    prefill: str = "",
) -> tuple[list[dict], dict]:
    """``num`` valid pairs by rejection sampling; returns ``(rows, summary)``. ``prompt`` is the exact text
    the teacher continues (ending with ``prefill``); each completion is parsed with ``prefill`` before it."""
    for name, value in (
        ("num", num),
        ("batch", batch),
        ("max_new_tokens", max_new_tokens),
        ("max_rounds", max_rounds),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    check = (lambda a: math_verify_parseable(a, timeout=2)) if answer_check == "math_verify" else None
    rows: list[dict] = []
    sampled = valid = rounds = 0
    with tqdm(total=num, desc="valid pairs", unit="pair") as bar:
        while len(rows) < num:
            if rounds == max_rounds:
                raise RuntimeError(
                    f"only {valid} valid pairs in {sampled} samples ({rounds} rounds): validity "
                    f"{valid / max(1, sampled):.1%}; raise --max-rounds or check --prompt"
                )
            ro = generate(
                model,
                tokenizer,
                [prompt],
                num_samples=batch,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                generator=gen,
            )
            rounds += 1
            sampled += len(ro)
            for pair in parse_pairs([prefill + t for t in ro.texts], check):
                valid += pair is not None
                if pair is not None and len(rows) < num:
                    rows.append({"id": f"teacher-{len(rows)}", "question": pair[0], "answer": pair[1]})
                    bar.update(1)
    questions = [r["question"] for r in rows]
    summary = {
        "num": len(rows),
        "sampled": sampled,
        "validity": valid / sampled,  # over every sample drawn, kept or not
        "distinct_questions": len(set(questions)),
        "vendi_ngram": float(vendi_score(HashingNgramEmbedding()(questions))),
    }
    return rows, summary


def _check_prompt_fits(prompt: str, tokenizer, model, max_new_tokens: int) -> None:
    """Refuse a teacher prompt that, with ``max_new_tokens``, does not fit the model's context: it would
    sample past the positions the model was trained on (slowly, and garbage), not fail."""
    limit = max_positions(model)
    if limit is not None:
        check_prompt_lengths(
            [{"question": prompt}], prompt_token_counter(tokenizer, str), limit, max_new_tokens,
            origin=lambda r: "the teacher prompt (--prompt, or the checkpoint's)",
        )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="lit_selfimprove sample-questions", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="HF folder / hub id, or a TeacherMetaRL .ckpt")
    p.add_argument("--out", required=True, help="output jsonl")
    p.add_argument("--num", type=positive_int, default=256)
    p.add_argument("--prompt", default=None, help="teacher prompt (default: the checkpoint's)")
    p.add_argument("--use-chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="the prompt as the user turn of the chat template (default: the checkpoint's)")  # fmt: skip
    p.add_argument("--prefill", default=None, help="text that starts the answer (default: the checkpoint's)")
    p.add_argument("--batch", type=positive_int, default=64, help="completions per sampling round")
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--temperature", type=non_negative_float, default=1.0)
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--max-rounds", type=positive_int, default=100)
    p.add_argument("--answer-check", choices=["math_verify", "light"], default="math_verify")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", choices=["builtin", "vllm"], default="builtin",
                   help="generation backend (vllm: a colocated vLLM engine)")  # fmt: skip
    args = p.parse_args(argv)
    if not str(args.teacher).endswith(".ckpt"):  # before loading the teacher
        resolve_model(args.teacher)  # a missing local path: named first
        if args.prompt is None:
            p.error("--prompt is required when --teacher is a model folder (a .ckpt carries its own)")
    model, tokenizer, prompt = load_teacher(args.teacher, args.dtype)
    prompt = args.prompt if args.prompt is not None else prompt
    if prompt is None:
        p.error(f"{args.teacher} has no teacher_prompt hyper-parameter: pass --prompt")
    shown = checkpoint_prompt_settings(args.teacher)
    use_chat = shown["use_chat_template"] if args.use_chat_template is None else args.use_chat_template
    prefill = shown["teacher_prefill"] if args.prefill is None else args.prefill
    prompt = as_user_turn(tokenizer, prompt, use_chat) + prefill
    _check_prompt_fits(prompt, tokenizer, model, args.max_new_tokens)
    attach_backend(model, GenerationConfig(backend=args.backend))
    rows, summary = sample_questions(
        model,
        tokenizer,
        prompt,
        args.num,
        args.batch,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.max_rounds,
        args.answer_check,
        args.seed,
        prefill,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    summary["teacher"] = args.teacher
    out.with_name(out.stem + ".summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    print(f"{len(rows)} questions: {out}")
    return summary


if __name__ == "__main__":
    main()
