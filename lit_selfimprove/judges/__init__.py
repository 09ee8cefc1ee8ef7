"""Judges and rewriters of Self-Improving Pretraining: protocols, LLM judges, backends, combination.

Compose them in YAML with ``class_path:`` / ``init_args:``, e.g. a prompted judge served by vLLM::

    judge:
      class_path: lit_selfimprove.judges.CombinedJudge
      init_args:
        quality:
          class_path: lit_selfimprove.judges.LLMPairwiseJudge
          init_args:
            backend:
              class_path: lit_selfimprove.judges.OpenAIChatBackend
              init_args: {base_url: http://localhost:8000/v1, model: openai/gpt-oss-120b}
"""

from lit_selfimprove.judges.backends import ChatBackend, HFChatBackend, JudgeEndpointError, OpenAIChatBackend
from lit_selfimprove.judges.base import (
    CandidateJudge,
    CandidateScores,
    PairwiseJudge,
    PointwiseJudge,
    Rewriter,
)
from lit_selfimprove.judges.combined import COMPONENTS, CombinedJudge
from lit_selfimprove.judges.knowledge_base import (
    KBFactualityJudge,
    KBQualityJudge,
    KBRewriter,
    KBSafetyJudge,
    kb_batch_stats,
)
from lit_selfimprove.judges.llm import LLMFactualityJudge, LLMPairwiseJudge, LLMRewriter, LLMSafetyJudge
from lit_selfimprove.judges.model_rewriter import ModelRewriter
from lit_selfimprove.judges.prompts import (
    FACTUALITY_TEMPLATE,
    PAIRWISE_QUALITY_TEMPLATE,
    REWRITER_TEMPLATE,
    SAFETY_TEMPLATE,
    fill_template,
    parse_factuality,
    parse_pairwise,
    parse_safety,
)
from lit_selfimprove.judges.verifier import MathVerifierJudge

__all__ = [
    "COMPONENTS",
    "FACTUALITY_TEMPLATE",
    "PAIRWISE_QUALITY_TEMPLATE",
    "REWRITER_TEMPLATE",
    "SAFETY_TEMPLATE",
    "CandidateJudge",
    "CandidateScores",
    "ChatBackend",
    "CombinedJudge",
    "HFChatBackend",
    "JudgeEndpointError",
    "KBFactualityJudge",
    "KBQualityJudge",
    "KBRewriter",
    "KBSafetyJudge",
    "LLMFactualityJudge",
    "LLMPairwiseJudge",
    "LLMRewriter",
    "LLMSafetyJudge",
    "MathVerifierJudge",
    "ModelRewriter",
    "OpenAIChatBackend",
    "PairwiseJudge",
    "PointwiseJudge",
    "Rewriter",
    "fill_template",
    "kb_batch_stats",
    "parse_factuality",
    "parse_pairwise",
    "parse_safety",
]
