"""A rewriter that is a model: the rewrite of a suffix is a (stronger) model's own continuation of its prefix.

Self-Improving Pretraining's rewriter turns a suffix into a better one. With an LLM served behind a chat
API that is :class:`~lit_selfimprove.judges.LLMRewriter` (a prompt asking for the rewrite). A small or
base model cannot follow such instructions, but it can continue text: :class:`ModelRewriter` lets any
causal LM (a local folder, ``builtin:NAME``, a hub id) write its own continuation of the prefix - e.g.
SOAR's promoted student re-solving the question of a math document, which is what the SOAR -> SIP loop
uses. Greedy by default, so a rewrite is a function of the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ModelRewriter"]


class ModelRewriter:
    """Rewrites each suffix as ``model``'s continuation of its prefix.

    Args:
        model: the rewriting model (a Hugging Face folder, hub id or ``builtin:NAME``), loaded on first use.
        tokenizer: its tokenizer (default: ``model``'s).
        max_new_tokens: length limit of a rewrite in tokens (``None``: the token length of the suffix it
            replaces, at least 1).
        temperature: 0 is greedy (default); above 0 samples, seeded by ``seed``.
        batch_size: prefixes per generation call.
        dtype: the model's dtype (``float32`` on CPU).
        device: ``auto`` (CUDA when available) or a torch device string.
        seed: the sampling stream's seed (``temperature > 0``).
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        batch_size: int = 32,
        dtype: str = "float32",
        device: str = "auto",
        seed: int = 0,
    ):
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name, self.tokenizer_name = model, tokenizer or model
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        self.dtype, self.device, self.seed = dtype, device, seed
        self._model = self._tokenizer = self._generator = None

    def _load(self) -> None:
        from lit_selfimprove.modeling import load_causal_lm, load_tokenizer

        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        self._tokenizer = load_tokenizer(self.tokenizer_name)
        self._model = load_causal_lm(self.model_name, dtype=self.dtype).to(device).eval()
        self._model.requires_grad_(False)
        self._generator = torch.Generator(device=device).manual_seed(self.seed)

    def rewrite(self, prefixes: Sequence[str], suffixes: Sequence[str]) -> list[str]:
        """One rewrite per (prefix, suffix): the model's continuation of the prefix (EOS ends it)."""
        from lit_selfimprove.generation import generate

        if isinstance(prefixes, str) or isinstance(suffixes, str):
            raise TypeError("prefixes and suffixes must be sequences of strings, not a str")
        if len(prefixes) != len(suffixes):
            raise ValueError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes")
        if self._model is None:
            self._load()
        out: list[str] = []
        for i in range(0, len(prefixes), self.batch_size):
            chunk = list(prefixes[i : i + self.batch_size])
            budget = self.max_new_tokens or max(
                1,
                *(
                    len(self._tokenizer(s, add_special_tokens=False)["input_ids"])
                    for s in suffixes[i : i + self.batch_size]
                ),
            )
            ro = generate(
                self._model,
                self._tokenizer,
                chunk,
                max_new_tokens=budget,
                temperature=self.temperature,
                generator=self._generator,
                sync_ranks=False,  # a rewriter is per rank, like any judge
            )
            out += ro.texts
        return out
