"""Vendi score (Friedman & Dieng, 2023): the diversity of a set of texts as a torchmetrics ``Metric``.

The Vendi score of ``n`` items with unit-norm embeddings ``X`` is ``exp(H(λ))``, where ``λ`` are the
eigenvalues of the cosine-similarity kernel ``K = X X^T / n`` (they sum to 1) and ``H`` is the Shannon
entropy. It is the "effective number of distinct items": ``n`` identical items score 1, ``n`` mutually
orthogonal items score ``n``. SOAR reports Vendi scores of 128 teacher questions (base teacher ~34.9,
collapsed Intrinsic-T ~10.8), averaged over 100 bootstrap resamples.

Embeddings: :class:`HashingNgramEmbedding` (default; cheap, offline, character n-grams) or
:class:`SentenceEmbedding` (mean-pooled hidden states of any Hugging Face encoder, e.g.
``sentence-transformers/all-MiniLM-L6-v2``). Scores are only comparable under the same embedding.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["HashingNgramEmbedding", "SentenceEmbedding", "VendiScore", "vendi_score"]


def vendi_score(embeddings: Tensor) -> Tensor:
    """Vendi score of the rows of ``embeddings`` (shape ``[n, d]``) under the cosine-similarity kernel.

    Rows are L2-normalised, ``K = X X^T / n``, the eigenvalues of ``K`` (``eigvalsh`` in float64,
    negatives clamped to 0) give ``exp(-sum λ log λ)`` over ``λ > 0``. Returns a float64 scalar in
    ``[1, n]``. All-zero rows stay zero (their kernel diagonal is 0, not 1), so avoid them. Raises
    ``ValueError`` for an empty or non-2-D input.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"vendi_score: expected a 2-D [n, d] tensor, got shape {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    if n == 0 or embeddings.shape[1] == 0:
        raise ValueError("vendi_score: empty input")
    x = F.normalize(embeddings.detach().to(torch.float64), p=2, dim=1)
    k = (x @ x.T) / n
    k = (k + k.T) / 2  # exact symmetry for eigvalsh
    lam = torch.linalg.eigvalsh(k).clamp_min(0.0)
    lam = lam[lam > 0]
    return torch.exp(-(lam * torch.log(lam)).sum())


class HashingNgramEmbedding:
    """Bag of hashed character n-grams: a cheap, deterministic, offline text embedding.

    Every character n-gram of each text (``n`` in ``ngram[0]..ngram[1]``, inclusive) adds 1 to bucket
    ``zlib.crc32(gram) % dim`` (stable across processes, unlike Python's ``hash``). A text with no
    n-grams (e.g. the empty string) counts the whole text as one gram. ``__call__(texts)`` returns a
    float32 tensor ``[len(texts), dim]``.
    """

    def __init__(self, dim: int = 512, ngram: tuple[int, int] = (1, 3)) -> None:
        lo, hi = int(ngram[0]), int(ngram[1])
        if dim < 1:
            raise ValueError(f"HashingNgramEmbedding: dim must be >= 1, got {dim}")
        if lo < 1 or hi < lo:
            raise ValueError(f"HashingNgramEmbedding: need 1 <= ngram[0] <= ngram[1], got {ngram}")
        self.dim = int(dim)
        self.ngram = (lo, hi)

    def __call__(self, texts: list[str]) -> Tensor:
        out = torch.zeros(len(texts), self.dim, dtype=torch.float32)
        lo, hi = self.ngram
        for i, text in enumerate(texts):
            grams = [text[j : j + n] for n in range(lo, hi + 1) for j in range(len(text) - n + 1)]
            for gram in grams or [text]:
                out[i, zlib.crc32(gram.encode("utf-8")) % self.dim] += 1.0
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, ngram={self.ngram})"


