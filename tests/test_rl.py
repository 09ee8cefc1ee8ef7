"""Tests for lit_selfimprove.rl. Every expected number is worked out by hand in the adjacent comment."""

import math

import pytest
import torch

from lit_selfimprove.rl import (
    aggregate_loss,
    compute_advantages,
    dpo_loss,
    dr_grpo_advantages,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    nll_loss,
    policy_gradient_loss,
    rloo_advantages,
    selective_log_softmax,
    sequence_logprobs,
    zero_std_fraction,
)


def close(actual, expected, atol=1e-4):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.float(), expected, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------------


def test_rloo_hand_values():
    # group 0: r = [1, 0, 0, 1], sum = 2, G = 4
    #   r=1: 1 - (2 - 1)/3 = 1 - 1/3 = 0.6667 ; r=0: 0 - (2 - 0)/3 = -0.6667
    # group 1: r = [1, 0, 0, 0], sum = 1
    #   r=1: 1 - 0/3 = 1.0 ; r=0: 0 - 1/3 = -0.3333
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    close(rloo_advantages(rewards), [[0.6667, -0.6667, -0.6667, 0.6667], [1.0, -0.3333, -0.3333, -0.3333]])
    # G = 3: r = [3, 1, 2], sum = 6: 3 - 3/2 = 1.5 ; 1 - 5/2 = -1.5 ; 2 - 4/2 = 0
    close(rloo_advantages(torch.tensor([[3.0, 1.0, 2.0]])), [[1.5, -1.5, 0.0]])
    # integer rewards are accepted and give float advantages
    close(rloo_advantages(torch.tensor([[1, 0]])), [[1.0, -1.0]])  # 1 - 0/1 = 1 ; 0 - 1/1 = -1


def test_rloo_peers_identity():
    # PEERS identity: RLOO = G/(G-1) * (r - mean).  [1,0,0,0]: mean = 0.25, 4/3 * 0.75 = 1.0,
    # 4/3 * (-0.25) = -0.3333 -- same as the leave-one-out values above. Check on random data too.
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(5, 6, generator=gen)
    g = rewards.shape[1]
    expected = g / (g - 1) * (rewards - rewards.mean(dim=1, keepdim=True))
    torch.testing.assert_close(rloo_advantages(rewards), expected)
    torch.testing.assert_close(rloo_advantages(rewards), g / (g - 1) * dr_grpo_advantages(rewards))


def test_rloo_and_grpo_need_two_samples():
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError):
        grpo_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([1.0, 0.0]))  # not [num_groups, G]


def test_grpo_hand_values():
    # r = [1, 0, 0, 1]: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735
    # eps = 0: +-0.5 / 0.57735 = +-0.8660
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    close(grpo_advantages(rewards, eps=0.0), [[0.8660, -0.8660, -0.8660, 0.8660]])
    # default eps = 1e-4: 0.5 / (0.57735 + 0.0001) = 0.5 / 0.57745 = 0.86588
    close(grpo_advantages(rewards), [[0.86588, -0.86588, -0.86588, 0.86588]], atol=1e-5)
    # r = [3, 1, 2]: mean 2, dev [1, -1, 0], unbiased var = 2/2 = 1, std = 1 -> [1, -1, 0]/(1 + 1e-4)
    #   1 / 1.0001 = 0.99990
    close(grpo_advantages(torch.tensor([[3.0, 1.0, 2.0]])), [[0.99990, -0.99990, 0.0]], atol=1e-5)
    # all-equal group: 0 / (0 + eps) = 0
    close(grpo_advantages(torch.tensor([[2.0, 2.0, 2.0, 2.0]])), [[0.0, 0.0, 0.0, 0.0]])


def test_dr_grpo_hand_values():
    # r - mean: [1,0,0,1] - 0.5 = [0.5,-0.5,-0.5,0.5] ; [3,1,2] - 2 = [1,-1,0]
    close(dr_grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]])), [[0.5, -0.5, -0.5, 0.5]])
    close(dr_grpo_advantages(torch.tensor([[3.0, 1.0, 2.0]])), [[1.0, -1.0, 0.0]])
    # G = 1 is allowed: 5 - 5 = 0
    close(dr_grpo_advantages(torch.tensor([[5.0]])), [[0.0]])


