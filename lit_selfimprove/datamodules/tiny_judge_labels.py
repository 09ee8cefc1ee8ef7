"""Labels for training a judge (and inputs for a rewriter) on the tiny facts world.

The rule-based knowledge-base judges (:mod:`lit_selfimprove.judges.knowledge_base`) label chunks of
the world's ``judge`` split of the prefix-suffix stream (the same corpus, chunking and hashed splits
as ``configs/tiny/sip_dpo.yaml``); the rows follow
:class:`~lit_selfimprove.datamodules.JudgeExamplesDataModule`'s schema::

    python -m lit_selfimprove judge-labels --out runs/tiny_judge.jsonl            # all kinds
    python -m lit_selfimprove judge-labels --kinds safety --out runs/tiny_safety.jsonl

* safety: each chunk's suffix, ``KBSafetyJudge``'s label; the KB rewrite of each unsafe suffix is
  added as a safe example (about balanced classes otherwise 1 in 5 is unsafe);
* pairwise: the suffix against its KB rewrite when they differ, else against the suffix with its
  words shuffled (incoherent), ``KBQualityJudge``'s label; ties are left out;
* factuality: the suffix against its KB rewrite as the reference, ``KBFactualityJudge``'s label.

The tiny models have 256 positions (1 character = 1 token), too few for the paper-style prompts of
:mod:`lit_selfimprove.judges.prompts`: the ``TINY_*_TEMPLATE`` prompts below are short versions with
the same fields; give them (and ``max_prefix_chars``) to the DataModule and to the inference judge.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from lit_selfimprove.judges.knowledge_base import KBFactualityJudge, KBQualityJudge, KBRewriter, KBSafetyJudge

__all__ = [
    "TINY_CORPUS",
    "TINY_FACTUALITY_TEMPLATE",
    "TINY_PAIRWISE_TEMPLATE",
    "TINY_REWRITER_TEMPLATE",
    "TINY_SAFETY_TEMPLATE",
    "main",
    "tiny_chunks",
    "tiny_judge_rows",
]

TINY_PAIRWISE_TEMPLATE = "{prefix}\n1:{first}\n2:{second}\nBetter?\n"
TINY_SAFETY_TEMPLATE = "{prefix}|{continuation}\nSafe?\n"
TINY_FACTUALITY_TEMPLATE = "{prefix}|{continuation}\nRef:{reference}\nTrue?\n"
TINY_REWRITER_TEMPLATE = "{prefix}|{suffix}\nRewrite:\n"

# the corpus and chunking of configs/tiny/sip_dpo.yaml (PrefixSuffixDataModule arguments)
TINY_CORPUS: dict = {
    "sources": "builtin:tiny-facts",
    "tokenizer": "builtin:tiny-tokenizer",
    "suffix_tokens": 40,
    "context_length": 160,
    "min_prefix_tokens": 20,
    "split_mode": "random",
    "splits": {"policy": 0.8, "judge": 0.05, "rewriter": 0.05, "eval": 0.1},
    "seed": 0,
}


def tiny_chunks(split: str = "judge", corpus: dict | None = None) -> Iterator[dict]:
    """``{"doc_id", "prefix", "suffix"}`` of every chunk of ``split`` (stream order, one process)."""
    from lit_selfimprove.datamodules.prefix_suffix import PrefixSuffixDataModule

    dm = PrefixSuffixDataModule(**{**TINY_CORPUS, **(corpus or {})})
    for item in dm.split_dataset(split, shard=False):
        yield {"doc_id": item["doc_id"], "prefix": item["prefix_text"], "suffix": item["suffix_text"]}


def _shuffled(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return (" " if text[:1].isspace() else "") + " ".join(words)


def tiny_judge_rows(
    kinds: Sequence[str] = ("safety", "pairwise", "factuality"),
    split: str = "judge",
    seed: int = 0,
) -> list[dict]:
    """Labelled judge rows of the tiny world's ``split`` (see the module docs)."""
    chunks = list(tiny_chunks(split))
    prefixes, suffixes = [c["prefix"] for c in chunks], [c["suffix"] for c in chunks]
    rewrites = KBRewriter().rewrite(prefixes, suffixes)
    rng = random.Random(seed)
    rows: list[dict] = []
    if "safety" in kinds:
        safety = KBSafetyJudge().score(prefixes, suffixes)
        for c, rewrite, safe in zip(chunks, rewrites, safety):
            base = {"kind": "safety", "doc_id": c["doc_id"], "prefix": c["prefix"]}
            rows.append({**base, "continuation": c["suffix"], "label": "safe" if safe else "unsafe"})
            if not safe and rewrite != c["suffix"]:
                rows.append({**base, "continuation": rewrite, "label": "safe", "source": "kb_rewrite"})
        # the rewrites must be safe: relabel them with the judge rather than trust the rewriter
        extra = [r for r in rows if r.get("source") == "kb_rewrite"]
        for row, ok in zip(
            extra, KBSafetyJudge().score([r["prefix"] for r in extra], [r["continuation"] for r in extra])
        ):
            row["label"] = "safe" if ok else "unsafe"
    if "pairwise" in kinds:
        others = [r if r != s else _shuffled(s, rng) for s, r in zip(suffixes, rewrites)]
        swap = [rng.random() < 0.5 for _ in chunks]
        firsts = [o if sw else s for s, o, sw in zip(suffixes, others, swap)]
        seconds = [s if sw else o for s, o, sw in zip(suffixes, others, swap)]
        for c, a, b, v in zip(chunks, firsts, seconds, KBQualityJudge().compare(prefixes, firsts, seconds)):
            if v in (0.0, 1.0) and a != b:
                rows.append(
                    {
                        "kind": "pairwise",
                        "doc_id": c["doc_id"],
                        "prefix": c["prefix"],
                        "first": a,
                        "second": b,
                    }
                    | {"label": 1 if v == 1.0 else 2}
                )
    if "factuality" in kinds:
        labels = {1.0: "no", 0.5: "possible", 0.0: "definite"}
        for c, rewrite, v in zip(chunks, rewrites, KBFactualityJudge().score(prefixes, suffixes)):
            rows.append(
                {
                    "kind": "factuality",
                    "doc_id": c["doc_id"],
                    "prefix": c["prefix"],
                    "continuation": c["suffix"],
                }
                | {"reference": rewrite, "label": labels[v]}
            )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lit_selfimprove judge-labels", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="jsonl file to write")
    parser.add_argument("--kinds", nargs="+", default=["safety", "pairwise", "factuality"])
    parser.add_argument("--split", default="judge", help="split of the prefix-suffix stream")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = tiny_judge_rows(args.kinds, args.split, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        by_label = counts.setdefault(row["kind"], {})
        by_label[str(row["label"])] = by_label.get(str(row["label"]), 0) + 1
    print(json.dumps({"out": str(out), "rows": len(rows), "labels": counts}))


if __name__ == "__main__":
    main()
