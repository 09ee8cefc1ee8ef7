"""Rewriter inputs as RL problems: train an LLM rewriter with :class:`~lit_selfimprove.modules.StudentRLVR`.

The inputs are (prefix, suffix) chunks of the rewriter's own split of the prefix-suffix stream
(``split: rewriter`` of :class:`~lit_selfimprove.datamodules.PrefixSuffixDataModule`, disjoint from the
policy's and the judge's documents), or the rows of a jsonl (``{"prefix", "suffix"[, "safe"]}``). Each
becomes a ``(question, answer)`` problem: the question is EXACTLY the text
:class:`~lit_selfimprove.judges.LLMRewriter` sends through :class:`~lit_selfimprove.judges.HFChatBackend`
(its prompt, seeded with the prefix's last ``seed_words`` words, in the chat template), the answer
the JSON :func:`~lit_selfimprove.rewards.rewrite.rewrite_answer` that
:class:`~lit_selfimprove.rewards.RewriteReward` scores. Train with ``prompt_template: "{question}"`` and
``use_chat_template: false``; use the result as ``LLMRewriter(HFChatBackend(<folder>), template=...,
max_tokens=..., seed_words=..., max_prefix_chars=...)`` with the same values as here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lit_selfimprove.datamodules.judge_examples import (
    ProblemListDataModule,
    _stable_fraction,
    render_chat_prompt,
)
from lit_selfimprove.datamodules.readers import read_jsonl
from lit_selfimprove.judges.prompts import REWRITER_TEMPLATE, last_words
from lit_selfimprove.rewards.rewrite import rewrite_answer

__all__ = ["RewriterExamplesDataModule", "load_rewriter_rows"]


def load_rewriter_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows ``{"prefix", "suffix"[, "safe", "doc_id"]}`` of a jsonl; ``ValueError`` with the line number."""
    rows = []
    for where, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
        for name in ("prefix", "suffix"):
            if not isinstance(row.get(name), str):
                raise ValueError(f"{where}: rewriter row misses the string field {name!r}")
        if not isinstance(row.get("safe", False), bool):
            raise ValueError(f"{where}: 'safe' must be true or false, got {row['safe']!r}")
        rows.append(row)
    return rows


class RewriterExamplesDataModule(ProblemListDataModule):
    """The rewriter split's (prefix, suffix) chunks as problems in ``LLMRewriter``'s exact prompt.

    Args:
        corpus: :class:`~lit_selfimprove.datamodules.PrefixSuffixDataModule` arguments (``sources``,
            ``tokenizer``, ``suffix_tokens``, ``splits``...): the stream whose ``split`` is read, in stream
            order, by one process. Exactly one of ``corpus`` and ``path``.
        path: a jsonl of ``{"prefix", "suffix"}`` rows instead (optional ``"safe"``: the input's label).
        split: the split of the stream (the rewriter's own, ``"rewriter"``).
        tokenizer: the rewriter model's tokenizer (its chat template as ``HFChatBackend`` applies it;
            ``None``: the raw prompt).
        use_chat_template: as ``HFChatBackend(use_chat_template=...)``.
        template / max_tokens / seed_words / max_prefix_chars: as ``LLMRewriter``'s (the same values
            must be given to the inference rewriter and to ``RewriteReward(seed_words=...)``).
        val_fraction: share of documents held out for validation (stable hash of ``doc_id``).
        max_examples: keep at most this many chunks (``None``: all).
        seed / batch_size / val_batch_size: training shuffle and batch sizes.
    """

    def __init__(
        self,
        corpus: dict[str, Any] | None = None,
        path: str | None = None,
        split: str = "rewriter",
        tokenizer: str | None = None,
        use_chat_template: bool = True,
        template: str = REWRITER_TEMPLATE,
        max_tokens: int = 128,
        seed_words: int = 5,
        max_prefix_chars: int | None = None,
        val_fraction: float = 0.1,
        max_examples: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        val_batch_size: int = 64,
    ):
        super().__init__(batch_size, val_batch_size, seed)
        from lit_selfimprove.judges.llm import LLMRewriter

        if (corpus is None) == (path is None):
            raise ValueError("give exactly one of corpus (a prefix-suffix stream) and path (a jsonl)")
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"rewriter examples: no file {path!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        self.corpus, self.path, self.split = dict(corpus) if corpus else None, path, split
        self.tokenizer_name, self.use_chat_template = tokenizer, use_chat_template
        self.val_fraction, self.max_examples = val_fraction, max_examples
        # the inference rewriter itself renders the prompts (no backend is called)
        self.rewriter = LLMRewriter(
            None,
            template=template,
            max_tokens=max_tokens,
            seed_words=seed_words,
            max_prefix_chars=max_prefix_chars,
        )
        self._tokenizer = None

    def rows(self) -> list[dict[str, Any]]:
        if self.path is not None:
            rows = load_rewriter_rows(self.path)
        else:
            from lit_selfimprove.datamodules.prefix_suffix import PrefixSuffixDataModule

            stream = PrefixSuffixDataModule(**self.corpus).split_dataset(self.split, shard=False)
            rows = []
            for item in stream:
                rows.append(
                    {"doc_id": item["doc_id"], "prefix": item["prefix_text"], "suffix": item["suffix_text"]}
                )
                if self.max_examples is not None and len(rows) >= self.max_examples:
                    break
        return rows[: self.max_examples] if self.max_examples is not None else rows

    def user_prompt(self, prefix: str, suffix: str) -> str:
        """The prompt ``LLMRewriter.rewrite`` sends for (prefix, suffix)."""
        r = self.rewriter
        seed = last_words(prefix, r.seed_words)
        return r.prompt(prefix=prefix, suffix=suffix, seed=seed, max_tokens=str(r.rewrite_max_tokens))

    def build(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        train, val = [], []
        for i, row in enumerate(self.rows()):
            key = row.get("doc_id", json.dumps([row["prefix"], row["suffix"]]))
            prompt = self.user_prompt(row["prefix"], row["suffix"])
            record = {
                "id": str(row.get("id", i)),
                "question": render_chat_prompt(self.tokenizer, prompt, self.use_chat_template),
                "answer": rewrite_answer(row["prefix"], row["suffix"], row.get("safe")),
            }
            (val if _stable_fraction(self.seed, key) < self.val_fraction else train).append(record)
        return train, val
