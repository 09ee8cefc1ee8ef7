"""What real crawls hold and the prefix -> suffix stream must survive: invalid UTF-8, a huge document, empty
and whitespace-only documents, and a mistyped local path (lit_selfimprove.datamodules.prefix_suffix).

Everything is written into ``tmp_path``; nothing is read from the network.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_selfimprove.datamodules import prefix_suffix
from lit_selfimprove.datamodules.prefix_suffix import PrefixSuffixDataModule, PrefixSuffixDataset
from lit_selfimprove.datamodules.prefix_suffix.chunking import text_pieces
from lit_selfimprove.modeling import load_tokenizer
from tests.helpers import REPO

TOK = "builtin:tiny-tokenizer"
WORDS = "the quick brown fox jumps over the lazy dog. "


def _ds(sources, **kw) -> PrefixSuffixDataset:
    args = {
        "tokenizer": TOK,
        "suffix_tokens": 32,
        "context_length": 128,
        "min_prefix_tokens": 16,
        "splits": {"all": 1.0},
        "split": "all",
    }
    args.update(kw)
    return PrefixSuffixDataset(sources, **args)


def _firsts(ds: PrefixSuffixDataset) -> list[str]:
    """The first word of each document the stream cuts (one chunk per document)."""
    return [(it["prefix_text"].split() or ["<whitespace>"])[0] for it in ds]


# ----------------------------------------------------------------------------------------------------------
# invalid UTF-8
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".jsonl", ".jsonl.zst", ".jsonl.gz"])
def test_invalid_utf8_spoils_one_record_not_the_stream(tmp_path: Path, ext: str) -> None:
    import zstandard

    lines = [json.dumps({"text": f"doc{i} " + WORDS * 4}).encode() for i in range(4)]
    lines[1] = lines[1].replace(b"quick", b"qu\xffck", 1)  # a Latin-1 byte in the middle of a JSON string
    data = b"".join(line + b"\n" for line in lines)
    path = tmp_path / f"crawl{ext}"
    compress = {
        ".jsonl": bytes,
        ".jsonl.zst": zstandard.ZstdCompressor().compress,
        ".jsonl.gz": gzip.compress,
    }
    path.write_bytes(compress[ext](data))

    with pytest.raises(
        ValueError, match=rf"crawl{re.escape(ext)}: malformed record at line 2: invalid UTF-8 "
    ):
        list(_ds(str(path), max_chunks_per_doc=1))
    ds = _ds(str(path), max_chunks_per_doc=1, skip_malformed=True)
    assert _firsts(ds) == ["doc0", "doc2", "doc3"] and ds.stats["malformed"] == 1
    # decoded per record: the slot that does not own line 2 never decodes it
    assert _firsts(_ds(str(path), max_chunks_per_doc=1, rank=0, world_size=2)) == ["doc0", "doc2"]


def test_invalid_utf8_in_a_txt_file_names_its_line(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("good\n" + WORDS * 2 + "\n" + WORDS * 2, encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"bad\nsecond line\n" + WORDS.encode() * 4 + b"\ncaf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"bad\.txt: malformed record at line 4: invalid UTF-8 \(byte 0xe9"):
        list(_ds(str(bad)))
    ds = _ds([str(bad), str(good)], max_chunks_per_doc=1, skip_malformed=True)
    assert _firsts(ds) == ["good"] and ds.stats["malformed"] == 1
    # a .txt file is still read with universal newlines: CRLF gives the same chunks as LF
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(good.read_bytes().replace(b"\n", b"\r\n"))
    assert [it["suffix_text"] for it in _ds(str(crlf))] == [it["suffix_text"] for it in _ds(str(good))]


# ----------------------------------------------------------------------------------------------------------
# long documents
# ----------------------------------------------------------------------------------------------------------

# One 10 MB document took 4.4 GB in one tokenizer call (~440 bytes a character), so this 5 MB one took
# ~2 GB; tokenized in pieces it adds ~75 MB (the text's copies and a 4-byte-per-token array). 5 MB, not more,
# keeps the test short: the char tokenizer needs 1-2 s per MB.
HUGE_DOC_CHARS = 5_000_000
MAX_RSS_GROWTH_MB = 300

_SUBPROCESS_HUGE_DOC = """
import json, resource, sys
from lit_selfimprove.datamodules.prefix_suffix import PrefixSuffixDataset
from lit_selfimprove.modeling import load_tokenizer

