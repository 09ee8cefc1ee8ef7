"""SIP's candidate pieces (no Lightning), used by
:class:`~lit_selfimprove.modules.suffix_policy_dpo.SuffixPolicyDPO`: the candidates of a batch,
tokenizing a text in the context of its prefix, who holds the best score (Figure 8 without the
tie-break), the judge-health check, and what a training step logs (its metrics and sample rows)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_selfimprove.rl.losses import dpo_loss

__all__ = [
    "BEST_CLASSES",
    "Candidates",
    "best_classes",
    "continuation_tokens",
    "judge_about",
    "judge_problems",
    "loss_stats",
    "nanmean",
    "pad_to",
    "sample_rows",
    "step_metrics",
    "tokenize_after",
]

BEST_CLASSES = ("best_rollout_only", "best_tied", "best_corpus_only")
"""Who holds a trained prefix's best score: only rollouts, a rollout tied with the suffix or the
rewrite, or only the suffix / the rewrite (see :func:`best_classes`)."""


@dataclass
class Candidates:
    """The candidate continuations of ``B`` prefixes: ``C`` per prefix, as tokens and text."""

    ids: Tensor  # [B, C, T] right-padded continuation tokens
    mask: Tensor  # [B, C, T] 1 for real tokens
    texts: list[list[str]]  # [B][C] what the judge reads
    sources: list[str]  # [C] "rollout" | "suffix" | "rewrite"
    unaligned_rewrites: int = 0  # rewrites left out: no tokens continue the prefix's with their text


def tokenize_after(
    tokenizer, prefixes: list[str], texts: list[str]
) -> list[tuple[list[int], list[int] | None]]:
    """``(prefix tokens, text tokens)`` per pair: the tokens of ``prefix + text`` after the prefix's own.

    A text tokenized on its own may start differently than in context: with SentencePiece-style
    tokenizers a leading space is part of the next token (``"France" + ". It"``: ``. ▁It`` in
    context, but ``▁ . ▁It`` alone). The text tokens are ``None`` when the text changes the
    prefix's last tokens (``"... Tal" + "va"`` is one token ``▁Talva``): then no tokens continue
    the prefix's tokens with exactly that text.
    """
    kw = {"add_special_tokens": False, "verbose": False}
    heads = tokenizer(list(prefixes), **kw)["input_ids"]
    joints = tokenizer([p + t for p, t in zip(prefixes, texts)], **kw)["input_ids"]
    return [(h, j[len(h) :] if j[: len(h)] == h else None) for h, j in zip(heads, joints)]


def continuation_tokens(
    tokenizer, prefixes: list[str], texts: list[str], max_tokens: int
) -> tuple[Tensor, Tensor, list[str], int]:
    """``texts`` as tokens after their prefix's (:func:`tokenize_after`), cut to ``max_tokens``:
    ``(ids, mask)`` ``[B, max_tokens]`` right-padded, the texts the judge reads (a cut text ends where
    its kept tokens do), and the number left out (no tokens, so no score) because their text changes
    the prefix's last tokens."""
    tok = tokenizer
    ids = torch.full((len(texts), max_tokens), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    read, unaligned = list(texts), 0
    for b, (head, toks) in enumerate(tokenize_after(tok, prefixes, texts)):
        if toks is None:
            unaligned += 1
            continue
        kept = toks[:max_tokens]
        ids[b, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        mask[b, : len(kept)] = 1
        if len(kept) < len(toks):  # cut: the text of the kept tokens, read after the prefix
            kw = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
            full, base = tok.decode(head + kept, **kw), tok.decode(head, **kw)
            read[b] = full[len(base) :] if full.startswith(base) else tok.decode(kept, **kw)
    return ids, mask, read, unaligned


def pad_to(t: Tensor, length: int, value: int) -> Tensor:
    """``t`` right-padded with ``value`` along its last dimension to ``length`` (candidates of different
    lengths side by side in one ``[B, C, T]`` tensor)."""
    return torch.nn.functional.pad(t, (0, length - t.shape[-1]), value=value)


def nanmean(x: Tensor) -> float:
    """The mean of the values of ``x`` that are not ``nan`` (unscored candidates), ``nan`` when none is:
    a logged mean over what the judge scored."""
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def _clip(text: str, size: int = 300) -> str:
    """``text``, or its start and end (where a verdict would be) when longer than ``size``."""
    return text if len(text) <= size else f"{text[: size // 2]} [...] {text[-size // 2 :]}"


def best_classes(
    total: Tensor, sources: list[str], rows: Tensor | None = None, atol: float = 1e-6
) -> dict[str, int]:
    """Count the rows of ``total`` ``[B, C]`` (``nan``: no score) by who holds the best score.

    ``sources[c]`` names candidate column ``c`` (``rollout`` / ``suffix`` / ``rewrite``); a score
    within ``atol`` of the row's maximum is a best one (the tolerance of
    :func:`~lit_selfimprove.rl.selection.select_pairs`). Per counted row, exactly one of:

    * ``best_rollout_only``: every best candidate is a rollout (a rollout strictly beats the
      suffix and the rewrite);
    * ``best_tied``: a rollout shares the best score with the suffix or the rewrite (the chosen
      source is then decided by the tie-break, uniformly at random among the best);
    * ``best_corpus_only``: every best candidate is the suffix or the rewrite.

    ``rows``: a ``[B]`` bool mask of the rows to count (e.g. ``Selection.valid``, the trained
    prefixes); default: every row with a score. Rows without any score are never counted.
    """
    if total.ndim != 2 or total.shape[1] != len(sources):
        raise ValueError(f"total must be [B, {len(sources)}], got {tuple(total.shape)}")
    total = total.detach().float().cpu()
    is_rollout = torch.tensor([s == "rollout" for s in sources], dtype=torch.bool)
    counts = dict.fromkeys(BEST_CLASSES, 0)
    for b in range(total.shape[0]):
        row = total[b]
        scored = ~torch.isnan(row)
        if not scored.any() or (rows is not None and not bool(rows[b])):
            continue
        best = scored & (row >= float(row[scored].max()) - atol)
        rollout, corpus = bool((best & is_rollout).any()), bool((best & ~is_rollout).any())
        name = "best_tied" if rollout and corpus else ("best_rollout_only" if rollout else "best_corpus_only")
        counts[name] += 1
    return counts


def judge_problems(
    bad: float,
    calls: float,
    skipped: float,
    prefixes: float,
    max_unparseable_frac: float,
    max_skipped_frac: float,
) -> list[str]:
    """What is wrong with a step's judging: too many unparseable verdicts (``bad`` of ``calls``) or
    too many skipped prefixes (``skipped`` of ``prefixes``); empty when all is well."""
    problems = []
    if calls > 0 and bad / calls > max_unparseable_frac:
        problems.append(f"{bad / calls:.0%} of the judge's verdicts were unparseable ({bad:.0f}/{calls:.0f})")
    if prefixes > 0 and skipped / prefixes > max_skipped_frac:
        problems.append(
            f"{skipped / prefixes:.0%} of the prefixes were skipped ({skipped:.0f}/{prefixes:.0f}: "
            "nothing learned from them)"
        )
    return problems


def judge_about(judge) -> str:
    """The judge's name, its last unparseable reply and the format it expects, for a message."""
    about = f"Judge: {type(judge).__name__}"
    reply, expected = getattr(judge, "last_unparseable", None), getattr(judge, "expected_format", None)
    if reply is not None:
        about += f"; last unparseable reply: {_clip(reply)!r}"
    if expected:
        about += f"; expected: {expected}"
    return about


def loss_stats(v: dict[str, Tensor], loss: str, beta: float) -> dict[str, float]:
    """This rank's per-pair values (``nll_sum``, ``tokens``, policy / reference log-probs) -> logged
    numbers for ``loss`` (``dpo`` or ``rf_nll``)."""
    if not v:
        return {}
    out = {"nll_chosen": float(v["nll_sum"].sum() / v["tokens"].sum().clamp(min=1))}
    if loss == "rf_nll":
        out["loss"] = out["rf_nll"] = out["nll_chosen"]
        return out
    value, stats = dpo_loss(
        v["policy_chosen"],
        v["policy_rejected"],
        v["ref_chosen"],
        v["ref_rejected"],
        beta=beta,
    )
    out.update(
        loss=float(value),
        dpo_margin=float(stats["margin"]),
        dpo_accuracy=float(stats["accuracy"]),
        reward_chosen=float(stats["reward_chosen"]),
        reward_rejected=float(stats["reward_rejected"]),
    )
    return out


def step_metrics(
    scores, total: Tensor, cands: Candidates, sel, counts: dict, loss_stats: dict, rollouts
) -> dict:
    """What one training step logs: the judge's mean scores per candidate source (and of the chosen
    and rejected ones), its call counts and per-component parse rates, the selection's shares and
    counts (``counts`` summed over ranks), rollout lengths and the loss values; ``nan`` left out."""
    metrics: dict[str, float] = {}
    sources = cands.sources
    tables = {"score": total, **{k: v.detach().float().cpu() for k, v in scores.components.items()}}
    for name, table in tables.items():
        for s in dict.fromkeys(sources):
            cols = [i for i, x in enumerate(sources) if x == s]
            metrics[f"judge/{name}_{s}"] = nanmean(table[:, cols])
    for name, picked in (("chosen", sel.chosen), ("rejected", sel.rejected)):
        r = (picked >= 0).nonzero().flatten()
        metrics[f"judge/score_{name}"] = nanmean(total[r, picked[r]])
    for k, v in scores.stats.items():
        metrics[f"judge/{k}"] = float(v)
        name = k.removesuffix("_calls")
        bad = scores.stats.get(f"{name}_unparseable")
        if name != k and v > 0 and bad is not None:  # per component: parseable share
            metrics[f"judge/{name}_parse_rate"] = 1.0 - float(bad) / float(v)
    pairs = counts["pairs"]
    for s in dict.fromkeys(sources):
        if pairs > 0:
            metrics[f"select/chosen_{s}"] = counts[f"chosen_{s}"] / pairs
            metrics[f"select/rejected_{s}"] = counts[f"rejected_{s}"] / pairs
    for k in ("pairs", "skipped", "ties_best", "ties_worst"):
        metrics[f"select/{k}"] = counts[k]
    for k in BEST_CLASSES:
        if k in counts and pairs > 0:
            metrics[f"select/{k}"] = counts[k] / pairs
    if "rewrite" in sources:
        metrics["train/rewrite_unaligned"] = float(cands.unaligned_rewrites)
    if rollouts is not None:
        metrics["train/rollout_len"] = float(rollouts.lengths.float().mean())
        metrics["train/rollout_finished"] = float(rollouts.finished.float().mean())
    metrics.update({f"train/{k}": v for k, v in loss_stats.items()})
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def sample_rows(batch: dict, cands: Candidates, total: Tensor, scores, sel, step: int, n: int) -> list[dict]:
    """The first ``n`` prefixes of a step for ``samples.jsonl``: candidates with sources and scores
    (total and per component), and the pair."""
    components = {k: v.detach().float().cpu() for k, v in scores.components.items()}
    rows = []
    for b in range(min(len(cands.texts), n)):
        candidates = []
        for c, text in enumerate(cands.texts[b]):
            entry = {"source": cands.sources[c], "text": text, "score": float(total[b, c])}
            entry.update({k: float(v[b, c]) for k, v in components.items()})
            candidates.append(entry)
        ok, has_rejected = bool(sel.valid[b]), int(sel.rejected[b]) >= 0
        rows.append(
            {
                "step": step,
                "doc_id": str(batch["doc_id"][b]) if "doc_id" in batch else None,
                "prefix": batch["prefix_text"][b],
                "suffix": batch["suffix_text"][b],
                "candidates": candidates,
                "chosen": int(sel.chosen[b]) if ok else None,
                "rejected": int(sel.rejected[b]) if has_rejected else None,
                "tie_best": bool(sel.tie_best[b]),
                "tie_worst": bool(sel.tie_worst[b]),
            }
        )
    return rows
