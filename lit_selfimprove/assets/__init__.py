"""Bundled tiny assets: a character-level tokenizer and tiny Llama student / teacher bases.

They are built by the project itself (``python -m lit_selfimprove.world build``, see
``configs/tiny/pretrain_*.yaml``) and shipped inside the package so that the embedded tiny
default runs without any network. Refer to them from configs as ``builtin:tiny-student``,
``builtin:tiny-teacher`` and ``builtin:tiny-tokenizer``.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
BUILTIN_PREFIX = "builtin:"
BUILTINS = {
    "tiny-tokenizer": ASSETS_DIR / "tiny-tokenizer",
    "tiny-student": ASSETS_DIR / "tiny-student",
    "tiny-teacher": ASSETS_DIR / "tiny-teacher",
    "tiny-hard-set": ASSETS_DIR / "tiny-hard" / "hard.jsonl",
    "tiny-hard-train": ASSETS_DIR / "tiny-hard" / "hard.train.jsonl",
    "tiny-hard-test": ASSETS_DIR / "tiny-hard" / "hard.test.jsonl",
    "tiny-strict-set": ASSETS_DIR / "tiny-hard" / "strict.jsonl",
    "tiny-strict-train": ASSETS_DIR / "tiny-hard" / "strict.train.jsonl",
    "tiny-strict-test": ASSETS_DIR / "tiny-hard" / "strict.test.jsonl",
    "tiny-facts": ASSETS_DIR / "tiny-facts" / "corpus.jsonl",
    "tiny-sip-policy": ASSETS_DIR / "tiny-sip-policy",
    # a SOAR run's curriculum: the PQ file and teacher samples of the main job (configs/tiny/soar.yaml,
    # seed 0, 20 outer steps); the SOAR -> SIP config's default corpus (soar:builtin:tiny-soar)
    "tiny-soar": ASSETS_DIR / "tiny-soar",
}

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def resolve(name_or_path: str) -> str:
    """Map ``builtin:NAME`` to the bundled asset's path; anything else is returned unchanged."""
    if isinstance(name_or_path, str) and name_or_path.startswith(BUILTIN_PREFIX):
        key = name_or_path[len(BUILTIN_PREFIX) :]
        if key not in BUILTINS:
            raise ValueError(f"unknown builtin asset {key!r}; available: {sorted(BUILTINS)}")
        path = BUILTINS[key]
        if not path.exists():
            raise FileNotFoundError(
                f"builtin asset {key!r} is missing at {path}; rebuild it with `python -m lit_selfimprove.world build`"
            )
        return str(path)
    return name_or_path


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` is a filesystem path rather than a hub id (``org/name``, at most one ``/``)."""
    s = name.replace(os.sep, "/")
    return os.path.isabs(name) or s.startswith(("/", "./", "../", "~")) or s.count("/") > 1


def resolve_model(name_or_path: str) -> str:
    """:func:`resolve` for a model or tokenizer, with ``~`` expanded; ``gguf:SPEC`` is converted to a
    Hugging Face folder once and that folder's path returned (:mod:`lit_selfimprove.gguf`).

    Raises:
        FileNotFoundError: When ``name_or_path`` is a local path that does not exist (instead of the
            hub's "Repo id must be in the form ..." error).
    """
    from lit_selfimprove.gguf import resolve_gguf

    path = resolve(resolve_gguf(str(name_or_path)))  # a pathlib.Path too
    if looks_like_local_path(path):
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"model/tokenizer path {name_or_path!r} does not exist locally (hub ids look like "
                "'org/name'; the bundled tiny ones are 'builtin:tiny-student', 'builtin:tiny-teacher')"
            )
    return path


def build_char_tokenizer():
    """A character-level Hugging Face tokenizer over printable ASCII (built with `tokenizers`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=512,
    )