def test_compute_advantages_dispatch():
    rewards = torch.tensor([[3.0, 1.0, 2.0]])
    close(compute_advantages(rewards, "rloo"), [[1.5, -1.5, 0.0]])  # see test_rloo_hand_values
    close(compute_advantages(rewards, "dr_grpo"), [[1.0, -1.0, 0.0]])  # see test_dr_grpo_hand_values
    close(compute_advantages(rewards, "grpo"), [[0.99990, -0.99990, 0.0]], atol=1e-5)
    with pytest.raises(ValueError, match="rloo"):
        compute_advantages(rewards, "ppo")


def test_zero_std_fraction():
    # groups: [1,1,1] equal, [0,1,0] not, [0,0,0] equal, [2,3,2] not -> 2/4 = 0.5
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 3.0, 2.0]])
    frac = zero_std_fraction(rewards)
    assert frac.ndim == 0 and frac.is_floating_point()
    close(frac, 0.5)
    close(zero_std_fraction(torch.tensor([[1, 1], [1, 1]])), 1.0)  # 2/2
    close(zero_std_fraction(torch.tensor([[1, 0]])), 0.0)  # 0/1


# ----------------------------------------------------------------------------------------------------
# masked_mean / aggregate_loss
# ----------------------------------------------------------------------------------------------------


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    close(masked_mean(values, mask), 8.0 / 3.0)  # (1 + 3 + 4) / 3 = 2.6667
    close(masked_mean(values, mask, dim=1), [1.0, 3.5])  # [1/1, (3+4)/2]
    close(masked_mean(values, mask, dim=0), [2.0, 4.0])  # [(1+3)/2, 4/1]
    close(masked_mean(values, torch.zeros(2, 2)), 0.0)  # empty mask -> 0, not NaN


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # third sequence has an empty mask


def test_aggregate_token():
    # (1 + 2 + 4) / 3 tokens = 7/3 = 2.3333
    close(aggregate_loss(PER_TOKEN, MASK, "token"), 2.3333)


def test_aggregate_sequence_excludes_empty_sequences():
    # row means: (1+2)/2 = 1.5 ; 4/1 = 4 ; row 3 is empty -> excluded: (1.5 + 4) / 2 = 2.75
    close(aggregate_loss(PER_TOKEN, MASK, "sequence"), 2.75)


def test_aggregate_fixed():
    # sum = 7, B = 3, max_tokens = 4: 7 / (3 * 4) = 0.58333
    close(aggregate_loss(PER_TOKEN, MASK, "fixed", max_tokens=4), 0.58333)
    with pytest.raises(ValueError):
        aggregate_loss(PER_TOKEN, MASK, "fixed")
    with pytest.raises(ValueError):
        aggregate_loss(PER_TOKEN, MASK, "mean")


def test_aggregate_all_empty_and_non_finite_padding():
    per_token = PER_TOKEN.clone().requires_grad_(True)
    empty = torch.zeros(3, 3)
    for mode in ("token", "sequence"):
        out = aggregate_loss(per_token, empty, mode)
        close(out, 0.0)  # nothing to average -> 0, not NaN
        out.backward()
        assert torch.all(per_token.grad == 0)
        per_token.grad = None
    # inf / nan under the mask must not leak: still (1 + 2 + 4) / 3 = 2.3333
    dirty = PER_TOKEN.clone()
    dirty[0, 2] = float("inf")
    dirty[2, 0] = float("nan")
    close(aggregate_loss(dirty, MASK, "token"), 2.3333)
    close(aggregate_loss(dirty, MASK, "sequence"), 2.75)


# ----------------------------------------------------------------------------------------------------
# policy_gradient_loss
# ----------------------------------------------------------------------------------------------------


