"""Tests of the prefix -> suffix stream (lit_selfimprove.datamodules.prefix_suffix) for Self-Improving Pretraining.

Most tests read the real RedPajama sample in ``../shared/data/redpajama_sample`` (the first lines of each
domain file, copied to a temporary folder, because tokenizing the whole sample with the char-level tokenizer
takes ~10 s) and skip when it is absent; format and error tests write small files into ``tmp_path``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_selfimprove.datamodules.prefix_suffix import (
    DEFAULT_SPLITS,
    PrefixSuffixDataModule,
    PrefixSuffixDataset,
    assign_split,
    collate_prefix_suffix,
)
from tests.helpers import REPO, SHARED_DATA, tiny_trainer, write_jsonl

RP = SHARED_DATA / "redpajama_sample"
TOK = "builtin:tiny-tokenizer"
N, CTX, MIN_PREFIX = 32, 128, 16
BATCH_KEYS = {
    "prefix_ids",
    "prefix_mask",
    "suffix_ids",
    "suffix_mask",
    "prefix_text",
    "suffix_text",
    "doc_id",
    "suffix_start",
}
# Lines taken from each domain file of the sample for the chunk-level tests.
SMALL_COUNTS = {
    "sample_c4-rp1.jsonl": 120,
    "sample_stackexchange2.jsonl": 60,
    "sample_github2.jsonl": 20,
    "sample_arxiv2.jsonl": 2,
    "sample_wiki2.jsonl": 2,
    "sample_cc1.jsonl": 3,
}


@pytest.fixture(scope="session")
def rp_dir() -> Path:
    if not RP.is_dir():
        pytest.skip(f"shared RedPajama sample missing: {RP} (expected shared/ as a sibling of the repo root)")
    return RP


@pytest.fixture(scope="session")
def rp_small(rp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first lines of each domain file of the real sample, under the same file names."""
    out = tmp_path_factory.mktemp("rp_small")
    for name, n in SMALL_COUNTS.items():
        with (rp_dir / name).open(encoding="utf-8") as fh:
            (out / name).write_text("".join(islice(fh, n)), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def c4_tiny(rp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """25 real C4 documents: small enough that a few dozen batches cycle through several epochs."""
    path = tmp_path_factory.mktemp("c4_tiny") / "sample_c4-rp1.jsonl"
    with (rp_dir / "sample_c4-rp1.jsonl").open(encoding="utf-8") as fh:
        path.write_text("".join(islice(fh, 25)), encoding="utf-8")
    return path


def _docs_by_id(*paths: Path) -> dict[str, str]:
    docs = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            text = json.loads(line)["text"]
            docs[hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]] = text
    return docs


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def _decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _dm(sources, **kw) -> PrefixSuffixDataModule:
    args = {
        "tokenizer": TOK,
        "suffix_tokens": N,
        "context_length": CTX,
        "min_prefix_tokens": MIN_PREFIX,
        "batch_size": 4,
        "shuffle_buffer_size": 0,
    }
    args.update(kw)
    return PrefixSuffixDataModule(sources, **args)


def _ds(sources, **kw) -> PrefixSuffixDataset:
    args = {
        "tokenizer": TOK,
        "suffix_tokens": N,
        "context_length": CTX,
        "min_prefix_tokens": MIN_PREFIX,
        "splits": {"all": 1.0},
        "split": "all",
    }
    args.update(kw)
    return PrefixSuffixDataset(sources, **args)


def _keys(batches) -> list[tuple]:
    """Chunk identities of a list of batches, in order."""
    return [
        (d, int(s), p, t)
        for b in batches
        for d, s, p, t in zip(b["doc_id"], b["suffix_start"], b["prefix_text"], b["suffix_text"])
    ]


# ----------------------------------------------------------------------------------------------------------
# chunks
# ----------------------------------------------------------------------------------------------------------


def test_batches_are_padded_contiguous_spans_of_real_documents(rp_small: Path, tok) -> None:
    c4 = rp_small / "sample_c4-rp1.jsonl"
    docs = _docs_by_id(c4)
    batches = list(islice(iter(_dm(str(c4), batch_size=8).train_dataloader()), 12))
    pad = tok.pad_token_id
    n_raw_checked = n_full_prefix = 0
    last_start: dict[str, int] = {}
    for b in batches:
        assert set(b) == BATCH_KEYS  # the stream position tag never reaches the consumer
        bsz, p_len = b["prefix_ids"].shape
        assert bsz == 8 and p_len <= CTX - N and b["prefix_mask"].shape == (8, p_len)
        assert b["suffix_ids"].shape == b["suffix_mask"].shape == (8, N)
        assert b["prefix_ids"].dtype == b["suffix_mask"].dtype == torch.long
        assert bool(b["suffix_mask"].all())  # full chunks only by default
        for i in range(bsz):
            mask = b["prefix_mask"][i]
            n_p = int(mask.sum())
            assert torch.equal(mask[p_len - n_p :], torch.ones(n_p, dtype=torch.long))  # LEFT padded
            assert bool((b["prefix_ids"][i, : p_len - n_p] == pad).all())
            ids = _encode(tok, docs[b["doc_id"][i]])
            s = int(b["suffix_start"][i])
            assert s >= MIN_PREFIX and (s - MIN_PREFIX) % N == 0  # fixed grid
            assert n_p == min(s, CTX - N)
            n_full_prefix += n_p == CTX - N
            assert b["prefix_ids"][i, p_len - n_p :].tolist() == ids[s - n_p : s]
            assert b["suffix_ids"][i].tolist() == ids[s : s + N]
            assert b["prefix_text"][i] == _decode(tok, ids[s - n_p : s])
            assert b["suffix_text"][i] == _decode(tok, ids[s : s + N])
            span = b["prefix_text"][i] + b["suffix_text"][i]
            assert span == _decode(tok, ids[s - n_p : s + N]) and span in _decode(tok, ids)
            if tok.unk_token_id not in ids:  # every character is in the vocabulary: the raw text itself
                assert span in docs[b["doc_id"][i]]
                n_raw_checked += 1
            doc_id = b["doc_id"][i]
            if doc_id in last_start:  # without a shuffle buffer a document's chunks come in order
                assert s == last_start[doc_id] + N
            last_start[doc_id] = s
    assert n_raw_checked > 20 and n_full_prefix > 10


def test_random_split_points_short_documents_and_tail_chunks(rp_small: Path, tmp_path: Path, tok) -> None:
    c4 = str(rp_small / "sample_c4-rp1.jsonl")

    def starts(ds) -> list[tuple[str, int]]:
        return [(it["doc_id"], it["suffix_start"]) for it in islice(iter(ds), 150)]

    rand = starts(_ds(c4, split_mode="random", seed=3, max_chunks_per_doc=2))
    assert rand == starts(_ds(c4, split_mode="random", seed=3, max_chunks_per_doc=2))  # deterministic
    assert rand != starts(_ds(c4, split_mode="random", seed=4, max_chunks_per_doc=2))
    offsets = {(s - MIN_PREFIX) % N for _, s in rand}
    assert len(offsets) > 5  # not the fixed grid
    per_doc: dict[str, list[int]] = {}
    for d, s in rand:
        per_doc.setdefault(d, []).append(s)
    assert max(len(v) for v in per_doc.values()) == 2
    for v in per_doc.values():  # one random phase per document: chunk starts differ by multiples of N
        assert all((x - v[0]) % N == 0 for x in v) and v == sorted(v)
    # every epoch draws new split points (deterministically)
    kw = {"split_mode": "random", "seed": 3, "max_chunks_per_doc": 2}
    one_pass = [(it["doc_id"], it["suffix_start"]) for it in _ds(c4, **kw)]
    two = [
        (it["doc_id"], it["suffix_start"])
        for it in islice(iter(_ds(c4, repeat=True, **kw)), 2 * len(one_pass))
    ]
    assert two[: len(one_pass)] == one_pass
    epoch1 = two[len(one_pass) :]
    assert {d for d, _ in epoch1} <= {d for d, _ in one_pass} and epoch1 != one_pass[: len(epoch1)]

    # too short documents are skipped and counted; a tail >= min_suffix_tokens is kept and right-padded
    path = write_jsonl(
        tmp_path / "docs.jsonl",
        [{"text": "too short"}, {"text": "abcdefghij" * 9 + " end <eos> of <pad> text"}],  # 114 chars
    )
    ds = _ds(str(path), min_suffix_tokens=8)
    items = list(ds)
    assert ds.stats["too_short"] == 1 and ds.stats["documents"] == 1
    assert [it["suffix_start"] for it in items] == [16, 48, 80]  # 114 - 112 = 2 < 8: no tail at 112
    tail_ds = _ds(str(path), min_suffix_tokens=2)
    tail = list(tail_ds)[-1]
    assert tail["suffix_start"] == 112 and len(tail["suffix_ids"]) == 2 and tail["suffix_text"] == "xt"
    batch = collate_prefix_suffix(list(tail_ds), tok.pad_token_id, suffix_len=N)
    assert batch["suffix_mask"][-1].tolist() == [1, 1] + [0] * (N - 2)  # RIGHT padded
    assert batch["suffix_ids"][-1, 2:].eq(tok.pad_token_id).all()
    # literal special-token text is ordinary text, never a control token
    all_ids = torch.cat([it["suffix_ids"] for it in list(tail_ds)])
    assert tok.eos_token_id not in all_ids.tolist() and tok.pad_token_id not in all_ids.tolist()
    assert any("<eos>" in it["prefix_text"] + it["suffix_text"] for it in items)


# ----------------------------------------------------------------------------------------------------------
# splits and the metadata filter
# ----------------------------------------------------------------------------------------------------------

_SUBPROCESS_SPLITS = """
import json, sys
from lit_selfimprove.datamodules.prefix_suffix import PrefixSuffixDataset
ds = PrefixSuffixDataset(sys.argv[1], tokenizer="builtin:tiny-tokenizer")
print(json.dumps({d["doc_id"]: d["split"] for d in ds.iter_documents(all_splits=True)}))
"""


def test_splits_are_disjoint_deterministic_and_match_fractions(rp_dir: Path, rp_small: Path) -> None:
    c4 = rp_dir / "sample_c4-rp1.jsonl"
    env = {**os.environ, "PYTHONHASHSEED": "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"}
    proc = subprocess.Popen(  # started first: it runs while the in-process checks do
        [sys.executable, "-c", _SUBPROCESS_SPLITS, str(c4)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    files = sorted(str(p) for p in rp_dir.glob("sample_*.jsonl"))
    docs = list(_ds(files, splits=None, split="policy").iter_documents(all_splits=True))
    assert len(docs) == 2131  # 2132 records; the third arxiv one is a lone newline (dropped as empty)
    by_split: dict[str, set[str]] = {}
    for d in docs:
        by_split.setdefault(d["split"], set()).add(d["doc_id"])
    assert set(by_split) == set(DEFAULT_SPLITS)  # the default fractions sum to 1: every document has a split
    names = list(by_split)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not by_split[a] & by_split[b], (a, b)
    counts = {s: sum(d["split"] == s for d in docs) for s in DEFAULT_SPLITS}
    for name, frac in DEFAULT_SPLITS.items():
        assert abs(counts[name] / len(docs) - frac) < 0.03, counts
    # independent of source order, and equal to what iterating one split yields
    reordered = {
        d["doc_id"]: d["split"]
        for d in _ds(list(reversed(files)), splits=None, split="judge").iter_documents(all_splits=True)
    }
    assert reordered == {d["doc_id"]: d["split"] for d in docs}
    judge = {d["doc_id"] for d in _ds(files, splits=None, split="judge").iter_documents()}
    assert judge == by_split["judge"]
    assert all(assign_split(d["text"]) == d["split"] for d in docs[:200])
    salted = _ds(str(c4), splits=None, split="policy", split_salt="x").iter_documents(all_splits=True)
    assert sum(d["split"] != reordered[d["doc_id"]] for d in salted) > 100  # the salt draws another partition
    # training chunks come from the policy split only, validation chunks from the eval split only
    dm = _dm(str(rp_small), num_val_prefixes=10)
    train_ids = {d for b in islice(iter(dm.train_dataloader()), 10) for d in b["doc_id"]}
    val_ids = {d for b in dm.val_dataloader() for d in b["doc_id"]}
    assert train_ids <= by_split["policy"] and val_ids <= by_split["eval"] and train_ids and val_ids
    # another PYTHONHASHSEED in another process: the same assignment
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    sub = json.loads(out.strip().splitlines()[-1])
    assert len(sub) == 1000 and all(reordered[k] == v for k, v in sub.items())


def test_meta_filter_on_the_redpajama_sample(rp_dir: Path, rp_small: Path) -> None:
    def sources_of(meta_filter) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in _ds(str(rp_dir), meta_filter=meta_filter).iter_documents():
            counts[d["source_name"]] = counts.get(d["source_name"], 0) + 1
        return counts

    # the set name inferred from the file names (SlimPajama's key) works across all domains
    assert sources_of({"redpajama_set_name": ["RedPajamaC4", "RedPajamaStackExchange"]}) == {
        "sample_c4-rp1": 1000,
        "sample_stackexchange2": 1000,
    }
    assert sources_of({"redpajama_set_name": "RedPajamaBook"}) == {"sample_book2": 2}
    assert sources_of({"meta.source": "github"}) == {"sample_github2": 100}  # dotted path from the root
    assert sources_of({"source": "cc/*"}) == {"sample_cc1": 10}  # cc has no meta: top-level field, pattern
    assert sources_of({"language": "bg"}) == {"sample_wiki2": 10}  # a key inside meta
    # 9 of 10: the third arxiv record's text is a lone newline (dropped as empty)
    assert sources_of({"source_name": "sample_arxiv2", "language": "en"}) == {"sample_arxiv2": 9}
    # at chunk level
    se_ids = {
        d["doc_id"]
        for d in _ds(
            str(rp_small), meta_filter={"redpajama_set_name": "RedPajamaStackExchange"}
        ).iter_documents()
    }
    dm = _dm(str(rp_small), meta_filter={"redpajama_set_name": "RedPajamaStackExchange"})
    got = {d for b in islice(iter(dm.train_dataloader()), 5) for d in b["doc_id"]}
    assert got and got <= se_ids
    # nothing left after filtering: a clear error
    dm = _dm(str(rp_small), meta_filter={"redpajama_set_name": "RedPajamaNothing"})
    with pytest.raises(ValueError, match=r"no 'policy' chunks.*\d+ removed by meta_filter"):
        next(iter(dm.train_dataloader()))


# ----------------------------------------------------------------------------------------------------------
# sources and errors
# ----------------------------------------------------------------------------------------------------------


def test_local_file_formats_folders_and_globs(tmp_path: Path) -> None:
    import zstandard

    words = "the quick brown fox jumps over the lazy dog "
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_jsonl(data / "a.jsonl", [{"text": "a0 " + words * 3}, "", {"text": "a1 " + words * 3}])
    zst_docs = [json.dumps({"text": f"z{i} " + words * 3}) + "\n" for i in range(3)]
    with (data / "b.jsonl.zst").open("wb") as fh:  # two zstd frames: read across frames
        fh.write(zstandard.ZstdCompressor().compress("".join(zst_docs[:2]).encode()))
        fh.write(zstandard.ZstdCompressor().compress(zst_docs[2].encode()))
    with gzip.open(data / "sub" / "d.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "d0 " + words * 3}) + "\n")
    (data / "sub" / "c.txt").write_text("first paragraph " + words + "\n\nsecond paragraph " + words, "utf-8")
    (data / "notes.csv").write_text("ignored", encoding="utf-8")

    def texts(sources) -> list[str]:
        return [d["text"][:2] for d in _ds(sources).iter_documents()]

    assert texts(str(data)) == ["a0", "a1", "z0", "z1", "z2", "fi", "d0"]  # sorted paths, recursive
    assert texts(str(data / "*.jsonl*")) == ["a0", "a1", "z0", "z1", "z2"]
    assert texts(str(data / "**" / "*.txt")) == ["fi"]
    assert texts([str(data / "b.jsonl.zst"), str(data / "a.jsonl"), str(data / "*.jsonl")]) == [
        "z0",
        "z1",
        "z2",
        "a0",
        "a1",
    ]  # in the given order, each file once
    # a .txt file is one document: chunks span the blank line between its paragraphs
    items = list(_ds(str(data / "sub" / "c.txt"), min_prefix_tokens=40, suffix_tokens=24))
    assert len({it["doc_id"] for it in items}) == 1 and len(items) == 3
    assert "first paragraph" in items[-1]["prefix_text"] and "second paragraph" in items[-1]["prefix_text"]
    zst_items = list(_ds(str(data / "b.jsonl.zst")))
    assert {it["prefix_text"][:2] for it in zst_items} == {"z0", "z1", "z2"}
    # id_field / text_field
    write_jsonl(tmp_path / "ids.jsonl", [{"body": {"t": words * 3}, "meta": json.dumps({"id": "doc-7"})}])
    (item,) = list(
        _ds(str(tmp_path / "ids.jsonl"), text_field="body.t", id_field="meta.id", max_chunks_per_doc=1)
    )
    assert item["doc_id"] == "doc-7"  # meta given as a JSON string is parsed


def test_clear_errors(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "x" * 200}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "y" * 200}, "{not json", {"txt": "z"}, {"text": 3}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: malformed record at line 2: invalid JSON"):
        list(_ds(str(bad)))
    with pytest.raises(ValueError, match=r"bad\.jsonl: malformed record at line 3: no text field 'text'"):
        list(_ds(str(bad), rank=0, world_size=2))  # rank 0 reads lines 1 and 3 only
    ds = _ds(str(bad), skip_malformed=True)
    assert len(list(ds)) > 0 and ds.stats["malformed"] == 3
    with pytest.raises(ValueError, match=r"no id field 'id'"):
        list(_ds(str(good), id_field="id"))
    with pytest.raises(FileNotFoundError, match="source not found"):
        _dm(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="hf_name='cerebras/SlimPajama-627B'"):
        _dm("cerebras/SlimPajama-627B")
    with pytest.raises(FileNotFoundError, match="no .* file matches"):
        _dm(str(tmp_path / "*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        _dm(str(tmp_path / "empty"))
    (tmp_path / "x.csv").write_text("a", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported source file"):
        _dm(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="no source given"):
        _dm(None)
    with pytest.raises(ValueError, match="must be < context_length"):
        _dm(str(good), suffix_tokens=128, context_length=128)
    with pytest.raises(ValueError, match="min_prefix_tokens"):
        _dm(str(good), min_prefix_tokens=CTX - N + 1)
    with pytest.raises(ValueError, match="sum to at most 1"):
        _dm(str(good), splits={"policy": 0.9, "eval": 0.2})
    with pytest.raises(ValueError, match="must be a number > 0"):
        _dm(str(good), splits={"policy": 0.9, "eval": -0.1})
    with pytest.raises(ValueError, match="train_split='train' is not one of"):
        _dm(str(good), train_split="train")
    with pytest.raises(ValueError, match="must differ"):
        _dm(str(good), val_split="policy")
    with pytest.raises(ValueError, match="split_mode"):
        _dm(str(good), split_mode="sentence")
    with pytest.raises(ValueError, match="data_files"):
        _dm(str(good), data_files=str(good))


# ----------------------------------------------------------------------------------------------------------
# restarts
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("buffer", [0, 16])
def test_resume_from_state_dict_neither_replays_nor_skips(c4_tiny: Path, tmp_path: Path, buffer: int) -> None:
    kw = {
        "shuffle_buffer_size": buffer,
        "split_mode": "random",
        "max_chunks_per_doc": 2,
        "splits": {"policy": 0.8, "eval": 0.2},
    }
    total = 24
    ref = _keys(islice(iter(_dm(str(c4_tiny), **kw).train_dataloader()), total))
    per_epoch = len(list(_ds(str(c4_tiny), **{**kw, "shuffle_buffer_size": 0, "split": "policy"})))
    assert total * 4 > 2 * per_epoch  # the run cycles through more than two epochs
    for k in (1, 5, 9, 16):
        dm = _dm(str(c4_tiny), **kw)
        head = _keys(islice(iter(dm.train_dataloader()), k))
        path = tmp_path / f"state{k}.pt"
        torch.save(dm.state_dict(), path)
        fresh = _dm(str(c4_tiny), **kw)
        fresh.load_state_dict(torch.load(path, weights_only=True))
        tail = _keys(islice(iter(fresh.train_dataloader()), total - k))
        assert head + tail == ref, k
    # a new iterator of the same DataModule (a new Lightning epoch) continues after the consumed batches
    dm = _dm(str(c4_tiny), **kw)
    loader = dm.train_dataloader()
    first = _keys(islice(iter(loader), 3))
    assert first + _keys(islice(iter(loader), 2)) == ref[: 5 * 4]


class _Recorder(LightningModule):
    """Records the chunks of every training batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        assert set(batch) == BATCH_KEYS
        self.seen.extend(_keys([batch]))
        return (self.w * batch["suffix_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _every_4_steps(dirpath: Path) -> ModelCheckpoint:
    """A checkpoint every 4 steps, each kept, named ``step=N.ckpt``."""
    return ModelCheckpoint(dirpath=dirpath, every_n_train_steps=4, save_top_k=-1, filename="{step}")


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_trainer_checkpoint_resume_neither_replays_nor_skips(c4_tiny: Path, tmp_path: Path) -> None:
    kw = {"shuffle_buffer_size": 8, "splits": {"policy": 0.8, "eval": 0.2}}
    steps = 9
    ref = _keys(islice(iter(_dm(str(c4_tiny), **kw).train_dataloader()), steps))

    # one endless Lightning epoch: the Trainer fetches a batch ahead of the one it trains on
    model = _Recorder()
    ckpts = [_every_4_steps(tmp_path / "ckpt")]
    tiny_trainer(steps, tmp_path, devices=1, enable_checkpointing=True, callbacks=ckpts).fit(
        model, datamodule=_dm(str(c4_tiny), **kw)
    )
    assert model.seen == ref
    ckpt = tmp_path / "ckpt" / "step=4.ckpt"
    state = torch.load(ckpt, weights_only=False)["PrefixSuffixDataModule"]["train_stream"]
    assert state["num_slots"] == 1 and state["slots"]["0"]["produced"] == 4 * 4  # not the prefetched 5th

    resumed = _Recorder()
    ckpts = [_every_4_steps(tmp_path / "ckpt2")]
    trainer = tiny_trainer(steps, tmp_path, devices=1, enable_checkpointing=True, callbacks=ckpts)
    trainer.fit(resumed, datamodule=_dm(str(c4_tiny), **kw), ckpt_path=ckpt)
    assert resumed.seen == ref[4 * 4 :]

    # Lightning epochs of 3 batches: every epoch opens a new iterator, which continues the stream
    short = _Recorder()
    tiny_trainer(steps, tmp_path / "short", devices=1, limit_train_batches=3).fit(
        short, datamodule=_dm(str(c4_tiny), **kw)
    )
    assert short.seen == ref


# ----------------------------------------------------------------------------------------------------------
# sharding, validation, hub streaming
# ----------------------------------------------------------------------------------------------------------


def test_ranks_and_workers_take_disjoint_documents(c4_tiny: Path) -> None:
    def chunks(**kw) -> list[tuple]:
        return [(it["doc_id"], it["suffix_start"]) for it in _ds(str(c4_tiny), **kw)]

    everything = chunks()
    rank0, rank1 = chunks(rank=0, world_size=2), chunks(rank=1, world_size=2)
    assert rank0 and rank1
    assert not {d for d, _ in rank0} & {d for d, _ in rank1}
    assert sorted(rank0 + rank1) == sorted(everything)
    # through the DataModule: rank overrides, and 2 dataloader workers (4 slots over 2 ranks)
    splits = {"policy": 0.8, "eval": 0.2}
    dm = _dm(str(c4_tiny), repeat=False, splits=splits, rank=1, world_size=2, num_workers=2, batch_size=2)
    got = [k[:2] for k in _keys(list(dm.train_dataloader()))]
    policy_rank1 = [c for c in chunks(splits=splits, split="policy", rank=1, world_size=2)]
    assert len(got) == len(set(got)) and sorted(got) == sorted(policy_rank1)
    state = dm.state_dict()["train_stream"]
    assert state["num_slots"] == 4 and set(state["slots"]) == {"1", "3"}  # worker w of rank r: w * 2 + r


def test_ddp_state_dict_gathers_every_rank(c4_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning writes rank 0's checkpoint only: its DataModule state must hold every rank's position."""
    kw = {"shuffle_buffer_size": 8, "splits": {"policy": 0.8, "eval": 0.2}, "world_size": 2}
    refs = [_keys(islice(iter(_dm(str(c4_tiny), rank=r, **kw).train_dataloader()), 6)) for r in (0, 1)]
    dms = [_dm(str(c4_tiny), rank=r, **kw) for r in (0, 1)]
    heads = [_keys(islice(iter(dm.train_dataloader()), 2)) for dm in dms]
    local = [dm.state_dict()["train_stream"] for dm in dms]  # not distributed: own slots only
    assert [set(s["slots"]) for s in local] == [{"0"}, {"1"}]

    def all_gather_object(out: list, obj) -> None:
        out[:] = [(s["slots"], s["num_slots"]) for s in local]

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    merged = dms[0].state_dict()
    monkeypatch.undo()
    assert set(merged["train_stream"]["slots"]) == {"0", "1"}
    for r in (0, 1):
        fresh = _dm(str(c4_tiny), rank=r, **kw)
        fresh.load_state_dict(merged)
        assert heads[r] + _keys(islice(iter(fresh.train_dataloader()), 4)) == refs[r]
    single = _dm(str(c4_tiny), **{**kw, "rank": 0, "world_size": 1})
    single.load_state_dict(merged)
    with pytest.raises(ValueError, match="has 2 slots .* this run has 1"):
        next(iter(single.train_dataloader()))


def test_val_dataloader_is_fixed_and_finite(rp_small: Path) -> None:
    def val_keys(dm) -> list[tuple]:
        return _keys(list(dm.val_dataloader()))

    dm = _dm(str(rp_small), num_val_prefixes=10, val_batch_size=4)
    sizes = [len(b["doc_id"]) for b in dm.val_dataloader()]
    assert sizes == [4, 4, 2]
    first = val_keys(dm)
    _ = list(islice(iter(dm.train_dataloader()), 3))
    assert val_keys(dm) == first == val_keys(_dm(str(rp_small), num_val_prefixes=10, val_batch_size=4))
    assert len({k[0] for k in first}) == 10  # one chunk per document by default
    docs = _docs_by_id(*rp_small.glob("*.jsonl"))
    assert all(assign_split(docs[k[0]]) == "eval" for k in first)


def test_hf_streaming_sources(rp_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    c4 = rp_small / "sample_c4-rp1.jsonl"
    local = _keys(islice(iter(_dm(str(c4)).train_dataloader()), 6))
    via_hf = _keys(islice(iter(_dm(None, hf_name="json", data_files=str(c4)).train_dataloader()), 6))
    assert via_hf == local

    # a SlimPajama-like hub dataset: the id is forwarded, and its meta.redpajama_set_name filters
    slim = tmp_path / "slim.jsonl"
    rows = []
    for name, set_name in (
        ("sample_c4-rp1.jsonl", "RedPajamaC4"),
        ("sample_stackexchange2.jsonl", "RedPajamaStackExchange"),
    ):
        for line in islice((rp_small / name).read_text(encoding="utf-8").splitlines(), 20):
            rows.append({"text": json.loads(line)["text"], "meta": {"redpajama_set_name": set_name}})
    write_jsonl(slim, rows)
    calls = []
    real = datasets.load_dataset

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return real("json", data_files=str(slim), split=kwargs["split"], streaming=kwargs["streaming"])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = _dm(
        None,
        hf_name="cerebras/SlimPajama-627B",
        hf_config="default",
        hf_split="train",
        meta_filter={"redpajama_set_name": "RedPajamaStackExchange"},
    )
    got = {k[0] for k in _keys(list(dm.split_dataloader("policy")))}
    assert calls and calls[0] == (
        "cerebras/SlimPajama-627B",
        "default",
        {"split": "train", "data_files": None, "streaming": True},
    )
    se = {
        hashlib.sha1(r["text"].encode()).hexdigest()[:16]
        for r in rows
        if "StackEx" in r["meta"]["redpajama_set_name"]
    }
    assert got and got <= se
