"""ModelRewriter: a model's own continuation of the prefix as the rewrite."""

import pytest
import torch

from lit_selfimprove.generation import generate
from lit_selfimprove.judges import ModelRewriter, Rewriter
from lit_selfimprove.modeling import load_causal_lm, load_tokenizer
from tests.helpers import needs_assets

PREFIXES = ["Q: 345+678\nA: ", "Q: 58+79\nA: 8+9"]
SUFFIXES = ["5+8=13,4+7+1=12,3+6+1=10 \\boxed{1023}", "=17,5+7+1=13 \\boxed{137}"]


@needs_assets("tiny-student")
def test_the_rewrite_is_the_models_greedy_continuation_within_the_suffix_length():
    rewriter = ModelRewriter("builtin:tiny-student", batch_size=1)
    assert isinstance(rewriter, Rewriter)
    rewrites = rewriter.rewrite(PREFIXES, SUFFIXES)
    model, tok = load_causal_lm("builtin:tiny-student"), load_tokenizer("builtin:tiny-student")
    for prefix, suffix, rewrite in zip(PREFIXES, SUFFIXES, rewrites):
        budget = len(tok(suffix, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            expected = generate(model, tok, [prefix], max_new_tokens=budget, temperature=0.0).texts[0]
        assert rewrite == expected
        assert len(tok(rewrite, add_special_tokens=False)["input_ids"]) <= budget
    assert "\\boxed{" in rewrites[0]  # the bundled student solves with a scratchpad and a box
    assert rewriter.rewrite(PREFIXES, SUFFIXES) == rewrites  # greedy: a function of the prefix
    short = ModelRewriter("builtin:tiny-student", max_new_tokens=3).rewrite(PREFIXES[:1], SUFFIXES[:1])
    assert len(tok(short[0], add_special_tokens=False)["input_ids"]) <= 3


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="max_new_tokens"):
        ModelRewriter("builtin:tiny-student", max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        ModelRewriter("builtin:tiny-student", temperature=-1.0)
    rewriter = ModelRewriter("builtin:tiny-student")
    with pytest.raises(ValueError, match="2 prefixes but 1 suffixes"):
        rewriter.rewrite(PREFIXES, SUFFIXES[:1])
    with pytest.raises(TypeError, match="not a str"):
        rewriter.rewrite("Q: 1+1\nA: ", ["2"])