def _pg_inputs():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([2.0, -1.0])
    return logprobs, mask, advantages


def test_pg_unclipped_reinforce_value_and_grad_token_mode():
    logprobs, mask, adv = _pg_inputs()
    loss, stats = policy_gradient_loss(logprobs, None, adv, mask)
    # per-token loss = -A: row0 [-2, -2, (masked)], row1 [1, 1, 1]; 5 tokens: (-4 + 3)/5 = -0.2
    close(loss, -0.2)
    loss.backward()
    # d loss / d logp_t = -A_b / num_tokens: row0 -2/5 = -0.4 ; row1 1/5 = 0.2 ; masked -> 0
    close(logprobs.grad, [[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]])
    close(stats["clip_fraction"], 0.0)
    close(stats["ratio_mean"], 1.0)  # exp(logp - logp.detach()) = 1
    assert not stats["ratio_mean"].requires_grad


def test_pg_unclipped_sequence_and_fixed_modes():
    logprobs, mask, adv = _pg_inputs()
    loss, _ = policy_gradient_loss(logprobs, None, adv, mask, aggregation="sequence")
    # row means: -2 and 1 -> (-2 + 1)/2 = -0.5
    close(loss, -0.5)
    loss.backward()
    # -A_b / (n_b * B): row0 -2/(2*2) = -0.5 ; row1 1/(3*2) = 0.16667
    close(logprobs.grad, [[-0.5, -0.5, 0.0], [0.16667, 0.16667, 0.16667]])

    logprobs, mask, adv = _pg_inputs()
    loss, _ = policy_gradient_loss(logprobs, None, adv, mask, aggregation="fixed", max_tokens=4)
    # sum = -4 + 3 = -1 ; / (B * max_tokens) = -1/8 = -0.125
    close(loss, -0.125)
    loss.backward()
    # -A_b / 8: row0 -0.25 ; row1 0.125
    close(logprobs.grad, [[-0.25, -0.25, 0.0], [0.125, 0.125, 0.125]])


LN15, LN2 = math.log(1.5), math.log(2.0)


def _ratio_inputs(ratios):
    """logprobs all -1.0 and old_logprobs chosen so that exp(logp - old) equals `ratios`."""
    logprobs = torch.full((1, len(ratios)), -1.0, requires_grad=True)
    old = torch.tensor([[-1.0 - math.log(r) for r in ratios]])
    return logprobs, old


def test_pg_importance_weight_without_clipping():
    logprobs, old = _ratio_inputs([1.5, 0.5])
    loss, stats = policy_gradient_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2))
    # per-token -A * ratio = [-1.5, -0.5] -> mean -1.0
    close(loss, -1.0)
    loss.backward()
    # d(-A * ratio)/dlogp = -A * ratio, / 2 tokens: [-0.75, -0.25]
    close(logprobs.grad, [[-0.75, -0.25]])
    close(stats["ratio_mean"], 1.0)  # (1.5 + 0.5)/2
    close(stats["clip_fraction"], 0.0)


def test_pg_clipping_positive_advantage():
    # ratios [1.5, 0.5, 3.0] with the third token masked; A = +1, eps_low = 0.2, eps_high = 0.28
    logprobs, old = _ratio_inputs([1.5, 0.5, 3.0])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_gradient_loss(
        logprobs, old, torch.tensor([1.0]), mask, clip_eps_low=0.2, clip_eps_high=0.28
    )
    # token0: min(1.5, clamp(1.5, 0.8, 1.28)=1.28) = 1.28 (clipped) ; token1: min(0.5, 0.8) = 0.5 (unclipped)
    # loss = -(1.28 + 0.5)/2 = -0.89
    close(loss, -0.89)
    loss.backward()
    # clipped token has zero grad ; token1: -A * ratio / 2 = -0.5/2 = -0.25
    close(logprobs.grad, [[0.0, -0.25, 0.0]])
    # 1 clipped of 2 unmasked (the masked ratio 3.0 does not count) = 0.5, all of it "high"
    close(stats["clip_fraction"], 0.5)
    close(stats["clip_high_fraction"], 0.5)
    close(stats["clip_low_fraction"], 0.0)
    close(stats["ratio_mean"], 1.0)  # (1.5 + 0.5)/2


