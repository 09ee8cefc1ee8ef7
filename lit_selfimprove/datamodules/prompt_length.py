"""Prompt length checks: problems whose prompt does not fit the model's context, refused or dropped up front.

A prompt longer than the model's ``max_position_embeddings`` does not fail where it is fed: a RoPE
model generates past its trained length (garbage, slowly: a 3,001-character question on a
256-position model ran a first step for minutes while memory grew by gigabytes). So the problems are
measured once, when both the data and the model are there (a module's ``on_fit_start``, the fail@k
tool before sampling): each prompt as the module renders it, tokenized as the sampler tokenizes it,
plus ``max_new_tokens``, against the model's context. ``too_long="error"`` (the default) raises
naming the first offending problem's file:line, its token count and the limit; ``"skip"`` drops
them and says how many were dropped and which was the longest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lightning.pytorch.utilities import rank_zero_warn

__all__ = [
    "TOO_LONG_MODES",
    "check_datamodule_prompts",
    "check_prompt_lengths",
    "check_too_long_mode",
    "max_positions",
    "prompt_token_counter",
]

TOO_LONG_MODES = ("error", "skip")
# config attributes that hold a model's context length, by model family
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_too_long_mode(too_long: str) -> None:
    """Fail at start-up for an unknown ``too_long`` setting."""
    if too_long not in TOO_LONG_MODES:
        raise ValueError(f"too_long must be one of {TOO_LONG_MODES}, got {too_long!r}")


def max_positions(model_or_config) -> int | None:
    """The context length of a model (or its config; a hub id / folder name loads the config only),
    ``None`` when the config does not say."""
    if isinstance(model_or_config, str):
        from transformers import AutoConfig

        from lit_selfimprove.assets import resolve_model

        model_or_config = AutoConfig.from_pretrained(resolve_model(model_or_config))
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "get_text_config", lambda: config)()  # multimodal configs: the text model's
    for name in _CONTEXT_ATTRS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_token_counter(tokenizer, render: Callable[[str], str]) -> Callable[[list[str]], list[int]]:
    """``questions -> prompt token counts``: each question rendered by ``render`` (the module's prompt
    template / chat template) and tokenized as the sampler tokenizes prompts (special tokens included)."""

    def count(questions: list[str]) -> list[int]:
        lengths: list[int] = []
        for i in range(0, len(questions), 512):  # bounded memory on large problem sets
            prompts = [render(q) for q in questions[i : i + 512]]
            lengths.extend(len(ids) for ids in tokenizer(prompts)["input_ids"])
        return lengths

    return count


def check_prompt_lengths(
    records: Sequence[dict],
    prompt_tokens: Callable[[list[str]], list[int]],
    max_positions: int,
    max_new_tokens: int,
    too_long: str = "error",
    origin: Callable[[dict], str] | None = None,
    what: str = "problems",
) -> list[dict]:
    """The records whose prompt plus ``max_new_tokens`` fits in ``max_positions``.

    ``too_long="error"`` raises ``ValueError`` at the first record that does not fit (``origin(record)``,
    e.g. ``file:line``, its prompt tokens, the budget and the limit, and how many more do not fit);
    ``"skip"`` drops them with a warning naming the count and the longest. Raises as well when
    nothing would be left, or when ``max_new_tokens`` alone fills the context.
    """
    check_too_long_mode(too_long)
    origin = origin or (lambda r: f"problem {r.get('id')!r}")
    if max_new_tokens >= max_positions:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"{max_positions} positions (max_position_embeddings): lower max_new_tokens"
        )
    if not records:
        return []
    lengths = prompt_tokens([r["question"] for r in records])
    over = [i for i, n in enumerate(lengths) if n + max_new_tokens > max_positions]
    if not over:
        return list(records)
    room = max_positions - max_new_tokens
    first, longest = over[0], max(over, key=lambda i: lengths[i])
    if too_long == "error":
        more = (
            f"; {len(over) - 1} more of the {len(records)} {what} do not fit either" if len(over) > 1 else ""
        )
        raise ValueError(
            f"{origin(records[first])}: the prompt is {lengths[first]} tokens; with max_new_tokens="
            f"{max_new_tokens} that is {lengths[first] + max_new_tokens} positions, over the model's "
            f"max_position_embeddings={max_positions} (prompts may have at most {room} tokens){more}. "
            "Shorten or remove such problems, lower max_new_tokens, or set too_long to skip "
            "(--too-long skip for the tools) to drop them"
        )
    dropped = set(over)
    kept = [r for i, r in enumerate(records) if i not in dropped]
    if not kept:
        raise ValueError(
            f"every one of the {len(records)} {what} has a prompt over {room} tokens "
            f"(max_position_embeddings={max_positions} minus max_new_tokens={max_new_tokens}; the longest, "
            f"{origin(records[longest])}, is {lengths[longest]} tokens): nothing is left to use"
        )
    rank_zero_warn(
        f"skipped {len(over)} of {len(records)} {what} whose prompt + max_new_tokens={max_new_tokens} "
        f"does not fit the model's {max_positions} positions (longest: {origin(records[longest])}, "
        f"{lengths[longest]} prompt tokens)"
    )
    return kept


def check_datamodule_prompts(
    trainer,
    tokenizer,
    render: Callable[[str], str],
    model,
    max_new_tokens: int,
    eval_max_new_tokens: int | None = None,
) -> None:
    """At fit start: let the trainer's DataModule check (error) or drop (skip) its problems whose
    prompt does not fit ``model``'s context. A no-op for DataModules without
    ``check_prompt_lengths`` (e.g. generated problems, user DataModules) and for a model whose
    config names no context length."""
    dm = getattr(trainer, "datamodule", None)
    limit = max_positions(model)
    if dm is None or not hasattr(dm, "check_prompt_lengths") or limit is None:
        return
    dm.check_prompt_lengths(
        prompt_token_counter(tokenizer, render), limit, max_new_tokens, eval_max_new_tokens
    )
