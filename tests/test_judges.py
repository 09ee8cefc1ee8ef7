"""Judges and rewriters of Self-Improving Pretraining: verdict parsing, LLM judges on scripted
backends, CombinedJudge scoring (all pairs, pivot, weights, nan), position bias and the random option
order, YAML composition and the local Hugging Face backend on a tiny model."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pytest
import torch

from lit_selfimprove.judges import (
    FACTUALITY_TEMPLATE,
    PAIRWISE_QUALITY_TEMPLATE,
    REWRITER_TEMPLATE,
    SAFETY_TEMPLATE,
    CandidateJudge,
    ChatBackend,
    CombinedJudge,
    HFChatBackend,
    LLMFactualityJudge,
    LLMPairwiseJudge,
    LLMRewriter,
    LLMSafetyJudge,
    OpenAIChatBackend,
    PairwiseJudge,
    PointwiseJudge,
    Rewriter,
    fill_template,
    parse_factuality,
    parse_pairwise,
    parse_safety,
)
from tests.helpers import ScriptedBackend, section

nan = float("nan")


# ------------------------------------------------------------------------------------ parsers
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Option 1", 1.0),
        ("Option 2", 0.0),
        ("option 2.", 0.0),
        ("**Option 1**", 1.0),
        ("Option #2", 0.0),
        ("Answer: Option 2", 0.0),
        ("Final answer: **Option 1**", 1.0),
        ("The final verdict is Option 2.", 0.0),
        ("Option 1 is more coherent.\nOption 2 drifts.\nFinal verdict: Option 2", 0.0),
        ("Both are coherent, but the second is more factual.\n\nOption 2", 0.0),
        ("Reasoning: Option 2 repeats itself while Option 1 continues the story.\nOption 1", 1.0),
        ("Answer: Option 2\n\nOption 2 is better than Option 1 because it is factual.", 0.0),
        ("My first answer: Option 2.\nOn reflection the first one is better.\nOption 1", 1.0),
        ("I prefer option 1 because it keeps the topic.", 1.0),
        ("Answer: (Option 2)", 0.0),
        ('Option 1:\nThe correct answer is "Option 1."', 1.0),  # SmolLM2-135M's form after judge GRPO
        ("Option 1: The cat sat on the mat.\nAnswer: Option 2", 0.0),
        # unclear: must be None
        ("", None),
        ("I cannot decide.", None),
        ("Both continuations are equally good.", None),
        ("Option 1 or Option 2", None),
        ("Answer: Option 1/Option 2", None),
        ("Option 2 is better than Option 1", None),
        ("Neither option is coherent.", None),
        ("It is not Option 1.", None),
        ("Option 12", None),
        ("Option 3", None),
        ("Option 1.5", None),
        ("The first one.", None),
        # an option's text copied back with its label (SmolLM2-135M as judge): not a verdict
        ("Option 1: Alice moved to Paris in 1990 and", None),
        ("**Option 2:** he likes red.", None),
        ("[Option 1]: The cat sat.", None),
        ("Option 1:\n\nI've got a 500gb internal", None),
    ],
)
def test_parse_pairwise(text, expected):
    assert parse_pairwise(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("FINAL DECISION: YES", 1.0),
        ("FINAL DECISION: NO", 0.0),
        ("final decision: yes", 1.0),
        ("The text describes a recipe.\nFINAL DECISION: **YES**", 1.0),
        ("It gives instructions to build a weapon.\n\nFinal Decision - No.", 0.0),
        ('FINAL DECISION: "NO"', 0.0),
        ("FINAL DECISION: YES\nHmm, on second thought it insults people.\nFINAL DECISION: NO", 0.0),
        ("Answer with FINAL DECISION: YES/NO.\nFINAL DECISION: YES", 1.0),
        # unclear
        ("", None),
        ("YES", None),
        ("The text is safe.", None),
        ("FINAL DECISION: YES/NO", None),
        ("FINAL DECISION: YES or NO", None),
        ("FINAL DECISION: NOT SAFE", None),
        ("FINAL DECISION: None", None),
        ("FINAL DECISION: maybe", None),
    ],
)
def test_parse_safety(text, expected):
    assert parse_safety(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("FINAL VERDICT: NO HALLUCINATION", 1.0),
        ("FINAL VERDICT: POSSIBLE HALLUCINATION", 0.5),
        ("FINAL VERDICT: DEFINITE HALLUCINATION", 0.0),
        ("The date 1912 matches the reference.\nFinal verdict: **No hallucinations**", 1.0),
        ("The name differs from the reference.\nVerdict: definite hallucination.", 0.0),
        ("Verdict: possibly hallucinated", 0.5),
        ("Score: 0.5", 0.5),
        ("Score: 1", 1.0),
        ("Rating = 0", 0.0),
        ("Score: 0.5/1", 0.5),
        ("Score: 1.0", 1.0),
        ("No hallucination.", 1.0),
        ("1", 1.0),
        ("0.5", 0.5),
        (
            "FINAL VERDICT: NO HALLUCINATION\nWait, the year is wrong.\nFINAL VERDICT: DEFINITE HALLUCINATION",
            0.0,
        ),
        # unclear
        ("", None),
        ("hallucination", None),
        ("FINAL VERDICT: NO", None),
        ("Score: 0.7", None),
        ("Score: 2", None),
        ("Score: 1/2", None),
        ("Verdict: NO HALLUCINATION / POSSIBLE HALLUCINATION", None),
        ("The text has no hallucination, but maybe one.", None),
        ("I am not sure.", None),
    ],
)
def test_parse_factuality(text, expected):
    assert parse_factuality(text) == expected


def test_fill_template_fills_known_fields_once():
    out = fill_template(
        "A {first} B {second} C {other} {{x}}", {"first": "has {second} in it", "second": "{}"}
    )
    assert out == "A has {second} in it B {} C {other} {{x}}"


def test_default_templates_have_their_fields():
    for template, fields in [
        (PAIRWISE_QUALITY_TEMPLATE, ["{prefix}", "{first}", "{second}", "Option 1", "Option 2"]),
        (FACTUALITY_TEMPLATE, ["{prefix}", "{reference}", "{continuation}", "FINAL VERDICT"]),
        (SAFETY_TEMPLATE, ["{continuation}", "FINAL DECISION: YES", "FINAL DECISION: NO"]),
        (REWRITER_TEMPLATE, ["{prefix}", "{suffix}", "{seed}", "{max_tokens}", "verbatim"]),
    ]:
        for field in fields:
            assert field in template


def test_templates_are_checked():
    backend = ScriptedBackend(lambda p, k: "")
    with pytest.raises(ValueError, match=r"\{second\}"):
        LLMPairwiseJudge(backend, template="Compare {first} with the other one.")
    with pytest.raises(ValueError, match=r"\{reference\}"):
        LLMFactualityJudge(backend, template="Is {continuation} factual?")
    with pytest.raises(ValueError, match=r"\{continuation\}"):
        LLMSafetyJudge(backend, template="Is {prefix} safe?")
    with pytest.raises(ValueError, match=r"\{suffix\}"):
        LLMRewriter(backend, template="Rewrite it.")


# --------------------------------------------------------------------------------- LLM judges
def test_protocols_are_implemented():
    backend = ScriptedBackend(lambda p, k: "")
    assert isinstance(backend, ChatBackend)
    assert isinstance(HFChatBackend("builtin:tiny-student"), ChatBackend)
    assert isinstance(OpenAIChatBackend("http://127.0.0.1:1/v1", "m"), ChatBackend)
    assert isinstance(LLMPairwiseJudge(backend), PairwiseJudge)
    assert isinstance(LLMFactualityJudge(backend), PointwiseJudge)
    assert isinstance(LLMSafetyJudge(backend), PointwiseJudge)
    assert isinstance(LLMRewriter(backend), Rewriter)
    assert isinstance(CombinedJudge(quality=LLMPairwiseJudge(backend)), CandidateJudge)


def quality_answer(prompt: str, k: int = 0) -> str:
    """Prefers the option with the larger ``qN`` tag; unparseable when an option says ``garble``."""
    first, second = section(prompt, "Option 1"), section(prompt, "Option 2")
    if "garble" in first + second:
        return "Hard to say, they are both fine."
    score = lambda s: int(re.search(r"q(\d+)", s).group(1))  # noqa: E731
    return "Reasoning...\nOption 1" if score(first) >= score(second) else "Reasoning...\nOption 2"


def test_pairwise_judge_prompts_parses_and_counts():
    backend = ScriptedBackend(quality_answer)
    judge = LLMPairwiseJudge(backend, max_tokens=64, max_prefix_chars=5, random_order=False)
    out = judge.compare(["a long prefix"] * 3, ["q3", "q1", "q2 garble"], ["q1", "q3", "q1"])
    assert out == [1.0, 0.0, None]
    call = backend.calls[0]
    assert call["n"] == 1 and call["temperature"] == 0.0 and call["max_tokens"] == 64
    assert section(call["prompts"][0], "Prefix") == "...refix"  # the tail of a long prefix
    assert section(call["prompts"][1], "Option 1") == "q1" and section(call["prompts"][1], "Option 2") == "q3"
    assert judge.stats == {"prompts": 3, "answers": 3, "unparseable": 1, "no_verdict": 1}


def test_pairwise_judge_both_orders_cancels_position_bias():
    biased = LLMPairwiseJudge(ScriptedBackend(lambda p, k: "Option 1"), both_orders=True)
    assert biased.compare(["p", "p"], ["a", "b"], ["b", "a"]) == [0.5, 0.5]
    backend = ScriptedBackend(quality_answer)
    fair = LLMPairwiseJudge(backend, both_orders=True)
    assert fair.compare(["p"] * 3, ["q3", "q1", "q2 garble"], ["q1", "q3", "q1"]) == [1.0, 0.0, None]
    prompts = backend.calls[0]["prompts"]
    assert (
        len(prompts) == 6
        and section(prompts[3], "Option 1") == "q1"
        and section(prompts[3], "Option 2") == "q3"
    )
    # both orders of the garbled pair are unparseable: 2 answers, 1 item
    assert fair.stats["unparseable"] == 2 and fair.stats["no_verdict"] == 1

    def one_order_garbled(prompt, k):
        return "???" if section(prompt, "Option 1") == "y" else "Option 2"

    judge = LLMPairwiseJudge(ScriptedBackend(one_order_garbled), both_orders=True)
    assert judge.compare(["p"], ["x"], ["y"]) == [None]


def test_factuality_judge_uses_reference():
    def answer(prompt, k):
        same = section(prompt, "Candidate continuation") == section(prompt, "Reference continuation")
        if "dunno" in prompt:
            return "I do not know."
        return "FINAL VERDICT: NO HALLUCINATION" if same else "FINAL VERDICT: POSSIBLE HALLUCINATION"

    judge = LLMFactualityJudge(ScriptedBackend(answer))
    assert judge.score(["p"] * 3, ["born 1912", "born 1913", "dunno"], ["born 1912"] * 3) == [1.0, 0.5, None]
    assert judge.stats["unparseable"] == 1
    with pytest.raises(ValueError, match="references"):
        judge.score(["p"], ["c"])
    with pytest.raises(ValueError, match="same length"):
        judge.score(["p", "q"], ["c"], ["r"])


def test_safety_judge_votes_over_repeats():
    votes = {
        "calm": ["FINAL DECISION: YES"] * 5,
        "edgy": [
            "FINAL DECISION: YES",
            "FINAL DECISION: NO",
            "blah",
            "FINAL DECISION: YES",
            "FINAL DECISION: NO",
        ],
        "ugly": ["FINAL DECISION: NO"] * 4 + ["???"],
        "mute": ["???"] * 5,
    }
    backend = ScriptedBackend(lambda p, k: votes[section(p, "Continuation")][k])
    judge = LLMSafetyJudge(backend)
    assert judge.score(["p"] * 4, list(votes)) == [1.0, 0.5, 0.0, None]
    call = backend.calls[0]
    assert (call["n"], call["temperature"], call["top_p"]) == (5, 1.0, 0.6)
    assert judge.stats == {"prompts": 4, "answers": 20, "unparseable": 7, "no_verdict": 1}


def test_rewriter_seeds_strips_and_falls_back():
    prefix = "Paris is the capital and largest city of France"

    def answer(prompt, k):
        suffix = section(prompt, "Suffix")
        if suffix == "empty":
            return "  "
        if suffix == "only seed":
            return "And largest city of France "
        if suffix == "unseeded":
            return "It has 2 million people."
        return "and largest  city of   France. It has 2 million inhabitants."

    backend = ScriptedBackend(answer)
    rewriter = LLMRewriter(backend, max_tokens=64)
    out = rewriter.rewrite([prefix] * 4, ["It has 20 million people.", "empty", "only seed", "unseeded"])
    assert out == [". It has 2 million inhabitants.", "empty", "only seed", "It has 2 million people."]
    prompt = backend.calls[0]["prompts"][0]
    assert '"and largest city of France"' in prompt and "at most 64 tokens" in prompt
    assert backend.calls[0]["max_tokens"] == 64 + 4 * 5
    assert rewriter.stats["unparseable"] == 2
    assert rewriter.strip_seed("of France is big.", "city of Fran") == "of France is big."
    assert rewriter.strip_seed("City OF Fran ce is big.", "city of Fran") == " ce is big."
    assert rewriter.strip_seed('"Quoted answer."', "") == "Quoted answer."


# ------------------------------------------------------------------------------- CombinedJudge
class StrengthJudge:
    """Rule-based pairwise judge: the stronger text wins, equal strengths tie, listed pairs are None."""

    def __init__(self, strength: dict[str, float], unparseable: Sequence[frozenset] = ()):
        self.strength, self.unparseable = strength, set(unparseable)
        self.pairs: list[tuple[str, str]] = []

    def compare(self, prefixes, firsts, seconds):
        out = []
        for a, b in zip(firsts, seconds):
            self.pairs.append((a, b))
            if frozenset((a, b)) in self.unparseable:
                out.append(None)
            else:
                sa, sb = self.strength[a], self.strength[b]
                out.append(1.0 if sa > sb else 0.0 if sa < sb else 0.5)
        return out


class TableJudge:
    """Pointwise judge reading scores from a table (``None`` allowed); records the references."""

    def __init__(self, table: dict[str, float | None]):
        self.table, self.references = table, []

    def score(self, prefixes, continuations, references=None):
        self.references.append(references)
        return [self.table[c] for c in continuations]


def assert_close(tensor: torch.Tensor, expected) -> None:
    torch.testing.assert_close(tensor, torch.as_tensor(expected, dtype=torch.float32), equal_nan=True)


def test_all_pairs_win_rates_by_hand():
    # a beats everything; c and d tie; (a, c) unparseable
    quality = StrengthJudge({"a": 3, "b": 1, "c": 2, "d": 2}, unparseable=[frozenset("ac")])
    judge = CombinedJudge(quality=quality, random_order=False)
    result = judge.score_candidates(["p1", "p2"], [["a", "b", "c", "d"], ["b", "c", "a", "d"]], None)
    assert result.total.shape == (2, 4) and result.total.dtype == torch.float32
    # a: vs b 1, vs d 1 (vs c unparseable, left out) -> 1; b: 0/3; c: vs b 1, vs d .5 -> .75;
    # d: vs a 0, vs b 1, vs c .5 -> .5
    assert_close(result.components["quality"], [[1.0, 0.0, 0.75, 0.5], [0.0, 0.75, 1.0, 0.5]])
    assert_close(result.total, result.components["quality"])
    assert quality.pairs[:6] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert result.stats["quality_calls"] == 12 and result.stats["quality_unparseable"] == 2
    assert result.stats["calls"] == 12 and result.stats["unparseable"] == 2


@pytest.fixture
def strengths() -> dict[str, float]:
    return {"a": 3, "b": 1, "c": 2, "d": 2, "x": 0}


def test_all_pairs_three_candidates_and_all_unparseable(strengths):
    judge = CombinedJudge(quality=StrengthJudge(strengths, unparseable=[frozenset("bx"), frozenset("cx")]))
    result = judge.score_candidates(["p1", "p2"], [["b", "c", "x"], ["b", "x", "x"]])
    # row 1: b vs c 0 -> 0; c -> 1; x: both comparisons unparseable -> nan
    assert_close(result.components["quality"], [[0.0, 1.0, nan], [nan, 0.5, 0.5]])
    assert result.stats["nan_candidates"] == 2


def test_all_pairs_with_an_llm_judge_in_both_orders():
    backend = ScriptedBackend(quality_answer)
    judge = CombinedJudge(quality=LLMPairwiseJudge(backend, both_orders=True))
    result = judge.score_candidates(["p"], [["q1", "q3", "q2"]])
    assert_close(result.total, [[0.0, 1.0, 0.5]])
    assert len(backend.calls[0]["prompts"]) == 6  # 3 pairs, both orders


def test_pivot_mode(strengths):
    quality = StrengthJudge(strengths, unparseable=[frozenset("dx")])
    judge = CombinedJudge(quality=quality, quality_mode="pivot", pivot="first", random_order=False)
    result = judge.score_candidates(["p1", "p2"], [["c", "a", "b", "d"], ["x", "a", "d", "x"]])
    # pivot = first candidate; each other one compared with it once: score = its verdict
    assert_close(result.components["quality"], [[0.5, 1.0, 0.0, 0.5], [0.5, 1.0, nan, 0.5]])
    assert quality.pairs[:3] == [("a", "c"), ("b", "c"), ("d", "c")]
    assert result.stats["quality_calls"] == 6 and result.stats["quality_unparseable"] == 1

    last = CombinedJudge(quality=StrengthJudge(strengths), quality_mode="pivot", pivot="last")
    assert_close(last.score_candidates(["p"], [["a", "b", "c"]]).total, [[1.0, 0.0, 0.5]])
    index = CombinedJudge(quality=StrengthJudge(strengths), quality_mode="pivot", pivot=-2)
    assert_close(index.score_candidates(["p"], [["a", "b", "c"]]).total, [[1.0, 0.5, 1.0]])
    with pytest.raises(ValueError, match="out of range"):
        CombinedJudge(quality=StrengthJudge(strengths), quality_mode="pivot", pivot=3).score_candidates(
            ["p"], [["a", "b", "c"]]
        )

    nothing = CombinedJudge(
        quality=StrengthJudge(strengths, [frozenset("ab")]), quality_mode="pivot", pivot="first"
    )
    assert_close(nothing.score_candidates(["p"], [["a", "b"]]).total, [[nan, nan]])


def test_random_pivot_is_seeded_and_compares_everyone_once(strengths):
    cands = [["a", "b", "c", "x"]] * 6

    def run(seed):
        quality = StrengthJudge(strengths)
        result = CombinedJudge(
            quality=quality, quality_mode="pivot", pivot="random", random_order=False, seed=seed
        ).score_candidates(["p"] * 6, cands)
        return quality.pairs, result.total

    pairs, total = run(0)
    assert len(pairs) == 6 * 3
    pivots = []
    for b in range(6):
        rows = pairs[3 * b : 3 * b + 3]
        pivot = rows[0][1]
        assert all(second == pivot for _, second in rows)
        assert sorted(first for first, _ in rows) == sorted(set("abcx") - {pivot})
        assert total[b, "abcx".index(pivot)] == 0.5
        pivots.append(pivot)
    assert len(set(pivots)) > 1
    assert run(0)[0] == pairs and run(1)[0] != pairs


def test_random_order_swaps_positions_but_not_scores(strengths):
    quality = StrengthJudge(strengths)
    judge = CombinedJudge(quality=quality, random_order=True, seed=3)
    result = judge.score_candidates(["p"] * 4, [["a", "b", "c", "d"]] * 4)
    assert_close(result.total, [[1.0, 0.0, 0.5, 0.5]] * 4)
    assert any("abcd".index(a) > "abcd".index(b) for a, b in quality.pairs)


def always_option_1(prompt: str, k: int = 0) -> str:
    """A judge with pure position bias: whatever it is shown, the first option wins."""
    return "Both read well.\nOption 1"


def test_position_bias_fixed_order_vs_random_default():
    """Each of K candidates compared with the original suffix (pivot mode, the paper's K
    comparisons) by a judge that always answers "Option 1"."""
    batch, k = 50, 4
    prefixes, refs = [f"p{b}" for b in range(batch)], [f"suffix {b}" for b in range(batch)]
    cands = [[f"cand {b}.{i}" for i in range(k)] for b in range(batch)]

    backend = ScriptedBackend(always_option_1)
    fixed = CombinedJudge(
        quality=LLMPairwiseJudge(backend, random_order=False), quality_mode="pivot", random_order=False
    )
    wins = fixed.score_candidates(prefixes, cands, references=refs).total
    assert wins.eq(1.0).all()  # candidate always "Option 1", suffix always "Option 2": every candidate wins
    prompts = backend.calls[0]["prompts"]
    assert len(prompts) == batch * k and all(section(p, "Option 2").startswith("suffix") for p in prompts)

    def run(**kw):
        judge = CombinedJudge(
            quality=LLMPairwiseJudge(ScriptedBackend(always_option_1)), quality_mode="pivot", **kw
        )
        return judge.score_candidates(prefixes, cands, references=refs).total

    default = run()
    assert 0.4 <= float(default.mean()) <= 0.6  # balanced
    assert torch.equal(run(), default) and not torch.equal(run(seed=1), default)  # seeded
    # a random order in the pairwise judge alone, or in CombinedJudge alone, balances as well
    for judge in (
        CombinedJudge(quality=LLMPairwiseJudge(ScriptedBackend(always_option_1)), random_order=False),
        CombinedJudge(quality=LLMPairwiseJudge(ScriptedBackend(always_option_1), random_order=False)),
        CombinedJudge(quality=LLMPairwiseJudge(ScriptedBackend(always_option_1))),  # both: no cancelling
    ):
        rates = judge.score_candidates(prefixes, cands).total  # all pairs
        assert (0.35 <= rates.mean(0)).all() and (rates.mean(0) <= 0.65).all(), rates.mean(0)


def test_pairwise_judge_random_order_is_seeded_and_undone():
    biased = LLMPairwiseJudge(ScriptedBackend(always_option_1))
    out = biased.compare(["p"] * 200, ["a"] * 200, ["b"] * 200)
    assert set(out) == {0.0, 1.0} and 0.4 <= sum(out) / 200 <= 0.6
    assert (
        LLMPairwiseJudge(ScriptedBackend(always_option_1)).compare(["p"] * 200, ["a"] * 200, ["b"] * 200)
        == out
    )
    fixed = LLMPairwiseJudge(ScriptedBackend(always_option_1), random_order=False)
    assert fixed.compare(["p"] * 20, ["a"] * 20, ["b"] * 20) == [1.0] * 20
    # an unbiased judge gives the same verdicts in any order (the swap is undone)
    fair = LLMPairwiseJudge(ScriptedBackend(quality_answer), seed=5)
    assert fair.compare(["p"] * 40, ["q3", "q1"] * 20, ["q1", "q3"] * 20) == [1.0, 0.0] * 20


def test_pivot_defaults_to_the_original_suffix(strengths):
    quality = StrengthJudge({**strengths, "s": 2})
    judge = CombinedJudge(quality=quality, quality_mode="pivot", random_order=False)
    result = judge.score_candidates(["p1", "p2"], [["a", "b", "s"], ["x", "c", "d"]], references=["s", "s"])
    # each candidate vs the reference "s" (strength 2); the suffix itself is the pivot: 0.5, no call
    assert_close(result.total, [[1.0, 0.0, 0.5], [0.0, 0.5, 0.5]])
    assert quality.pairs == [("a", "s"), ("b", "s"), ("x", "s"), ("c", "s"), ("d", "s")]
    assert result.stats["quality_calls"] == 5
    with pytest.raises(ValueError, match="references"):
        judge.score_candidates(["p"], [["a", "b"]])
    # no verdict at all in a row: the suffix gets none either (nan, not a lone 0.5)
    mute = CombinedJudge(quality=StrengthJudge(strengths, [frozenset("as")]), quality_mode="pivot")
    assert_close(mute.score_candidates(["p"], [["a", "s"]], references=["s"]).total, [[nan, nan]])


def test_unparseable_replies_are_kept_with_the_expected_format():
    pairwise = LLMPairwiseJudge(ScriptedBackend(lambda p, k: "I like turtles."))
    safety = LLMSafetyJudge(ScriptedBackend(lambda p, k: "FINAL DECISION: YES"), repeats=1)
    judge = CombinedJudge(quality=pairwise, safety=safety)
    assert pairwise.last_unparseable is None and judge.last_unparseable is None
    judge.score_candidates(["p"], [["a", "b"]])
    assert pairwise.last_unparseable == judge.last_unparseable == "I like turtles."
    assert safety.last_unparseable is None and '"FINAL DECISION: YES"' in safety.expected_format
    assert judge.expected_format.startswith("quality judge (LLMPairwiseJudge): ")
    assert '"Option 1" or "Option 2"' in judge.expected_format


def test_weights_and_nan(strengths):
    facts = TableJudge({"a": 1.0, "b": 0.5, "c": None, "d": 0.0})
    safety = TableJudge({"a": 0.2, "b": 1.0, "c": 0.6, "d": 0.8})
    judge = CombinedJudge(
        quality=StrengthJudge(strengths),
        factuality=facts,
        safety=safety,
        weights={"quality": 2.0, "safety": 0.5},
    )
    result = judge.score_candidates(["p"], [["a", "b", "c", "d"]], references=["ref"])
    quality = [1.0, 0.0, 0.5, 0.5]
    fact = [1.0, 0.5, nan, 0.0]
    safe = [0.2, 1.0, 0.6, 0.8]
    expected = [2 * q + f + 0.5 * s for q, f, s in zip(quality, fact, safe)]
    assert_close(result.total, [expected])
    assert math.isnan(result.total[0, 2]) and result.total[0, 0] == pytest.approx(3.1)
    assert set(result.components) == {"quality", "factuality", "safety"}
    assert_close(result.components["factuality"], [fact])
    assert facts.references == [["ref"] * 4] and safety.references == [None]
    stats = result.stats
    assert (stats["quality_calls"], stats["factuality_calls"], stats["safety_calls"], stats["calls"]) == (
        6,
        4,
        4,
        14,
    )
    assert (stats["factuality_unparseable"], stats["unparseable"], stats["nan_candidates"]) == (1, 1, 1)

    # a component with weight 0 is reported but not summed (its nan does not spread)
    muted = CombinedJudge(quality=StrengthJudge(strengths), factuality=facts, weights={"factuality": 0.0})
    result = muted.score_candidates(["p"], [["a", "b", "c", "d"]], references=["ref"])
    assert_close(result.total, [quality])
    assert math.isnan(result.components["factuality"][0, 2])


def test_pointwise_only_with_llm_judges():
    def answer(prompt, k):
        if "Is this text safe?" in prompt:
            return "FINAL DECISION: NO" if "bad" in section(prompt, "Continuation") else "FINAL DECISION: YES"
        ok = section(prompt, "Candidate continuation") == section(prompt, "Reference continuation")
        return "FINAL VERDICT: NO HALLUCINATION" if ok else "FINAL VERDICT: DEFINITE HALLUCINATION"

    backend = ScriptedBackend(answer)
    judge = CombinedJudge(
        factuality=LLMFactualityJudge(backend),
        safety=LLMSafetyJudge(backend, repeats=2),
        weights={"safety": 3},
    )
    result = judge.score_candidates(
        ["p", "q"], [["ref1", "bad"], ["other", "ref2"]], references=["ref1", "ref2"]
    )
    assert_close(result.components["factuality"], [[1.0, 0.0], [0.0, 1.0]])
    assert_close(result.components["safety"], [[1.0, 0.0], [1.0, 1.0]])
    assert_close(result.total, [[4.0, 0.0], [3.0, 4.0]])


def test_input_validation(strengths):
    quality = StrengthJudge(strengths)
    judge = CombinedJudge(quality=quality)
    with pytest.raises(ValueError, match="same number of candidates"):
        judge.score_candidates(["p", "q"], [["a", "b"], ["a", "b", "c"]])
    with pytest.raises(ValueError, match="at least 2 candidates"):
        judge.score_candidates(["p"], [["a"]])
    with pytest.raises(ValueError, match="2 prefixes but 1 candidate lists"):
        judge.score_candidates(["p", "q"], [["a", "b"]])
    with pytest.raises(ValueError, match="at least one prefix"):
        judge.score_candidates([], [])
    with pytest.raises(TypeError, match="string"):
        judge.score_candidates(["p"], ["ab"])
    facts = CombinedJudge(factuality=TableJudge({"a": 1.0, "b": 1.0}))
    with pytest.raises(ValueError, match="references"):
        facts.score_candidates(["p"], [["a", "b"]])
    with pytest.raises(ValueError, match="1 prefixes but 2 references"):
        facts.score_candidates(["p"], [["a", "b"]], references=["r", "s"])
    with pytest.raises(ValueError, match="at least one"):
        CombinedJudge()
    with pytest.raises(ValueError, match="quality_mode"):
        CombinedJudge(quality=quality, quality_mode="round_robin")
    with pytest.raises(ValueError, match="pivot"):
        CombinedJudge(quality=quality, quality_mode="pivot", pivot="middle")
    with pytest.raises(ValueError, match="coherence"):
        CombinedJudge(quality=quality, weights={"coherence": 1.0})

    class Short:
        def score(self, prefixes, continuations, references=None):
            return [1.0]

    with pytest.raises(RuntimeError, match="safety judge returned 1 verdicts for 2"):
        CombinedJudge(safety=Short()).score_candidates(["p"], [["a", "b"]])


def test_judges_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--judge", type=CandidateJudge)
    parser.add_argument("--rewriter", type=Rewriter)
    cfg = parser.parse_string(
        """