def test_pg_clipping_negative_advantage():
    logprobs, old = _ratio_inputs([1.5, 0.5])
    loss, stats = policy_gradient_loss(
        logprobs, old, torch.tensor([-1.0]), torch.ones(1, 2), clip_eps_low=0.2, clip_eps_high=0.28
    )
    # token0: min(-1.5, -1.28) = -1.5 (unclipped) -> +1.5 ; token1: min(-0.5, -clamp(0.5)=-0.8) = -0.8 (clipped)
    # loss = (1.5 + 0.8)/2 = 1.15
    close(loss, 1.15)
    loss.backward()
    # token0: -A * ratio / 2 = 1.5/2 = 0.75 ; token1 clipped -> 0
    close(logprobs.grad, [[0.75, 0.0]])
    close(stats["clip_fraction"], 0.5)  # 1 of 2
    close(stats["clip_low_fraction"], 0.5)


def test_pg_clipping_asymmetric_vs_symmetric():
    # ratios [1.25, 0.75], A = +1
    logprobs, old = _ratio_inputs([1.25, 0.75])
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2)
    # eps_high = 0.28: 1.25 < 1.28 -> not clipped ; 0.75 with A > 0: min(0.75, 0.8) = 0.75 unclipped
    # loss = -(1.25 + 0.75)/2 = -1.0, clip_fraction 0/2 = 0
    loss, stats = policy_gradient_loss(logprobs, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28)
    close(loss, -1.0)
    close(stats["clip_fraction"], 0.0)
    # eps_high defaults to eps_low = 0.2: 1.25 > 1.2 -> clipped to 1.2 ; loss = -(1.2 + 0.75)/2 = -0.975
    # clip_fraction = 1/2 = 0.5
    loss, stats = policy_gradient_loss(logprobs, old, adv, mask, clip_eps_low=0.2)
    close(loss, -0.975)
    close(stats["clip_fraction"], 0.5)


def test_pg_clipping_on_policy_equals_reinforce():
    # old_logprobs=None with clipping: ratio = 1, never clipped -> same value and grad as REINFORCE
    logprobs, mask, adv = _pg_inputs()
    loss, stats = policy_gradient_loss(logprobs, None, adv, mask, clip_eps_low=0.2)
    close(loss, -0.2)  # see test_pg_unclipped_reinforce_value_and_grad_token_mode
    loss.backward()
    close(logprobs.grad, [[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]])
    close(stats["clip_fraction"], 0.0)


def test_pg_rejects_bad_inputs():
    logprobs, mask, adv = _pg_inputs()
    with pytest.raises(ValueError):
        policy_gradient_loss(logprobs, None, adv, mask, clip_eps_high=0.28)
    with pytest.raises(ValueError):
        policy_gradient_loss(logprobs, None, adv[:1], mask)


