"""LightningModules, one per file."""

from lit_selfimprove.modules.next_token import NextTokenLM
from lit_selfimprove.modules.student_rlvr import StudentRLVR

__all__ = ["NextTokenLM", "StudentRLVR"]
