"""The DataModule: training batches streamed from the ``train_split`` and resumable at the last batch used,
a fixed validation list, and loaders for the other splits."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from functools import partial
from itertools import islice
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lit_selfimprove.datamodules.prefix_suffix.chunking import collate_prefix_suffix
from lit_selfimprove.datamodules.prefix_suffix.config import CorpusConfig
from lit_selfimprove.datamodules.prefix_suffix.dataset import PrefixSuffixDataset, _rank_world_from_env
from lit_selfimprove.distributed import gather_objects

_STATE_KEY = "_stream_state"  # batch key carrying the producing slot's position (popped before training)
_STATE_VERSION = 1


class _BatchedStream(IterableDataset):
    """Collated batches of a :class:`PrefixSuffixDataset`, each tagged with its slot's position."""

    def __init__(self, dataset: PrefixSuffixDataset, batch_size: int, pad_id: int, suffix_len: int) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.pad_id, self.suffix_len = dataset, batch_size, pad_id, suffix_len

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self.dataset.stream()
        it = iter(stream)
        while True:
            items = list(islice(it, self.batch_size))
            if not items:
                return
            batch = collate_prefix_suffix(items, self.pad_id, self.suffix_len)
            batch[_STATE_KEY] = {
                "slot": stream.slot,
                "num_slots": stream.num_slots,
                "state": stream.snapshot(),
            }
            yield batch


