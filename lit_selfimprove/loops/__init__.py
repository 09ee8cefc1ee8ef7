"""The loops that sample and score (above ``rl/``, which is tensors only): one RLVR update, the
policy-gradient update on sampled rollouts, and the parsing of SOAR teacher completions."""