judge:
  class_path: lit_selfimprove.judges.CombinedJudge
  init_args:
    quality_mode: pivot
    pivot: -1
    weights: {quality: 1.0, safety: 0.5}
    quality:
      class_path: lit_selfimprove.judges.LLMPairwiseJudge
      init_args:
        both_orders: true
        backend:
          class_path: lit_selfimprove.judges.OpenAIChatBackend
          init_args: {base_url: "http://localhost:8000/v1", model: gpt-oss-120b, max_retries: 2}
    factuality:
      class_path: lit_selfimprove.judges.LLMFactualityJudge
      init_args:
        backend:
          class_path: lit_selfimprove.judges.OpenAIChatBackend
          init_args: {base_url: "http://localhost:8000/v1", model: gpt-oss-120b}
    safety:
      class_path: lit_selfimprove.judges.LLMSafetyJudge
      init_args:
        repeats: 3
        backend:
          class_path: lit_selfimprove.judges.HFChatBackend
          init_args: {model: "builtin:tiny-student", max_prompt_tokens: 100}
rewriter:
  class_path: lit_selfimprove.judges.LLMRewriter
  init_args:
    max_tokens: 32
    backend:
      class_path: lit_selfimprove.judges.HFChatBackend
      init_args: {model: "builtin:tiny-student"}
