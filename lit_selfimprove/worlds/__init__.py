"""The two tiny worlds, pure (no Lightning, no tokenizer): :mod:`~lit_selfimprove.worlds.arithmetic`
(synthetic addition for SOAR / RLVR) and :mod:`~lit_selfimprove.worlds.facts` (the knowledge base
and corpus for SIP). DataModules, judges and tools import them."""