# ----------------------------------------------------------------------------------------------------
# KL / DPO / NLL
# ----------------------------------------------------------------------------------------------------


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-2.0, -1.0, -0.5])
    # k1 = logp - ref: -1 - (-2) = 1 ; -2 - (-1) = -1 ; 0
    close(kl_penalty(logp, ref, "k1"), [1.0, -1.0, 0.0])
    # k2 = 0.5 * (logp - ref)^2: 0.5 ; 0.5 ; 0
    close(kl_penalty(logp, ref, "k2"), [0.5, 0.5, 0.0])
    # k3 = exp(ref - logp) - (ref - logp) - 1:
    #   ref - logp = -1: e^-1 + 1 - 1 = 0.36788 ; ref - logp = 1: e - 1 - 1 = 0.71828 ; 0: 1 - 0 - 1 = 0
    close(kl_penalty(logp, ref, "k3"), [0.36788, 0.71828, 0.0])
    close(kl_penalty(logp, ref), [0.36788, 0.71828, 0.0])  # default is k3
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_dpo_loss_hand_values():
    beta = 0.1
    pi_c = torch.tensor([-10.0, -5.0], requires_grad=True)
    pi_r = torch.tensor([-20.0, -4.0])
    ref_c = torch.tensor([-12.0, -5.0])
    ref_r = torch.tensor([-15.0, -6.0])
    loss, stats = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta)
    # pair 0: chosen reward 0.1*(-10+12) = 0.2, rejected 0.1*(-20+15) = -0.5, logit 0.7
    #   -logsigmoid(0.7) = log(1 + e^-0.7) = log(1.496585) = 0.403186
    # pair 1: chosen 0.1*(-5+5) = 0, rejected 0.1*(-4+6) = 0.2, logit -0.2
    #   -logsigmoid(-0.2) = log(1 + e^0.2) = log(2.221403) = 0.798139
    # mean = (0.403186 + 0.798139)/2 = 0.600663
    close(loss, 0.600663, atol=1e-5)
    close(stats["reward_chosen"], 0.1)  # (0.2 + 0)/2
    close(stats["reward_rejected"], -0.15)  # (-0.5 + 0.2)/2
    close(stats["margin"], 0.25)  # (0.7 - 0.2)/2
    close(stats["accuracy"], 0.5)  # pair 0 correct, pair 1 not
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    # d loss/d pi_c = -beta * sigmoid(-logit) / B: pair0 -0.1*sigmoid(-0.7)/2 = -0.1*0.331812/2 = -0.016591
    #   pair1 -0.1*sigmoid(0.2)/2 = -0.1*0.549834/2 = -0.027492
    close(pi_c.grad, [-0.016591, -0.027492], atol=1e-5)


def test_dpo_loss_zero_margin():
    z = torch.zeros(3)
    loss, stats = dpo_loss(z, z, z, z)
    close(loss, 0.693147, atol=1e-5)  # -logsigmoid(0) = log 2
    close(stats["accuracy"], 0.0)  # ties are not counted as correct


def test_nll_loss():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(nll_loss(logprobs, mask), 1.625)  # (1 + 2 + 3 + 0.5)/4 = 6.5/4
    close(nll_loss(logprobs, mask, aggregation="sequence"), 1.25)  # (6/3 + 0.5/1)/2 = (2 + 0.5)/2
    close(nll_loss(logprobs, mask, aggregation="fixed", max_tokens=4), 0.8125)  # 6.5/(2*4)


# ----------------------------------------------------------------------------------------------------
# log-probs
# ----------------------------------------------------------------------------------------------------


def test_selective_log_softmax_hand_value():
    # logits [0, ln 3] -> softmax [1/4, 3/4] -> log [ln 0.25, ln 0.75] = [-1.386294, -0.287682]
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    close(selective_log_softmax(logits, torch.tensor([0, 1])), [-1.386294, -0.287682], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_log_softmax_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=gen) * 4).to(dtype).requires_grad_(True)
    index = torch.randint(0, 11, (3, 5), generator=gen)
    out = selective_log_softmax(logits, index)
    ref = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == dtype and out.shape == (3, 5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    (g_out,) = torch.autograd.grad(out.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=0)


def test_selective_log_softmax_bf16():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 13, generator=gen) * 4).to(torch.bfloat16)
    index = torch.randint(0, 13, (2, 4), generator=gen)
    out = selective_log_softmax(logits, index)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == torch.float32  # computed (and returned) in float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _left_padded_batch():
    gen = torch.Generator().manual_seed(3)
    lengths, width, completion_len, pad_id = [6, 9, 4], 9, 3, 0
    rows = [torch.randint(1, 50, (n,), generator=gen) for n in lengths]
    input_ids = torch.full((len(rows), width), pad_id)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row) :] = row
        attention_mask[b, width - len(row) :] = 1
        completion_mask[b, width - completion_len :] = 1
    return rows, input_ids, attention_mask, completion_mask


