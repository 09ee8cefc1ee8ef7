"""LightningModules, one per file."""

from lit_selfimprove.modules.next_token import NextTokenLM
from lit_selfimprove.modules.student_rlvr import StudentRLVR
from lit_selfimprove.modules.suffix_policy_dpo import SuffixPolicyDPO
from lit_selfimprove.modules.teacher_meta_rl import TeacherMetaRL

__all__ = ["NextTokenLM", "StudentRLVR", "SuffixPolicyDPO", "TeacherMetaRL"]
