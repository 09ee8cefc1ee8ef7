"""MathVerifierJudge on hand-made math suffixes: right, wrong, missing answers; pairwise; combined."""

import math

import pytest

from lit_selfimprove.judges import CombinedJudge, MathVerifierJudge

PREFIX = "Q: What is 1/2 + 1/4?\nA: Put both over 4: "
REFERENCE = "2/4 + 1/4 = 3/4, so the answer is \\boxed{\\frac{3}{4}}."
RIGHT = "2/4 + 1/4 = 3/4. \\boxed{\\frac34}"  # another spelling of the same answer
RIGHT_DECIMAL = "that is 0.75, \\boxed{0.75}"
WRONG = "1/4 + 1/4 = 2/4. \\boxed{\\frac{1}{2}}"
MISSING = "then add the numerators and simplify."
UNCLOSED = "so the answer is \\boxed{\\frac{3}{4"  # cut off mid-box: states nothing
EMPTY = "the answer is \\boxed{}"


@pytest.fixture(scope="module")
def judge():
    judge = MathVerifierJudge(missing_score=0.0, wrong_score=-1.0)
    yield judge
    judge.close()


def test_pointwise_right_wrong_missing(judge):
    texts = [RIGHT, RIGHT_DECIMAL, WRONG, MISSING, UNCLOSED, EMPTY, REFERENCE]
    scores = judge.score([PREFIX] * len(texts), texts, [REFERENCE] * len(texts))
    assert scores == [1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 1.0]


def test_the_answer_may_sit_in_the_prefix_and_a_document_without_one_is_unverifiable(judge):
    prefix = "Q: 2+3? A: \\boxed{5}. Q: 4+4? A: \\boxed{8}"  # cut after the document's last answer
    assert judge.score([prefix, prefix], ["\\boxed{8}", "\\boxed{5}"], [". The end.", ". The end."]) == [
        1.0,
        -1.0,
    ]
    before = judge.counts["no_reference_answer"]
    assert judge.score(["A story: "], ["\\boxed{1}"], ["once upon a time."]) == [None]
    assert judge.counts["no_reference_answer"] == before + 1
    assert "once upon a time" in judge.last_unparseable


def test_pairwise_the_right_one_wins(judge):
    firsts = [RIGHT, WRONG, MISSING, WRONG, RIGHT]
    seconds = [WRONG, RIGHT, WRONG, WRONG, RIGHT_DECIMAL]
    verdicts = judge.compare([PREFIX] * 5, firsts, seconds, [REFERENCE] * 5)
    assert verdicts == [1.0, 0.0, 1.0, 0.5, 0.5]  # missing (0) beats wrong (-1) with these scores
    assert judge.compare(["A story: "], [RIGHT], [WRONG], ["no answer here"]) == [None]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="right_score"):
        MathVerifierJudge(right_score=0.0)
    judge = MathVerifierJudge()
    with pytest.raises(ValueError, match="needs references"):
        judge.score([PREFIX], [RIGHT])
    with pytest.raises(ValueError, match="1 prefixes, 2 continuations"):
        judge.score([PREFIX], [RIGHT, WRONG], [REFERENCE])
    with pytest.raises(ValueError, match="needs references"):
        judge.compare([PREFIX], [RIGHT], [WRONG])


class _Always:
    """A pairwise 'LLM' judge that always prefers the first text (to combine with)."""

    def compare(self, prefixes, firsts, seconds):
        return [1.0] * len(prefixes)


def test_combined_quality_slot_gets_the_references_and_mixes_with_another_judge(judge):
    candidates = [[WRONG, RIGHT, MISSING]]
    combined = CombinedJudge(quality=judge, quality_mode="all_pairs", random_order=False)
    scores = combined.score_candidates([PREFIX], candidates, [REFERENCE])
    # RIGHT beats both, MISSING beats WRONG: win rates 0, 1, 1/2
    assert scores.total.tolist() == [[0.0, 1.0, 0.5]]
    with pytest.raises(ValueError, match="quality judge \\(MathVerifierJudge\\) needs references"):
        combined.score_candidates([PREFIX], candidates)
    mixed = CombinedJudge(quality=_Always(), factuality=judge, random_order=False, weights={"quality": 0.5})
    out = mixed.score_candidates([PREFIX], candidates, [REFERENCE])
    assert out.components["factuality"].tolist() == [[-1.0, 1.0, 0.0]]
    assert out.components["quality"].tolist() == [[1.0, 0.5, 0.0]]  # first shown always wins
    assert out.total.tolist() == [[-0.5, 1.25, 0.0]]


def test_unverifiable_documents_are_nan_in_the_combination(judge):
    out = CombinedJudge(factuality=judge).score_candidates(["A story: "], [[RIGHT, WRONG]], ["no answer"])
    assert all(math.isnan(v) for v in out.total.flatten().tolist())
    assert out.stats["factuality_unparseable"] == 2 and out.stats["nan_candidates"] == 2