def _reference_logprobs(model, rows, width, completion_len, temperature=1.0):
    """Per-row unpadded forward, scattered back into left-padded [B, width-1] coordinates."""
    expected = torch.zeros(len(rows), width - 1)
    for b, row in enumerate(rows):
        logits = model(input_ids=row[None]).logits[0, :-1] / temperature
        logps = torch.log_softmax(logits, -1).gather(-1, row[1:, None])[:, 0]  # predicts row[1:]
        pad = width - len(row)
        full = torch.zeros(width - 1)
        full[pad:] = logps  # column j predicts input_ids[:, j+1]
        full[: width - 1 - completion_len] = 0.0
        expected[b] = full
    return expected


def test_sequence_logprobs_matches_unpadded_forward(tiny_llama):
    rows, input_ids, attention_mask, completion_mask = _left_padded_batch()
    with torch.no_grad():
        out = sequence_logprobs(tiny_llama, input_ids, attention_mask, completion_mask)
        expected = _reference_logprobs(tiny_llama, rows, 9, 3)
        assert out.shape == (3, 8)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        assert torch.all(out[:, :5] == 0) and torch.all(out[:, 5:] < 0)

        out_t = sequence_logprobs(tiny_llama, input_ids, attention_mask, completion_mask, temperature=0.7)
        torch.testing.assert_close(out_t, _reference_logprobs(tiny_llama, rows, 9, 3, 0.7), atol=1e-5, rtol=0)

        # explicit position ids == the default (attention_mask.cumsum(-1) - 1).clamp(min=0)
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out_p = sequence_logprobs(tiny_llama, input_ids, attention_mask, completion_mask, position_ids=pos)
        torch.testing.assert_close(out_p, out, atol=0, rtol=0)


def test_sequence_logprobs_chunked_values_and_grads(tiny_llama):
    _, input_ids, attention_mask, completion_mask = _left_padded_batch()
    params = [p for p in tiny_llama.parameters() if p.requires_grad]

    full = sequence_logprobs(tiny_llama, input_ids, attention_mask, completion_mask)
    grads_full = torch.autograd.grad(full.sum(), params)
    for chunk in (1, 2):
        out = sequence_logprobs(tiny_llama, input_ids, attention_mask, completion_mask, chunk_size=chunk)
        torch.testing.assert_close(out, full, atol=1e-6, rtol=0)
        grads = torch.autograd.grad(out.sum(), params)  # one backward through all chunks
        for g, g_ref in zip(grads, grads_full):
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# rlvr_step: micro-batching
# ----------------------------------------------------------------------------------------------------


class _GradRecorder:
    """Stands in for the optimizer: ``step`` records the gradients, parameters never move."""

    def __init__(self, params):
        self.params, self.grads = list(params), []

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _rollouts_of_different_lengths():
    from lit_selfimprove.generation import Rollouts

    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([3, 1, 6, 2, 5, 4])  # 2 prompts x 3 samples
    completion_mask = (torch.arange(6)[None] < lengths[:, None]).long()
    return Rollouts(
        prompt_ids=torch.randint(1, 50, (6, 4), generator=gen),
        prompt_mask=torch.ones(6, 4, dtype=torch.long),
        completion_ids=torch.randint(1, 50, (6, 6), generator=gen) * completion_mask,
        completion_mask=completion_mask,
        texts=[""] * 6,
        finished=lengths < 6,
    )