class SentenceEmbedding:
    """Mean-pooled last hidden states of a Hugging Face encoder (``transformers.AutoModel``).

    The model and tokenizer are loaded lazily on the first call (``AutoModel.from_pretrained`` /
    ``AutoTokenizer.from_pretrained``; ``builtin:NAME`` and local folders work too), so constructing this
    object needs no network. Padding is forced to the right. Pooling is the attention-mask-weighted mean over tokens (as
    sentence-transformers does for ``all-MiniLM-L6-v2``). Returns a float32 CPU tensor ``[n, hidden]``.

    Args:
        model_name: hub id or local folder of an encoder and its tokenizer.
        device: torch device for the encoder.
        batch_size: texts per forward pass.
        max_length: truncation length in tokens.
    """

    def __init__(
        self,
        model_name: str = "sentence-transformers/all-MiniLM-L6-v2",
        device: str = "cpu",
        batch_size: int = 64,
        max_length: int = 256,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"SentenceEmbedding: batch_size must be >= 1, got {batch_size}")
        self.model_name = model_name
        self.device = device
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        from lit_selfimprove.assets import resolve

        path = resolve(self.model_name)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._tokenizer.padding_side = "right"  # encoders with absolute positions expect right padding
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token or self._tokenizer.unk_token
        self._model = AutoModel.from_pretrained(path).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> Tensor:
        if self._model is None:
            self._load()
        outs = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
            w = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp_min(1e-9)
            outs.append(pooled.float().cpu())
        if not outs:
            hidden_size = getattr(getattr(self._model, "config", None), "hidden_size", 0)
            return torch.zeros(0, hidden_size, dtype=torch.float32)
        return torch.cat(outs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_name={self.model_name!r}, device={self.device!r})"


class VendiScore(Metric):
    """Vendi score of all texts seen since the last reset.

    ``update(texts)`` embeds the texts with ``embedding`` and stores the embeddings (list state,
    ``dist_reduce_fx="cat"``, so DDP gathers them). ``compute()`` returns the Vendi score (float64
    scalar) of all stored texts, or with ``bootstrap > 0`` a dict ``{"vendi": mean, "vendi_std": std}``
    over ``bootstrap`` resamples with replacement of ``bootstrap_size`` texts (default: all), drawn
    with a ``torch.Generator`` seeded by ``seed`` (reproducible; ``std`` is the sample std, 0 for a
    single resample). Note that resampling with replacement duplicates texts, so the bootstrap mean is
    below the full-set score. SOAR uses 100 resamples.

    Args:
        embedding: ``embedding(texts) -> Tensor[n, d]``; default :class:`HashingNgramEmbedding`. In a
            jsonargparse config pass ``{"class_path": ..., "init_args": ...}``.
        bootstrap: number of bootstrap resamples (0: plain score).
        bootstrap_size: texts per resample (default: all stored texts).
        seed: seed of the bootstrap generator.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    embeddings: list[Tensor]

    def __init__(
        self,
        embedding: Callable | None = None,
        bootstrap: int = 0,
        bootstrap_size: int | None = None,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if bootstrap < 0:
            raise ValueError(f"VendiScore: bootstrap must be >= 0, got {bootstrap}")
        if bootstrap_size is not None and bootstrap_size < 1:
            raise ValueError(f"VendiScore: bootstrap_size must be >= 1, got {bootstrap_size}")
        self.embedding = embedding if embedding is not None else HashingNgramEmbedding()
        self.bootstrap = int(bootstrap)
        self.bootstrap_size = bootstrap_size
        self.seed = int(seed)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")

    def update(self, texts: list[str]) -> None:
        if isinstance(texts, str):
            raise TypeError("VendiScore.update expects a list of strings, got a single str")
        texts = list(texts)
        if not texts:
            return
        emb = torch.as_tensor(self.embedding(texts)).detach().to(device=self.device, dtype=torch.float32)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(
                f"VendiScore: embedding returned shape {tuple(emb.shape)} for {len(texts)} texts"
            )
        self.embeddings.append(emb)

    def compute(self) -> Tensor | dict[str, Tensor]:
        if isinstance(self.embeddings, list) and not self.embeddings:
            raise ValueError("VendiScore.compute: no texts were seen")
        x = dim_zero_cat(self.embeddings)
        if self.bootstrap == 0:
            return vendi_score(x)
        n = x.shape[0]
        size = self.bootstrap_size or n
        gen = torch.Generator().manual_seed(self.seed)
        scores = torch.stack(
            [
                vendi_score(x[torch.randint(0, n, (size,), generator=gen).to(x.device)])
                for _ in range(self.bootstrap)
            ]
        )
        std = (
            scores.std() if self.bootstrap > 1 else torch.zeros((), dtype=scores.dtype, device=scores.device)
        )
        return {"vendi": scores.mean(), "vendi_std": std}