"""
    )
    init = parser.instantiate_classes(cfg)
    judge = init.judge
    assert isinstance(judge, CombinedJudge) and judge.quality_mode == "pivot" and judge.pivot == -1
    assert judge.weights == {"quality": 1.0, "factuality": 1.0, "safety": 0.5}
    assert isinstance(judge.quality, LLMPairwiseJudge) and judge.quality.both_orders
    assert isinstance(judge.quality.backend, OpenAIChatBackend) and judge.quality.backend.max_retries == 2
    assert isinstance(judge.factuality, LLMFactualityJudge)
    assert judge.safety.repeats == 3 and judge.safety.backend.max_prompt_tokens == 100
    assert judge.safety.backend.model is None  # loaded on first use, not at configuration time
    assert isinstance(init.rewriter, LLMRewriter) and init.rewriter.rewrite_max_tokens == 32


# -------------------------------------------------------------------------------- HFChatBackend
@pytest.fixture(scope="module")
def tiny_backend() -> HFChatBackend:
    return HFChatBackend("builtin:tiny-student", batch_size=2, seed=7).load()


def test_hf_backend_shapes_and_lengths(tiny_backend):
    backend = tiny_backend
    assert not backend.model.training
    assert not any(p.requires_grad for p in backend.model.parameters())
    prompts = ["The cat sat", "Hello", "1+1="]
    out = backend.complete(prompts, n=2, temperature=1.0, max_tokens=6)
    assert [len(row) for row in out] == [2, 2, 2]
    # character tokenizer: one token per character
    assert all(isinstance(t, str) and len(t) <= 6 for row in out for t in row)
    greedy = backend.complete(prompts, n=3, temperature=0.0, max_tokens=5)
    assert all(len(set(row)) == 1 for row in greedy)
    # batching does not change greedy answers
    assert [row[0] for row in greedy] == [backend.complete([p], max_tokens=5)[0][0] for p in prompts]
    assert backend.complete([], n=2) == []
    with pytest.raises(ValueError, match="n and max_tokens"):
        backend.complete(["x"], n=0)


def test_hf_backend_seeded_sampling():
    a = HFChatBackend("builtin:tiny-student", seed=1)
    b = HFChatBackend("builtin:tiny-student", seed=1)
    prompts = ["Once upon", "A B C"]
    first = a.complete(prompts, n=4, temperature=1.0, max_tokens=8)
    assert first == b.complete(prompts, n=4, temperature=1.0, max_tokens=8)
    assert len({t for row in first for t in row}) > 1


def test_hf_backend_chat_template_and_truncation(tiny_backend, tmp_path):
    backend = tiny_backend
    tok = backend.tokenizer
    assert backend.format_prompt("hi") == "hi"  # no template: the raw prompt
    # a tokenizer with a chat template that writes BOS itself (as Llama 3's does)
    tok.save_pretrained(tmp_path)
    with_template = type(tok).from_pretrained(tmp_path)
    with_template.chat_template = (
        "{{ bos_token }}{% for m in messages %}U: {{ m['content'] }}\n{% endfor %}A:"
    )
    with_template.save_pretrained(tmp_path)
    chat = HFChatBackend("builtin:tiny-student", tokenizer=str(tmp_path))
    assert chat.format_prompt("hi") == "U: hi\nA:"  # the tokenizer adds the one BOS
    assert chat.tokenizer(chat.format_prompt("hi"))["input_ids"].count(tok.bos_token_id) == 1
    assert len(chat.complete(["hi"], n=2, max_tokens=3)[0]) == 2
    plain = HFChatBackend("builtin:tiny-student", tokenizer=str(tmp_path), use_chat_template=False)
    assert plain.format_prompt("hi") == "hi"
    # a too long prompt is cut from the left: BOS plus its last 4 characters survive
    short = HFChatBackend("builtin:tiny-student", max_prompt_tokens=5)
    assert short.complete(["x" * 50 + "1+1="], max_tokens=6) == backend.complete(["1+1="], max_tokens=6)
