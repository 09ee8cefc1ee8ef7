"""Rule-based judges and a rewriter for the tiny facts world, reading its knowledge base.

They stand in for the strong post-trained judge of Self-Improving Pretraining (a fine-tuned
Llama-3.1-8B or a prompted GPT-OSS-120B in the paper): instead of asking an LLM, they parse
the continuation with the world's sentence templates and look the facts up in the
:class:`~lit_selfimprove.worlds.facts.KnowledgeBase`. That makes them exact, free
and deterministic, which is what a CPU-sized test bed of the SIP loop needs; they know
nothing outside this world, so they are no model of a real judge's errors.

What is judged: the complete sentences a continuation writes, read joined to the prefix's
unfinished last sentence (SIP cuts documents at arbitrary characters); a sentence counts if
the continuation wrote at least one letter of it, and an incomplete last fragment is
ignored (as the paper's judges "ignore incompleteness"). See
:func:`~lit_selfimprove.worlds.facts.read_continuation`.

* :class:`KBFactualityJudge` (pointwise): 0 if a stated fact contradicts the KB, 1 if every
  checkable fact is right, 0.5 if nothing is checkable;
* :class:`KBSafetyJudge` (pointwise): 0 if the continuation writes an unsafe (stand-in) word,
  else 1;
* :class:`KBQualityJudge` (pairwise): coherence first (share of well-formed template
  sentences), factuality as the tie-breaker, 0.5 on a full tie;
* :class:`KBRewriter`: fixes wrong facts, replaces unsafe sentences by a correct fact about
  the same person, and copies everything else verbatim.

Each takes the knowledge base's ``seed`` / ``num_entities`` (plain arguments, so that it can
be built from YAML with ``class_path:``); they must match the corpus's (``world.json`` next to
``builtin:tiny-facts`` records them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lit_selfimprove.worlds.facts import (
    ATTRIBUTES,
    KB_SEED,
    NAMES,
    UNSAFE_WORDS,
    Continuation,
    KnowledgeBase,
    Sentence,
    coherence,
    continuation_stats,
    factuality,
    read_continuation,
)

_WORD = re.compile(r"[A-Za-z]+")

__all__ = [
    "KBFactualityJudge",
    "KBQualityJudge",
    "KBRewriter",
    "KBSafetyJudge",
    "kb_batch_stats",
]


class _KBJudge:
    def __init__(self, seed: int = KB_SEED, num_entities: int = len(NAMES)):
        self.kb = KnowledgeBase(seed, num_entities)

    def _reads(self, prefixes: Sequence[str], continuations: Sequence[str]) -> list[Continuation]:
        if len(prefixes) != len(continuations):
            raise ValueError(f"got {len(prefixes)} prefixes but {len(continuations)} continuations")
        return [read_continuation(self.kb, p, c) for p, c in zip(prefixes, continuations)]


class KBFactualityJudge(_KBJudge):
    """Pointwise factuality against the knowledge base: 1 (no error), 0.5 (nothing checkable), 0.

    A rule-based stand-in for the paper's factuality judge. The paper's judge compares with
    the original suffix as a reference; this one knows the truth, so ``references`` is ignored.

    Args:
        seed: the knowledge base's seed.
        num_entities: people in the knowledge base.
    """

    def score(
        self,
        prefixes: Sequence[str],
        continuations: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> list[float | None]:
        return [factuality(r) for r in self._reads(prefixes, continuations)]


class KBSafetyJudge(_KBJudge):
    """Pointwise safety: 1.0 if the continuation writes no unsafe word, else 0.0.

    A rule-based stand-in for the paper's safety judge; the unsafe words are mild stand-ins
    (:data:`~lit_selfimprove.worlds.facts.UNSAFE_WORDS`). A word counts if the
    continuation wrote at least one of its letters (finishing ``hu|rt`` is unsafe; a word
    wholly in the prefix is not the continuation's doing).

    Args:
        seed: the knowledge base's seed.
        num_entities: people in the knowledge base.
    """

    def score(
        self,
        prefixes: Sequence[str],
        continuations: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> list[float | None]:
        return [0.0 if r.unsafe_words else 1.0 for r in self._reads(prefixes, continuations)]


class KBQualityJudge(_KBJudge):
    """Pairwise quality: the more coherent continuation wins; if equally coherent, the more factual.

    Coherence is the share of well-formed template sentences among the complete ones (an
    unsafe sentence is well-formed: safety is judged apart); without any complete sentence,
    whether the fragment can still become one. Returns 1.0 (first better), 0.0 (second
    better) or 0.5 (a tie on both). A rule-based stand-in for the paper's pairwise LLM judge.

    Args:
        seed: the knowledge base's seed.
        num_entities: people in the knowledge base.
    """

    def _key(self, read: Continuation) -> tuple[float, float]:
        return coherence(self.kb, read), factuality(read)

    def compare(
        self,
        prefixes: Sequence[str],
        firsts: Sequence[str],
        seconds: Sequence[str],
    ) -> list[float | None]:
        a = [self._key(r) for r in self._reads(prefixes, firsts)]
        b = [self._key(r) for r in self._reads(prefixes, seconds)]
        return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(a, b)]


class KBRewriter(_KBJudge):
    """Rewrites a suffix: wrong facts fixed, unsafe sentences replaced, the rest copied verbatim.

    * a wrong fact gets the knowledge base's value (``Zorin lives in Ovra.`` ->
      ``Zorin lives in Talva.``);
    * a sentence (or unfinished last fragment) with an unsafe word becomes a correct fact
      about the same person, one not yet stated in the suffix where possible;
    * malformed sentences and everything already right are left as they are, and a suffix
      that needs no fix is returned unchanged.

    When the sentence to fix began in the prefix, the rewrite keeps the prefix's part and
    completes it into a correct fact if one starts that way; otherwise it closes that sentence
    with ``.`` and adds the replacement after it. The result is cut to ``max_chars``
    characters (= tokens with the char-level tokenizer), so a longer fix may leave an
    unfinished last fragment, which the judges ignore. A rule-based stand-in for the paper's
    trained rewriter.

    Args:
        seed: the knowledge base's seed.
        num_entities: people in the knowledge base.
        max_chars: length limit of a rewrite; ``None``: the original suffix's length.
    """

    def __init__(self, seed: int = KB_SEED, num_entities: int = len(NAMES), max_chars: int | None = None):
        super().__init__(seed, num_entities)
        if max_chars is not None and max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self.max_chars = max_chars

    def _replacement(self, entity: str | None, stated: str) -> str:
        """A correct fact about ``entity`` not already in ``stated`` (else its first fact);
        nothing when no known person is named."""
        if entity is None:
            return ""
        options = [self.kb.fact_sentence(entity, a) for a in ATTRIBUTES]
        return next((s for s in options if s not in stated), options[0])

    def _fixed(self, sentence: Sentence | None, text: str, unsafe: bool, stated: str) -> str | None:
        """The fixed sentence, or ``None`` when ``text`` needs no fix."""
        if unsafe:
            return self._replacement(sentence.entity if sentence else self.kb.mentioned(text), stated)
        if sentence is not None and sentence.kind == "fact" and not sentence.correct:
            return self.kb.fact_sentence(sentence.entity, sentence.attribute)
        return None

    def rewrite_one(self, prefix: str, suffix: str) -> str:
        """The rewrite of one suffix (see the class docstring)."""
        read = read_continuation(self.kb, prefix, suffix)
        cut = len(read.tail)
        joined = read.tail + suffix
        pieces: list[tuple[int, int, Sentence | None]] = [
            (start, end, sentence) for (start, end), sentence in zip(read.spans, read.sentences)
        ]
        if read.fragment:
            pieces.append((read.fragment_start, len(joined), None))
        out, pos = [], 0
        for start, end, sentence in pieces:
            text = joined[start:end]
            unsafe = any(
                m.group().lower() in UNSAFE_WORDS and start + m.end() > cut for m in _WORD.finditer(text)
            )
            fixed = self._fixed(sentence, text, unsafe, joined + " ".join(out))
            if fixed is None:
                continue
            if start < cut:  # begun in the prefix: keep that part verbatim
                begun = joined[start:cut]
                head = begun.lstrip()
                if not head:
                    piece = begun + fixed
                elif fixed.startswith(head):
                    piece = begun + fixed[len(head) :]
                else:
                    entity = sentence.entity if sentence else self.kb.mentioned(head)
                    done = self.kb.correct_completion(head, entity)
                    piece = begun + (done[len(head) :] if done else ". " + fixed)
            else:
                lead = text[: len(text) - len(text.lstrip())]
                piece = lead + fixed if fixed else ""
            out += [joined[pos:start], piece]
            pos = end
        limit = len(suffix) if self.max_chars is None else self.max_chars
        if not out:
            return suffix[:limit]
        return ("".join(out) + joined[pos:])[cut:][:limit]

    def rewrite(self, prefixes: Sequence[str], suffixes: Sequence[str]) -> list[str]:
        if len(prefixes) != len(suffixes):
            raise ValueError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes")
        return [self.rewrite_one(p, s) for p, s in zip(prefixes, suffixes)]


def kb_batch_stats(
    prefixes: Sequence[str],
    continuations: Sequence[str],
    seed: int = KB_SEED,
    num_entities: int = len(NAMES),
) -> dict[str, float]:
    """Factuality / safety / coherence rates of a batch (see
    :func:`~lit_selfimprove.worlds.facts.continuation_stats`)."""
    return continuation_stats(KnowledgeBase(seed, num_entities), prefixes, continuations)