@pytest.mark.parametrize("aggregation", ["token", "sequence", "fixed"])
def test_rlvr_step_gradient_does_not_depend_on_micro_batch_size(tiny_llama, aggregation, monkeypatch):
    """Micro-batches of 1 or 4 rows give the full batch's gradient (and loss) in every aggregation mode."""
    import copy

    import lit_selfimprove.loops.rlvr as rlvr_module
    from lit_selfimprove.rl import AGGREGATION_MODES

    assert set(AGGREGATION_MODES) == {"token", "sequence", "fixed"}  # a new mode needs a case here
    monkeypatch.setattr(rlvr_module, "generate", lambda *args, **kwargs: _rollouts_of_different_lengths())
    policy = copy.deepcopy(tiny_llama).float()
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a non-zero KL term

    def reward(completions, answers):
        return torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])

    results = []
    for micro_batch_size in (None, 1, 4):
        cfg = rlvr_module.RLVRConfig(
            group_size=3,
            max_new_tokens=6,
            loss_aggregation=aggregation,
            kl_coef=0.1,
            micro_batch_size=micro_batch_size,
            max_grad_norm=None,
        )
        opt = _GradRecorder(policy.parameters())
        stats, _, _ = rlvr_module.rlvr_step(policy, None, reward, ["a", "b"], ["1", "2"], cfg, opt, ref)
        results.append((stats, opt.grads[0]))
    (full_stats, full_grads), *micro = results
    assert any(float(g.abs().max()) > 1e-4 for g in full_grads)
    for micro_stats, micro_grads in micro:
        for g, g_ref in zip(micro_grads, full_grads):
            torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=0)
        assert micro_stats["loss"] == pytest.approx(full_stats["loss"], abs=1e-6)
        assert micro_stats["kl"] == pytest.approx(full_stats["kl"], abs=1e-6)


@pytest.mark.parametrize("ppo_epochs", [1, 2])
@pytest.mark.parametrize("micro_batch_size", [None, 2, 4])
def test_trim_padding_keeps_the_gradient_and_runs_shorter_forwards(
    tiny_llama, micro_batch_size, ppo_epochs, monkeypatch
):
    """``trim_padding``: rows sorted by length into micro-batches, each run without its all-padding
    columns; the gradients, loss and KL are the untrimmed full batch's (up to rounding)."""
    import copy

    import lit_selfimprove.loops.rlvr as rlvr_module

    def rollouts():
        r = _rollouts_of_different_lengths()
        r.prompt_mask[1, :2] = 0  # left padding too
        r.prompt_mask[4, :1] = 0
        r.prompt_ids = r.prompt_ids * r.prompt_mask
        return r

    monkeypatch.setattr(rlvr_module, "generate", lambda *args, **kwargs: rollouts())
    base = copy.deepcopy(tiny_llama).double()
    ref = copy.deepcopy(base).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def reward(completions, answers):
        return torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])

    results = []
    for trim in (False, True):
        policy = copy.deepcopy(base)
        widths = []
        real_forward = policy.forward

        def forward(*args, _real=real_forward, _widths=widths, **kwargs):
            _widths.append(kwargs["input_ids"].shape[1])
            return _real(*args, **kwargs)

        policy.forward = forward
        cfg = rlvr_module.RLVRConfig(
            group_size=3,
            max_new_tokens=6,
            kl_coef=0.1,
            micro_batch_size=None if not trim else micro_batch_size,
            max_grad_norm=None,
            ppo_epochs=ppo_epochs,
            clip_eps_low=0.2,
            trim_padding=trim,
        )
        opt = _GradRecorder(policy.parameters())
        stats, _, _ = rlvr_module.rlvr_step(policy, None, reward, ["a", "b"], ["1", "2"], cfg, opt, ref)
        results.append((stats, opt.grads[0], widths))
    (full_stats, full_grads, full_widths), (stats, grads, widths) = results
    assert set(full_widths) == {10}  # 4 prompt + 6 completion columns
    if micro_batch_size == 2:  # lengths sorted 1,2 | 3,4 | 5,6: shorter forwards for the short rows
        assert min(widths) < 10
    assert any(float(g.abs().max()) > 1e-4 for g in full_grads)
    for g, g_ref in zip(grads, full_grads):
        # (micro-batch weights are float32 even for a float64 model: ~1e-8 apart with or without trimming)
        torch.testing.assert_close(g, g_ref, atol=1e-7, rtol=0)
    for key in ("loss", "kl", "clip_fraction"):
        assert stats[key] == pytest.approx(full_stats[key], abs=1e-7)
