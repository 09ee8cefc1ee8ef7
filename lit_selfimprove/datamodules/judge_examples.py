"""Labeled judge examples as RL problems: train an LLM judge with :class:`~lit_selfimprove.modules.StudentRLVR`.

Each example becomes one ``(question, answer)`` problem: the question is EXACTLY the text the
inference judge's model sees (the judge class's own prompt, wrapped in the chat template the way
:class:`~lit_selfimprove.judges.HFChatBackend` wraps it), the answer the expected verdict in the
judge's format (:func:`~lit_selfimprove.rewards.judge_verdict.canonical_verdict`), rewarded by
:class:`~lit_selfimprove.rewards.JudgeVerdictReward`. Train with ``prompt_template: "{question}"``
and ``use_chat_template: false`` in ``StudentRLVR`` (the question is already rendered), then load
the saved model folder with ``HFChatBackend`` into ``LLMPairwiseJudge`` / ``LLMSafetyJudge`` /
``LLMFactualityJudge`` with the same ``template`` and ``max_prefix_chars``.

Row schema (jsonl, one object a line)::

    {"kind": "safety", "prefix": "...", "continuation": "...", "label": "unsafe"}
    {"kind": "pairwise", "prefix": "...", "first": "...", "second": "...", "label": 2}
    {"kind": "factuality", "prefix": "...", "continuation": "...", "reference": "...", "label": "possible"}

* ``kind``: optional; inferred from the fields (``first``/``second``: pairwise, ``reference``:
  factuality, ``continuation``: safety);
* ``prefix``: optional (``""``); the other text fields are required strings;
* ``label``: pairwise ``1``/``"first"``/``"A"`` (the first text is better) or ``2``/``"second"``/
  ``"B"``; safety ``"safe"``/``"unsafe"`` (also yes/no, true/false, 1/0); factuality ``"no"``/
  ``"possible"``/``"definite"`` (hallucination) or 1/0.5/0;
* ``split``: optional ``"train"`` or ``"val"`` (else a stable hash of ``doc_id`` when given, else of
  the row's texts, decides, ``val_fraction``);
* other fields (``id``, ``source``...) are ignored.

``path: builtin:tiny-facts-judge`` builds the rows of the tiny facts world instead of reading a
file (:func:`lit_selfimprove.datamodules.tiny_judge_labels.tiny_judge_rows`: the world's ``judge`` split
labelled by the rule-based KB judges). Public labelled data that fits this schema after a small
conversion (not downloaded here): ``PKU-Alignment/PKU-SafeRLHF`` and ``nvidia/Aegis-AI-Content-
Safety-Dataset-2.0`` (safety), ``Anthropic/hh-rlhf`` and ``nvidia/HelpSteer2`` (pairwise
preference).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lit_selfimprove.datamodules.readers import read_jsonl
from lit_selfimprove.judges.prompts import FACTUALITY_TEMPLATE, PAIRWISE_QUALITY_TEMPLATE, SAFETY_TEMPLATE
from lit_selfimprove.rewards.judge_verdict import JUDGE_KINDS, canonical_verdict, label_value

__all__ = [
    "JudgeExamplesDataModule",
    "ProblemListDataModule",
    "load_judge_rows",
    "render_chat_prompt",
]

TINY_JUDGE_SOURCE = "builtin:tiny-facts-judge"
_FIELDS = {
    "pairwise": ("first", "second"),
    "safety": ("continuation",),
    "factuality": ("continuation", "reference"),
}


# ------------------------------------------------------------------------------------ rendering
def render_chat_prompt(tokenizer, prompt: str, use_chat_template: bool = True) -> str:
    """The text :meth:`HFChatBackend.format_prompt <lit_selfimprove.judges.HFChatBackend.format_prompt>`
    gives the model for ``prompt``, from the tokenizer alone (no model is loaded).

    The user turn of the tokenizer's chat template (when ``use_chat_template`` and it has one), with a
    leading BOS removed when the tokenizer adds one itself; the prompt unchanged otherwise.
    (``tests/test_judge_training.py`` checks that both agree.)
    """
    from lit_selfimprove.prompts import as_user_turn

    if tokenizer is None or not (use_chat_template and getattr(tokenizer, "chat_template", None)):
        return prompt
    text = as_user_turn(tokenizer, prompt, True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def _stable_fraction(*parts: object) -> float:
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") / 2.0**64


# ----------------------------------------------------------------------------------- base module
class _Problems(Dataset):
    def __init__(self, records: list[dict[str, str]]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, str]:
        return self.records[index]


def _collate(batch: Sequence[dict[str, str]]) -> dict[str, list[str]]:
    return {key: [r[key] for r in batch] for key in ("id", "question", "answer")}


class ProblemListDataModule(LightningDataModule):
    """Base of the judge / rewriter example DataModules: ``{"id", "question", "answer"}`` records
    built in :meth:`build` (``(train, val)`` lists), batched like the other problem DataModules."""

    def __init__(self, batch_size: int = 8, val_batch_size: int = 64, seed: int = 0):
        super().__init__()
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError("batch_size and val_batch_size must be >= 1")
        self.batch_size, self.val_batch_size, self.seed = batch_size, val_batch_size, seed
        self.train_records: list[dict[str, str]] = []
        self.val_records: list[dict[str, str]] = []

    tokenizer_name: str | None = None  # subclasses that render chat templates set it
    _tokenizer = None

    @property
    def tokenizer(self):
        """The tokenizer named by ``tokenizer_name`` (its chat template), loaded on first use."""
        if self._tokenizer is None and self.tokenizer_name:
            from lit_selfimprove.modeling import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def build(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        self.train_records, self.val_records = self.build()
        if not self.train_records:
            raise ValueError(f"{type(self).__name__}: no training examples")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            _Problems(self.train_records),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=_collate,
            drop_last=len(self.train_records) >= self.batch_size,
        )

    def _eval_loader(self) -> DataLoader:
        records = self.val_records or self.train_records[: self.val_batch_size]
        return DataLoader(_Problems(records), batch_size=self.val_batch_size, collate_fn=_collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()


# ------------------------------------------------------------------------------------- judge rows
def _row_kind(row: dict[str, Any], where: str) -> str:
    kind = row.get("kind")
    if kind is None:
        if "first" in row or "second" in row:
            return "pairwise"
        if "reference" in row:
            return "factuality"
        if "continuation" in row:
            return "safety"
        raise ValueError(
            f"{where}: cannot tell the judge kind (no 'kind' field and no 'first'/'continuation')"
        )
    if kind not in JUDGE_KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}; expected one of {sorted(JUDGE_KINDS)}")
    return kind


def check_judge_row(row: object, where: str) -> dict[str, Any]:
    """The row with its ``kind`` filled in; ``ValueError`` naming ``where`` and the problem."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    kind = _row_kind(row, where)
    for name in (*_FIELDS[kind], "label"):
        if name not in row or row[name] is None:
            raise ValueError(f"{where}: {kind} row misses the field {name!r}")
    for name in ("prefix", *_FIELDS[kind]):
        if name in row and not isinstance(row[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    try:
        label_value(kind, row["label"])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if row.get("split") not in (None, "train", "val"):
        raise ValueError(f"{where}: split must be 'train' or 'val', got {row['split']!r}")
    return {**row, "kind": kind}


def load_judge_rows(path: str | Path) -> list[dict[str, Any]]:
    """Checked rows of a judge jsonl (``ValueError`` with the line number on a bad row)."""
    return [check_judge_row(row, where) for where, row in read_jsonl(path)]


class JudgeExamplesDataModule(ProblemListDataModule):
    """Labeled judge examples (jsonl, see the module docs) rendered into the inference judge's prompt.

    Args:
        path: a jsonl file (schema in the module docs) or ``builtin:tiny-facts-judge``.
        tokenizer: the judge model's tokenizer (hub id, folder, ``builtin:...``): its chat template
            wraps the prompt as :class:`~lit_selfimprove.judges.HFChatBackend` does (``None``: the raw
            prompt, as for base models without a template).
        use_chat_template: as ``HFChatBackend(use_chat_template=...)`` at inference.
        kinds: keep only rows of these kinds (``None``: all).
        pairwise_template / safety_template / factuality_template: the judges' ``template`` (defaults:
            theirs); the inference judges must get the same.
        max_prefix_chars: as the inference judges' ``max_prefix_chars``.
        random_order: show each pair in a seeded random order (label mapped), as ``LLMPairwiseJudge``
            does, so that the judge learns no position preference; else as in the row.
        val_fraction: share of rows without a ``split`` field held out for validation (stable hash).
        max_examples: keep at most this many rows (in file order; ``None``: all).
        seed: seed of the pair order and of the training shuffle.
        batch_size / val_batch_size: examples per training / validation batch.
    """

    def __init__(
        self,
        path: str,
        tokenizer: str | None = None,
        use_chat_template: bool = True,
        kinds: list[str] | None = None,
        pairwise_template: str = PAIRWISE_QUALITY_TEMPLATE,
        safety_template: str = SAFETY_TEMPLATE,
        factuality_template: str = FACTUALITY_TEMPLATE,
        max_prefix_chars: int | None = None,
        random_order: bool = True,
        val_fraction: float = 0.1,
        max_examples: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        val_batch_size: int = 64,
    ):
        super().__init__(batch_size, val_batch_size, seed)
        from lit_selfimprove.judges.llm import LLMFactualityJudge, LLMPairwiseJudge, LLMSafetyJudge

        for kind in kinds or ():
            if kind not in JUDGE_KINDS:
                raise ValueError(
                    f"unknown judge kind {kind!r} in kinds; expected some of {sorted(JUDGE_KINDS)}"
                )
        if not 0 <= val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        if path != TINY_JUDGE_SOURCE and not Path(path).is_file():
            raise FileNotFoundError(f"judge examples: no file {path!r} (or use {TINY_JUDGE_SOURCE!r})")
        self.path, self.kinds, self.random_order = path, list(kinds) if kinds else None, random_order
        self.val_fraction, self.max_examples = val_fraction, max_examples
        self.tokenizer_name, self.use_chat_template = tokenizer, use_chat_template
        # the inference judges themselves render the prompts (no backend is called)
        self.judges = {
            "pairwise": LLMPairwiseJudge(None, template=pairwise_template, max_prefix_chars=max_prefix_chars),
            "safety": LLMSafetyJudge(None, template=safety_template, max_prefix_chars=max_prefix_chars),
            "factuality": LLMFactualityJudge(
                None, template=factuality_template, max_prefix_chars=max_prefix_chars
            ),
        }
        self._tokenizer = None

    def rows(self) -> list[dict[str, Any]]:
        if self.path == TINY_JUDGE_SOURCE:
            from lit_selfimprove.datamodules.tiny_judge_labels import tiny_judge_rows

            rows = [check_judge_row(r, f"{TINY_JUDGE_SOURCE}[{i}]") for i, r in enumerate(tiny_judge_rows())]
        else:
            rows = load_judge_rows(self.path)
        if self.kinds is not None:
            rows = [r for r in rows if r["kind"] in self.kinds]
        return rows[: self.max_examples] if self.max_examples is not None else rows

    def user_prompt(self, row: dict[str, Any]) -> tuple[str, object]:
        """``(prompt, label)`` the inference judge sends for ``row`` (the pair maybe swapped)."""
        kind, prefix = row["kind"], row.get("prefix", "")
        judge = self.judges[kind]
        if kind == "pairwise":
            first, second, label = row["first"], row["second"], row["label"]
            if self.random_order and random.Random(f"{self.seed}/{first}/{second}").random() < 0.5:
                first, second = second, first
                label = 2 if label_value("pairwise", label) == 1.0 else 1
            return judge.prompt(prefix=prefix, first=first, second=second), label
        if kind == "factuality":
            return judge.prompt(
                prefix=prefix, continuation=row["continuation"], reference=row["reference"]
            ), row["label"]
        return judge.prompt(prefix=prefix, continuation=row["continuation"]), row["label"]

    def render(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
        out = []
        for i, row in enumerate(rows):
            prompt, label = self.user_prompt(row)
            out.append(
                {
                    "id": str(row.get("id", i)),
                    "question": render_chat_prompt(self.tokenizer, prompt, self.use_chat_template),
                    "answer": canonical_verdict(row["kind"], label),
                }
            )
        return out

    def build(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        train, val = [], []
        for row in self.rows():
            split = row.get("split")
            if split is None:
                key = row.get("doc_id")  # a document's rows stay together (their prefixes overlap)
                if key is None:
                    key = json.dumps({k: row.get(k) for k in ("kind", "prefix", *_FIELDS[row["kind"]])})
                split = "val" if _stable_fraction(self.seed, key) < self.val_fraction else "train"
            (val if split == "val" else train).append(row)
        return self.render(train), self.render(val)
