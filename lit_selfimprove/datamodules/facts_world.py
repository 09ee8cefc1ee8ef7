"""Pre-training data and the command line of the tiny facts world (:mod:`lit_selfimprove.worlds.facts`).

python -m lit_selfimprove facts-world eval --model builtin:tiny-sip-policy
python -m lit_selfimprove facts-world corpus      # rebuild builtin:tiny-facts

"""

from __future__ import annotations

import argparse
import json

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lit_selfimprove.datamodules.arithmetic import pad_collate
from lit_selfimprove.worlds.facts import (
    CORPUS_NUM_DOCS,
    CORPUS_SEED,
    P_UNSAFE,
    P_WRONG,
    evaluate_policy,
    heldout_prefixes,
    load_corpus,
    write_corpus,
)

__all__ = ["FactsPretrainDataModule", "main"]

# -- pre-training data ----------------------------------------------------------------------------


class _TokenizedDocs(Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


class FactsPretrainDataModule(LightningDataModule):
    """Next-token pre-training on the facts corpus (for ``NextTokenLM``).

    One document per sequence: ``<bos> text <eos>``, loss on every token, right-padded into
    ``input_ids`` / ``attention_mask`` / ``labels`` (``-100`` on padding). The last
    ``val_docs`` documents of the corpus are held out for validation.

    Args:
        corpus: ``builtin:tiny-facts`` or a jsonl file with a ``text`` field.
        tokenizer: tokenizer path or ``builtin:tiny-tokenizer``.
        batch_size: sequences per step.
        max_length: truncation length in tokens (BOS and EOS included).
        val_docs: documents held out for validation.
        seed: shuffling seed.
    """

    def __init__(
        self,
        corpus: str = "builtin:tiny-facts",
        tokenizer: str = "builtin:tiny-tokenizer",
        batch_size: int = 32,
        max_length: int = 256,
        val_docs: int = 128,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1 or max_length < 2 or val_docs < 0:
            raise ValueError("need batch_size >= 1, max_length >= 2, val_docs >= 0")
        self.corpus, self.tokenizer_name = corpus, tokenizer
        self.batch_size, self.max_length, self.val_docs, self.seed = batch_size, max_length, val_docs, seed
        self.train_set: _TokenizedDocs | None = None
        self.val_set: _TokenizedDocs | None = None
        self.tokenizer = None

    def _tokenize(self, text: str) -> dict:
        ids = self.tokenizer(text)["input_ids"] + [self.tokenizer.eos_token_id]
        ids = ids[: self.max_length]
        return {"input_ids": ids, "labels": list(ids)}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from lit_selfimprove.modeling import load_tokenizer

        self.tokenizer = load_tokenizer(self.tokenizer_name)
        docs = load_corpus(self.corpus)
        if len(docs) <= self.val_docs:
            raise ValueError(f"corpus has {len(docs)} documents, not more than val_docs={self.val_docs}")
        examples = [self._tokenize(d["text"]) for d in docs]
        cut = len(examples) - self.val_docs
        self.train_set, self.val_set = _TokenizedDocs(examples[:cut]), _TokenizedDocs(examples[cut:])

    def _collate(self, batch: list[dict]) -> dict:
        return pad_collate(batch, self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=gen,
            drop_last=True,
            collate_fn=self._collate,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, collate_fn=self._collate)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lit_selfimprove facts-world", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="judge a policy's sampled continuations of held-out prefixes")
    ev.add_argument("--model", default="builtin:tiny-sip-policy")
    ev.add_argument("--num", type=int, default=200, help="held-out prefixes")
    ev.add_argument("--samples", type=int, default=4, help="continuations per prefix")
    ev.add_argument("--max-new-tokens", type=int, default=40)
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--show", type=int, default=0, help="print this many sampled continuations")
    co = sub.add_parser("corpus", help="rebuild the corpus (builtin:tiny-facts) deterministically")
    co.add_argument("--out-dir", default=None, help="default: the bundled assets/tiny-facts")
    co.add_argument("--num-docs", type=int, default=CORPUS_NUM_DOCS)
    co.add_argument("--seed", type=int, default=CORPUS_SEED)
    co.add_argument("--p-wrong", type=float, default=P_WRONG)
    co.add_argument("--p-unsafe", type=float, default=P_UNSAFE)
    args = parser.parse_args(argv)

    if args.cmd == "corpus":
        from lit_selfimprove.assets import ASSETS_DIR

        out = write_corpus(
            args.out_dir or ASSETS_DIR / "tiny-facts",
            args.num_docs,
            args.seed,
            p_wrong=args.p_wrong,
            p_unsafe=args.p_unsafe,
        )
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
        return
    from lit_selfimprove.modeling import load_causal_lm, load_tokenizer

    torch.manual_seed(args.seed)
    model, tok = load_causal_lm(args.model), load_tokenizer(args.model)
    result = evaluate_policy(
        model, tok, args.num, args.samples, args.max_new_tokens, args.temperature, args.seed
    )
    print(json.dumps({k: {m: round(v, 4) for m, v in s.items()} for k, s in result.items()}, indent=1))
    if args.show:
        from lit_selfimprove.generation import generate

        pairs = heldout_prefixes(args.show, args.max_new_tokens)
        gen = torch.Generator().manual_seed(args.seed)
        ro = generate(model, tok, [p for p, _ in pairs], max_new_tokens=args.max_new_tokens, generator=gen)
        for (p, _), t in zip(pairs, ro.texts):
            print(f"...{p[-40:]!r} -> {t!r}")


if __name__ == "__main__":
    main()