class _ListDataset(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _identity(batch: Any) -> Any:
    return batch


class _ResumableLoader(DataLoader):
    """The training DataLoader: every iterator starts at the DataModule's consumed position.

    Outside a running ``Trainer.fit`` a batch counts as consumed when this loader hands it out; inside,
    when the Trainer passes it to ``on_before_batch_transfer`` (Lightning fetches one batch ahead).
    """

    datamodule: PrefixSuffixDataModule | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dm = self.datamodule
        stream: _BatchedStream = self.dataset
        num_slots = stream.dataset.slot_info()[1] * max(1, self.num_workers)
        if dm is not None:
            stream.dataset.start_states = dm._start_states(num_slots)
            driven = dm._trainer_is_fitting()
        else:
            driven = True
        return self._consume(super().__iter__(), driven)

    def state_dict(self) -> dict[str, Any]:
        """Empty: the position lives in the DataModule's ``state_dict`` (defined so that Lightning sees a
        resumable loader and does not warn about mid-epoch checkpoints)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore here (see :meth:`state_dict`)."""

    def _consume(self, it: Iterator[dict[str, Any]], driven: bool) -> Iterator[dict[str, Any]]:
        for batch in it:
            if not driven and self.datamodule is not None:
                self.datamodule._record(batch.pop(_STATE_KEY))
            yield batch


class PrefixSuffixDataModule(LightningDataModule):
    """Prefix -> suffix batches for Self-Improving Pretraining, streamed, split and restartable.

    Training streams the ``train_split`` (default ``"policy"``) endlessly (``repeat``), shuffled through a
    seeded buffer, sharded over data-parallel ranks and dataloader workers. Validation is a fixed list: the
    first ``num_val_prefixes`` chunks of ``val_split`` (default ``"eval"``) in stream order, at most
    ``val_max_chunks_per_doc`` per document. The judge / rewriter splits are reachable with
    :meth:`split_dataset` / :meth:`split_dataloader`. See the package docs for sources, the metadata filter,
    splits and chunking; the arguments shared with :class:`PrefixSuffixDataset` are kept, validated, in
    ``config`` (a :class:`CorpusConfig`).

    Batches: ``prefix_ids`` / ``prefix_mask`` ``LongTensor[B, P]`` LEFT-padded with the tokenizer's pad id,
    ``suffix_ids`` / ``suffix_mask`` ``LongTensor[B, N]`` RIGHT-padded, ``prefix_text`` / ``suffix_text``
    (decodes of exactly those tokens), ``doc_id`` (lists of str), and ``suffix_start`` ``LongTensor[B]``.
    No special token (BOS) is added to the prefix.

    Resuming: ``state_dict()`` holds, per slot, the stream position after the last batch used for training;
    Lightning saves it in checkpoints and restores it with ``trainer.fit(..., ckpt_path=...)``, and a
    training dataloader iterator created later starts exactly there (no chunk replayed or skipped). Inside
    ``Trainer.fit`` a batch counts as used when the Trainer calls this DataModule's
    ``on_before_batch_transfer`` (so pass the DataModule to ``fit``; a LightningModule's own
    ``on_before_batch_transfer`` is still called, from this one); outside, when the training dataloader
    yields it. Under DDP, ``state_dict()`` gathers every rank's slots (Lightning calls it on all ranks).
    Resuming needs the same ``world_size * num_workers``. With ``num_workers > 0`` no chunk is replayed or
    skipped either, but after a resume the workers' batches may interleave in a different order.

    Args:
        sources: Local files (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``, ``.txt``), folders or glob patterns.
        tokenizer: ``builtin:tiny-tokenizer`` or a local tokenizer folder (loaded with ``load_tokenizer``).
        hf_name: A dataset for ``datasets.load_dataset(..., streaming=True)`` (hub id, local folder, or a
            builder such as ``"json"`` with ``data_files``), read after ``sources``.
        hf_config: Its configuration name.
        hf_split: Its split.
        data_files: Forwarded to ``load_dataset``.
        text_field: Field holding the document text (dotted path allowed).
        id_field: Optional document id field: then ``doc_id`` and the split key (default: the text's sha1).
        meta_filter: ``{key: value or [values]}`` every record must match, e.g.
            ``{"redpajama_set_name": ["RedPajamaC4", "RedPajamaStackExchange"]}`` or ``{"source": "cc/*"}``.
        suffix_tokens: N, tokens per suffix chunk.
        context_length: Prefix + suffix tokens at most.
        min_prefix_tokens: Tokens before the first suffix.
        min_suffix_tokens: Shortest tail chunk kept (default ``suffix_tokens``).
        split_mode: ``"fixed"`` or ``"random"`` chunk boundaries, or ``"marker"``: a suffix after each
            ``split_marker``.
        max_chunks_per_doc: At most this many training chunks per document.
        splits: Split name -> fraction of documents (each > 0, sum <= 1).
        split_salt: Salt of the split hash (change only to draw a different partition).
        train_split: The split streamed for training.
        val_split: The split validation chunks come from.
        num_val_prefixes: Number of validation chunks.
        val_max_chunks_per_doc: At most this many validation chunks per document (None: no limit).
        batch_size: Training batch size (prefixes per step, per rank).
        val_batch_size: Validation batch size (default ``batch_size``).
        shuffle_buffer_size: Training chunks held for shuffling (0: stream order).
        repeat: Cycle the training split (epochs); else training stops after one pass.
        seed: Seed of the shuffle and of the random split points.
        num_workers: Training dataloader workers (each one a slot; 0 is exact and the default).
        skip_malformed: Skip and count malformed records instead of raising.
        piece_chars: Longest piece of a document tokenized in one call (a memory bound, see
            :class:`CorpusConfig`).
        split_marker: The text after which a suffix starts in split mode ``"marker"`` (e.g. ``"\nA: "``:
            the question is the prefix, the answer the suffix; see :class:`CorpusConfig`).
        rank: Data-parallel rank override (default: the Trainer's, else torch.distributed / environment).
        world_size: Data-parallel world size override.
    """

    def __init__(
        self,
        sources: str | list[str] | None = None,
        tokenizer: str = "builtin:tiny-tokenizer",
        hf_name: str | None = None,
        hf_config: str | None = None,
        hf_split: str | None = "train",
        data_files: str | list[str] | dict[str, Any] | None = None,
        text_field: str = "text",
        id_field: str | None = None,
        meta_filter: dict[str, Any] | None = None,
        suffix_tokens: int = 128,
        context_length: int = 2048,
        min_prefix_tokens: int = 32,
        min_suffix_tokens: int | None = None,
        split_mode: str = "fixed",
        max_chunks_per_doc: int | None = None,
        splits: dict[str, float] | None = None,
        split_salt: str = "",
        train_split: str = "policy",
        val_split: str = "eval",
        num_val_prefixes: int = 256,
        val_max_chunks_per_doc: int | None = 1,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        shuffle_buffer_size: int = 1024,
        repeat: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        skip_malformed: bool = False,
        piece_chars: int = 100_000,
        split_marker: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.config = CorpusConfig.from_arguments(locals())
        self.splits = self.config.splits
        for what, name in (("train_split", train_split), ("val_split", val_split)):
            if name not in self.splits:
                raise ValueError(f"{what}={name!r} is not one of the splits {list(self.splits)}")
        if train_split == val_split:
            raise ValueError(f"train_split and val_split must differ (both {train_split!r})")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError("batch_size and val_batch_size must be >= 1")
        if num_val_prefixes < 1:
            raise ValueError(f"num_val_prefixes must be >= 1, got {num_val_prefixes}")
        if val_max_chunks_per_doc is not None and val_max_chunks_per_doc < 1:
            raise ValueError(f"val_max_chunks_per_doc must be >= 1 or None, got {val_max_chunks_per_doc}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.train_split, self.val_split = train_split, val_split
        self.num_val_prefixes, self.val_max_chunks_per_doc = num_val_prefixes, val_max_chunks_per_doc
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer_size, self.repeat = shuffle_buffer_size, repeat
        # Fails early on a missing source (nothing is read yet).
        self._probe = PrefixSuffixDataset(tokenizer=tokenizer, split=train_split, **self.config.kwargs())
        self._fingerprint = self._stream_fingerprint(tokenizer)
        self._tokenizer: Any = None
        self._slots: dict[str, dict[str, Any]] = {}  # consumed position per slot
        self._num_slots: int | None = None
        self._val_items: list[dict[str, Any]] | None = None

    def _stream_fingerprint(self, tokenizer: str) -> str:
        """A hash of what determines the training stream (a checkpoint's position fits only the same)."""
        src = {
            **{
                k: v
                for k, v in self.config.kwargs().items()
                if k not in ("skip_malformed", "piece_chars")
                # without a marker, the fingerprint of the streams checkpointed before the field existed
                and not (k == "split_marker" and v is None)
            },
            "tokenizer": tokenizer,
            "train_split": self.train_split,
            "shuffle_buffer_size": self.shuffle_buffer_size,
            "repeat": self.repeat,
        }
        return hashlib.sha1(json.dumps(src, sort_keys=True, default=str).encode("utf-8")).hexdigest()

    # -- tokenizer / datasets ------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from lit_selfimprove.modeling import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        _ = self.tokenizer

    def _rank_world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return _rank_world_from_env()

    def split_dataset(
        self,
        split: str,
        repeat: bool = False,
        shuffle_buffer_size: int = 0,
        shard: bool = True,
        **overrides: Any,
    ) -> PrefixSuffixDataset:
        """A :class:`PrefixSuffixDataset` over any split (e.g. ``"judge"`` or ``"rewriter"``) with this
        DataModule's sources, filter and chunking (``overrides`` replace any of its arguments). With
        ``shard`` it is sharded over this DataModule's data-parallel ranks; else one process reads it all.
        """
        kwargs = {**self.config.kwargs(), **overrides}
        if shard:
            rank, world = self._rank_world()
            kwargs.setdefault("rank", rank)
            kwargs.setdefault("world_size", world)
        return PrefixSuffixDataset(
            tokenizer=self.tokenizer,
            split=split,
            repeat=repeat,
            shuffle_buffer_size=shuffle_buffer_size,
            **kwargs,
        )

    def split_dataloader(
        self,
        split: str,
        batch_size: int | None = None,
        repeat: bool = False,
        shuffle_buffer_size: int = 0,
        num_workers: int = 0,
        **overrides: Any,
    ) -> DataLoader:
        """Batches (same keys as training) of any split; not tracked by ``state_dict``."""
        ds = self.split_dataset(split, repeat=repeat, shuffle_buffer_size=shuffle_buffer_size, **overrides)
        collate = partial(
            collate_prefix_suffix, pad_id=self.tokenizer.pad_token_id, suffix_len=ds.suffix_tokens
        )
        return DataLoader(
            ds, batch_size=batch_size or self.batch_size, num_workers=num_workers, collate_fn=collate
        )

    # -- dataloaders ---------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        ds = self.split_dataset(
            self.train_split, repeat=self.repeat, shuffle_buffer_size=self.shuffle_buffer_size
        )
        stream = _BatchedStream(ds, self.batch_size, self.tokenizer.pad_token_id, ds.suffix_tokens)
        loader = _ResumableLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity)
        loader.datamodule = self
        return loader

    @property
    def val_items(self) -> list[dict[str, Any]]:
        """The fixed validation chunks (computed once, identical on every rank)."""
        if self._val_items is None:
            ds = self.split_dataset(
                self.val_split,
                shard=False,
                rank=0,
                world_size=1,
                max_chunks_per_doc=self.val_max_chunks_per_doc,
            )
            self._val_items = list(islice(iter(ds), self.num_val_prefixes))
            if len(self._val_items) < self.num_val_prefixes:
                rank_zero_warn(
                    f"PrefixSuffixDataModule: only {len(self._val_items)} {self.val_split!r} chunks for "
                    f"num_val_prefixes={self.num_val_prefixes}"
                )
            rank_zero_info(
                f"PrefixSuffixDataModule: {len(self._val_items)} validation prefixes from split {self.val_split!r}"
            )
        return self._val_items

    def val_dataloader(self) -> DataLoader:
        collate = partial(
            collate_prefix_suffix, pad_id=self.tokenizer.pad_token_id, suffix_len=self._probe.suffix_tokens
        )
        return DataLoader(
            _ListDataset(self.val_items), batch_size=self.val_batch_size, shuffle=False, collate_fn=collate
        )

    # -- consumed position ---------------------------------------------------------------------------------

    def _trainer_is_fitting(self) -> bool:
        """Whether a running ``Trainer.fit`` drives the training loader (then it reports consumed batches)."""
        trainer = self.trainer
        if trainer is None:
            return False
        from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

        return trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING

    def _record(self, tag: dict[str, Any]) -> None:
        """Mark the batch tagged ``tag`` as used: its slot's position becomes the resume point."""
        self._slots[str(tag["slot"])] = tag["state"]
        self._num_slots = int(tag["num_slots"])

    def _start_states(self, num_slots: int) -> dict[str, dict[str, Any]]:
        if self._slots and self._num_slots is not None and self._num_slots != num_slots:
            raise ValueError(
                f"PrefixSuffixDataModule: the saved stream position has {self._num_slots} slots "
                f"(world_size * num_workers) but this run has {num_slots}; resume with the same world size and "
                "num_workers, or drop the DataModule state from the checkpoint to restart the stream"
            )
        return copy.deepcopy(self._slots)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and _STATE_KEY in batch:
            self._record(batch.pop(_STATE_KEY))
        # Lightning calls only this hook when both the DataModule and the LightningModule define it.
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None and is_overridden("on_before_batch_transfer", model):
            return model.on_before_batch_transfer(batch, dataloader_idx)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training stream's consumed position, every rank's slots included."""
        slots, num_slots = copy.deepcopy(self._slots), self._num_slots
        gathered = gather_objects((slots, num_slots))
        if len(gathered) > 1:
            slots, num_slots = {}, None
            for rank_slots, rank_num in gathered:
                slots.update(rank_slots)
                num_slots = num_slots or rank_num
        return {
            "train_stream": {
                "version": _STATE_VERSION,
                "num_slots": num_slots,
                "slots": slots,
                "fingerprint": self._fingerprint,
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stream = state_dict.get("train_stream")
        if not stream:
            return
        if stream.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported PrefixSuffixDataModule state version {stream.get('version')!r}")
        if stream.get("fingerprint") != self._fingerprint:
            rank_zero_warn(
                "PrefixSuffixDataModule: the checkpoint's stream was produced with another configuration "
                "(sources, filter, splits, chunking, tokenizer, seed or buffer); its position may not match"
            )
        self._slots = copy.deepcopy(dict(stream.get("slots") or {}))
        self._num_slots = stream.get("num_slots")