tok = load_tokenizer("builtin:tiny-tokenizer")
kw = dict(tokenizer=tok, splits={"all": 1.0}, split="all", suffix_tokens=32, context_length=128,
          min_prefix_tokens=16, split_mode="random", max_chunks_per_doc=2)
list(PrefixSuffixDataset(sys.argv[1], **kw))  # warm up: the tokenizer, the code paths
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
items = list(PrefixSuffixDataset(sys.argv[2], **kw))
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
chunks = [[it["suffix_start"], it["suffix_text"]] for it in items]
print(json.dumps({"growth_mb": growth / 1024, "chunks": chunks}))
"""


def test_a_huge_document_is_tokenized_in_bounded_memory(tmp_path: Path) -> None:
    text = (WORDS * (HUGE_DOC_CHARS // len(WORDS) + 1))[:HUGE_DOC_CHARS]
    (tmp_path / "huge.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    (tmp_path / "small.jsonl").write_text(json.dumps({"text": WORDS * 20}) + "\n", encoding="utf-8")
    proc = subprocess.run(  # a fresh process: its peak resident memory is this document's
        [
            sys.executable,
            "-c",
            _SUBPROCESS_HUGE_DOC,
            str(tmp_path / "small.jsonl"),
            str(tmp_path / "huge.jsonl"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["growth_mb"] < MAX_RSS_GROWTH_MB, out["growth_mb"]
    # the chunks (random ones, anywhere in the document) are still exact: the char tokenizer maps the
    # document's characters one to one
    assert len(out["chunks"]) == 2
    for start, suffix_text in out["chunks"]:
        assert suffix_text == text[start : start + 32]


def _byte_level_bpe(corpus: str):
    """A small GPT-2-style byte-level BPE tokenizer trained on ``corpus`` (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


@pytest.mark.parametrize("kind", ["char", "byte-level BPE"])
def test_tokenizing_in_pieces_equals_one_call(tmp_path: Path, kind: str) -> None:
    parts = [
        WORDS * 3,
        "double  spaces and\ttabs\n\nparagraphs\n\n\nthree newlines ",
        "x" * 150,  # longer than a piece: cut inside the word
        " <eos> literal special-token text, digits 12345 67890, " + "tail words " * 5,
        "y" * 62 + "\n\n" + "z" * 80,  # a hard cut that would fall inside the newline run
        " héllo wörld, naïve café " * 3,
    ]
    if kind != "char":  # cuts inside a word (parts 2 and 4) may change a BPE tokenization: left out
        parts = [p for i, p in enumerate(parts) if i not in (2, 4)]
    text = "".join(parts) * 4
    tok = load_tokenizer(TOK) if kind == "char" else _byte_level_bpe(text)
    expected = tok(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    path = tmp_path / "doc.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    items = list(_ds(str(path), tokenizer=tok, min_suffix_tokens=1, piece_chars=64))  # ~80 pieces, not one
    got = torch.cat([items[0]["prefix_ids"], *(it["suffix_ids"] for it in items)]).tolist()
    assert got == list(expected)


def test_piece_chars_is_checked() -> None:
    with pytest.raises(ValueError, match="piece_chars must be >= 1"):
        _ds("doc.jsonl", piece_chars=0)


def test_text_pieces_cut_between_words() -> None:
    text = ("alpha beta  gamma\n\ndelta\tepsilon " * 20) + "w" * 300 + " end" + "v" * 63 + "\n\n" + "u" * 70
    pieces = list(text_pieces(text, 64))
    assert "".join(pieces) == text and all(0 < len(p) <= 64 for p in pieces)
    cuts = [sum(map(len, pieces[:i])) for i in range(1, len(pieces))]
    for cut in cuts:
        assert not (text[cut - 1].isspace() and text[cut].isspace()), cut  # never inside a whitespace run
        if cut < 20 * 34:  # the part with words: before a single space between two words
            assert text[cut] == " " and not text[cut - 1].isspace() and not text[cut + 1].isspace(), cut


# ----------------------------------------------------------------------------------------------------------
# empty documents
# ----------------------------------------------------------------------------------------------------------


def test_empty_and_whitespace_only_documents_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        {"text": "first " + WORDS * 4},
        {"text": ""},
        {"text": " \n\t " * 40},  # 160 characters: long enough to be cut
        {"text": "\u3000\u00a0\u2028 " * 40},  # Unicode whitespace
        {"text": "second " + WORDS * 4},
    ]
    path = tmp_path / "crawl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "blank.txt").write_text("\n\n   \n", encoding="utf-8")
    ds = _ds([str(path), str(tmp_path / "blank.txt")], max_chunks_per_doc=1)
    with caplog.at_level(logging.INFO, logger=prefix_suffix.__name__):
        assert _firsts(ds) == ["first", "second"]
    assert ds.stats["empty"] == 4 and ds.stats["documents"] == 2 and ds.stats["malformed"] == 0
    assert "'empty': 4" in caplog.text  # the end-of-epoch stats log
    assert [d["text"].split()[0] for d in ds.iter_documents()] == ["first", "second"]
    # nothing but empty documents: the error says so
    dm = PrefixSuffixDataModule(
        str(tmp_path / "blank.txt"), tokenizer=TOK, suffix_tokens=32, context_length=128, min_prefix_tokens=16
    )
    with pytest.raises(ValueError, match=r"no 'policy' chunks.*1 empty or whitespace-only"):
        next(iter(dm.train_dataloader()))


# ----------------------------------------------------------------------------------------------------------
# mistyped local paths
# ----------------------------------------------------------------------------------------------------------


class _FakeHubStream:
    """Stands in for a streamed hub dataset (``.iter(batch_size)`` yields column batches)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def iter(self, batch_size: int):
        for i in range(0, len(self.texts), batch_size):
            yield {"text": self.texts[i : i + batch_size]}


def test_missing_local_paths_fail_fast_and_hub_ids_go_to_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append(path)
        return _FakeHubStream(["hub " + WORDS * 4])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in (
        "data/hard.jsnol",  # the reported typo: tried as a hub id before
        "data/hard.jsonl",
        "hard.json",
        "corpus.jsonl.zst",
        str(tmp_path / "crawl" / "part-0"),
        "./crawl",
        "~/no-such-corpus-dir",
        "data/sub/part-0",
    ):
        with pytest.raises(FileNotFoundError, match=re.escape(repr(name))):
            PrefixSuffixDataModule(None, hf_name=name, tokenizer=TOK)
        with pytest.raises(FileNotFoundError, match=re.escape(repr(name))):
            list(_ds(None, hf_name=name))
    assert calls == []  # failed before the hub loader was called
    # as a source: no "pass it as hf_name" hint for a path that looks local
    with pytest.raises(FileNotFoundError, match="source not found: 'data/hard.jsnol'$"):
        _ds("data/hard.jsnol")
    with pytest.raises(FileNotFoundError, match="pass it as hf_name='cerebras/SlimPajama-627B'"):
        _ds("cerebras/SlimPajama-627B")
    # hub ids (dots and digits in the name included) still reach the hub loader
    for hub_id in ("cerebras/SlimPajama-627B", "mlfoundations/dclm-baseline-1.0", "wikitext"):
        assert _firsts(_ds(None, hf_name=hub_id, max_chunks_per_doc=1)) == ["hub"]
    assert calls == ["cerebras/SlimPajama-627B", "mlfoundations/dclm-baseline-1.0", "wikitext"]
