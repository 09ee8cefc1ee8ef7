"""A judge that answers nothing usable must not train nothing silently.

Against an endpoint that answers "I like turtles." every verdict is unparseable and every
prefix is skipped: SuffixPolicyDPO warns on the console (judge, share, a sample reply, the
expected format) and, after ``fail_after_steps`` such steps in a row, stops with an error.
"""

from __future__ import annotations

import warnings

import pytest

from lit_selfimprove.judges import CombinedJudge, LLMFactualityJudge, LLMPairwiseJudge
from lit_selfimprove.modules.sip_settings import (
    CandidateConfig,
    JudgeHealthConfig,
    ObjectiveConfig,
    OptimConfig,
)
from lit_selfimprove.modules.suffix_policy_dpo import SuffixPolicyDPO
from tests.helpers import (
    ScriptedBackend,
    ToyPrefixSuffixData,
    backend_for,
    csv_metrics,
    tiny_trainer,
    toy_documents,
)

TURTLES = "I like turtles."


def _fit(module: SuffixPolicyDPO, tmp_path, steps: int, caught: list[str]):
    """Fit ``steps`` steps; the module's judge warnings are appended to ``caught`` (also on an error)."""
    trainer = tiny_trainer(steps, tmp_path, logger=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, ToyPrefixSuffixData(toy_documents(2 * steps), batch_size=2))
        finally:
            caught += [str(w.message) for w in record if "judge" in str(w.message)]
    return trainer


def test_unparseable_judge_over_http_warns_then_stops(tiny_random_lm, tmp_path, serve):
    server = serve(lambda body, index: (200, [TURTLES] * body.get("n", 1)))
    judge = CombinedJudge(quality=LLMPairwiseJudge(backend_for(server)))
    module = SuffixPolicyDPO(
        tiny_random_lm,
        judge=judge,
        candidates=CandidateConfig(num_rollouts=2),
        optim=OptimConfig(warmup_steps=0),
        log_samples_every=0,
        judge_health=JudgeHealthConfig(fail_after_steps=3),
    )
    caught: list[str] = []
    with pytest.raises(RuntimeError) as info:
        _fit(module, tmp_path, 10, caught)
    message = str(info.value)
    for part in ("LLMPairwiseJudge", "3 consecutive steps", TURTLES, "Option 1", "fail_after_steps"):
        assert part in message, (part, message)
    # 3 steps of 2 prefixes x 3 pairs (2 rollouts + the suffix) were judged, then the run stopped
    assert len(server.requests) == 3 * 2 * 3
    (warning,) = caught  # once, when the trouble started
    for part in ("LLMPairwiseJudge", "100%", "unparseable", "skipped", TURTLES, "Option 1"):
        assert part in warning, (part, warning)


def test_unparseable_judge_warns_without_stopping_when_disabled(tiny_random_lm, tmp_path):
    backend = ScriptedBackend(lambda prompt, k: TURTLES)
    judge = CombinedJudge(factuality=LLMFactualityJudge(backend))
    module = SuffixPolicyDPO(
        tiny_random_lm,
        judge=judge,
        candidates=CandidateConfig(num_rollouts=2),
        objective=ObjectiveConfig(loss="rf_nll"),
        optim=OptimConfig(warmup_steps=0),
        log_samples_every=0,
        judge_health=JudgeHealthConfig(fail_after_steps=None),
    )
    caught: list[str] = []
    trainer = _fit(module, tmp_path, 4, caught)
    assert trainer.global_step == 4
    assert len(caught) == 1 and "LLMFactualityJudge" in caught[0] and "NO HALLUCINATION" in caught[0]
    assert csv_metrics(trainer)["select/skipped"] == [2.0] * 4


def test_healthy_judge_does_not_warn(tiny_random_lm, tmp_path):
    def answer(prompt, k):  # prefers the continuation with more vowels
        first, second = (prompt.split(f"[Option {i}]\n")[1].split("\n\n")[0] for i in (1, 2))
        vowels = [sum(c in "aeiou" for c in t) for t in (first, second)]
        return "Option 1" if vowels[0] >= vowels[1] else "Option 2"

    judge = CombinedJudge(quality=LLMPairwiseJudge(ScriptedBackend(answer)))
    module = SuffixPolicyDPO(
        tiny_random_lm,
        judge=judge,
        candidates=CandidateConfig(num_rollouts=3),
        optim=OptimConfig(warmup_steps=0),
        log_samples_every=0,
        judge_health=JudgeHealthConfig(max_skipped_frac=0.6, fail_after_steps=1),
    )
    caught: list[str] = []
    trainer = _fit(module, tmp_path, 3, caught)
    assert trainer.global_step == 3 and caught == []


class RecordingBackend(ScriptedBackend):
    """A scripted backend that keeps each call's raw replies (``replies[call][prompt]``)."""

    def __init__(self, answer):
        super().__init__(answer)
        self.replies: list[list[str]] = []

    def complete(self, prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=256):
        out = super().complete(prompts, n, temperature, top_p, max_tokens)
        self.replies.append([a for row in out for a in row])
        return out


def test_parse_rate_is_logged_every_step_and_equals_the_share_of_parsed_replies(tiny_random_lm, tmp_path):
    from lit_selfimprove.judges.prompts import parse_factuality, parse_pairwise

    counter = iter(range(10**6))
    # every third pairwise reply, every second factuality reply is not a verdict
    pairwise = RecordingBackend(lambda p, k: TURTLES if next(counter) % 3 == 0 else "Option 2")
    facts = RecordingBackend(lambda p, k: TURTLES if next(counter) % 2 else "FINAL VERDICT: NO HALLUCINATION")
    judge = CombinedJudge(quality=LLMPairwiseJudge(pairwise), factuality=LLMFactualityJudge(facts))
    module = SuffixPolicyDPO(
        tiny_random_lm,
        judge=judge,
        candidates=CandidateConfig(num_rollouts=2),
        optim=OptimConfig(warmup_steps=0),
        log_samples_every=0,
        judge_health=JudgeHealthConfig(fail_after_steps=None),
    )
    caught: list[str] = []
    trainer = _fit(module, tmp_path, 3, caught)
    metrics = csv_metrics(trainer)
    assert len(pairwise.replies) == len(facts.replies) == 3  # one call per judge and step
    expected, expected_q, expected_f = [], [], []
    for q, f in zip(pairwise.replies, facts.replies):
        ok_q = sum(parse_pairwise(r) is not None for r in q)
        ok_f = sum(parse_factuality(r) is not None for r in f)
        expected.append((ok_q + ok_f) / (len(q) + len(f)))
        expected_q.append(ok_q / len(q))
        expected_f.append(ok_f / len(f))
    assert 0 < min(expected) and max(expected) < 1  # a mix: not the trivial all / nothing
    assert metrics["judge/parse_rate"] == pytest.approx(expected)
    assert metrics["judge/quality_parse_rate"] == pytest.approx(expected_q)
    assert metrics["judge/factuality_parse_rate"] == pytest.approx(expected_f)
    assert trainer.progress_bar_metrics["parse_rate"] == pytest.approx(expected[-1])
