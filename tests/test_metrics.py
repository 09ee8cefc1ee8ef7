"""Tests for lit_selfimprove.metrics.pass_at_k. Expected numbers are worked out by hand in comments."""

import pytest
import torch

from lit_selfimprove.metrics import PassAtK, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 1, 0.25),  # 1 - C(3,1)/C(4,1) = 1 - 3/4
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 0, 1, 0.0),  # no correct sample
        (5, 0, 5, 0.0),
        (3, 2, 2, 1.0),  # n - c = 1 < k = 2: every pair contains a correct one
        (4, 4, 4, 1.0),
        (10, 3, 1, 0.3),  # c/n = 3/10
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 1 - 1/12 = 0.916667
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6 = 0.833333
        (8, 4, 2, 22 / 28),  # 1 - C(4,2)/C(8,2) = 1 - 6/28 = 0.785714
        (1000, 1, 1, 0.001),  # 1 - (1 - 1/1000)
        (200, 0, 100, 0.0),  # large n stays finite (empty product -> 1 - 1)
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # n=1000, c=500, k=100: C(500,100)/C(1000,100) is astronomically small, so pass@100 rounds to 1.0;
    # the product form must stay in [0, 1] without overflow.
    value = pass_at_k(1000, 500, 100)
    assert 0.0 <= value <= 1.0 and value == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(4, 1, 5), (4, 5, 1), (0, 0, 1), (4, -1, 1), (-1, 0, 1), (4, 1, 0)]
)
def test_pass_at_k_invalid(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_metric_two_updates():
    metric = PassAtK(ks=(1, 2, 4))
    metric.update(4, torch.tensor([1, 0]))
    metric.update(torch.tensor([4, 4]), torch.tensor([2, 4]))
    out = metric.compute()
    # problems (n, c): (4,1), (4,0), (4,2), (4,4)
    #   pass@1: 0.25, 0, 0.5, 1            -> 1.75/4 = 0.4375
    #   pass@2: 0.5, 0, 1 - 1/6 = 0.8333, 1 -> 2.3333/4 = 0.583333
    #   pass@4: 1 (n-c=3<4), 0, 1, 1       -> 3/4 = 0.75
    assert set(out) == {"pass@1", "pass@2", "pass@4"}
    assert out["pass@1"].item() == pytest.approx(0.4375, abs=1e-6)
    assert out["pass@2"].item() == pytest.approx(0.583333, abs=1e-6)
    assert out["pass@4"].item() == pytest.approx(0.75, abs=1e-6)
    # equals the mean of the per-problem function
    problems = [(4, 1), (4, 0), (4, 2), (4, 4)]
    for k in (1, 2, 4):
        mean = sum(pass_at_k(n, c, k) for n, c in problems) / len(problems)
        assert out[f"pass@{k}"].item() == pytest.approx(mean, abs=1e-6)


def test_pass_at_k_metric_omits_k_larger_than_n():
    metric = PassAtK()  # ks = (1, 4, 8, 16, 32)
    metric.update(4, torch.tensor([1, 3]))
    out = metric.compute()
    # n = 4: only k = 1 and k = 4 are defined
    #   pass@1: (1/4 + 3/4)/2 = 0.5 ; pass@4: (1 + 1)/2 = 1.0 (n - c = 3 < 4 and 1 < 4)
    assert set(out) == {"pass@1", "pass@4"}
    assert out["pass@1"].item() == pytest.approx(0.5)
    assert out["pass@4"].item() == pytest.approx(1.0)


def test_pass_at_k_metric_mixed_n_skips_k_entirely():
    metric = PassAtK(ks=(1, 2, 8))
    metric.update(torch.tensor([2, 8]), torch.tensor([1, 4]))
    out = metric.compute()
    # k = 8 > n = 2 for the first problem -> pass@8 omitted although the second problem has n = 8
    #   pass@1: (1/2 + 4/8)/2 = 0.5
    #   pass@2: (1.0 [n-c = 1 < 2] + (1 - C(4,2)/C(8,2) = 1 - 6/28 = 0.785714))/2 = 0.892857
    assert set(out) == {"pass@1", "pass@2"}
    assert out["pass@1"].item() == pytest.approx(0.5)
    assert out["pass@2"].item() == pytest.approx(0.892857, abs=1e-6)


def test_pass_at_k_metric_reset_and_validation():
    metric = PassAtK(ks=(1,))
    metric.update(2, torch.tensor([2]))
    assert metric.compute()["pass@1"].item() == pytest.approx(1.0)  # 2/2
    metric.reset()
    metric.update(2, torch.tensor([0, 1]))
    assert metric.compute()["pass@1"].item() == pytest.approx(0.25)  # (0 + 1/2)/2
    with pytest.raises(ValueError):
        metric.update(2, torch.tensor([3]))  # c > n
    with pytest.raises(ValueError):
        metric.update(torch.tensor([2, 2]), torch.tensor([1]))  # shape mismatch
    with pytest.raises(ValueError):
        PassAtK(ks=(0, 1))


def test_pass_at_k_metric_states_sum_like_ddp():
    # DDP reduces every state with "sum": merging two ranks' states must equal one metric over all problems
    rank0, rank1, single = PassAtK(ks=(1, 2)), PassAtK(ks=(1, 2)), PassAtK(ks=(1, 2))
    rank0.update(4, torch.tensor([1, 0]))
    rank1.update(4, torch.tensor([2, 4]))
    single.update(4, torch.tensor([1, 0, 2, 4]))
    rank0.merge_state(rank1)  # applies each state's dist_reduce_fx, as the DDP sync does
    merged, expected = rank0.compute(), single.compute()
    # same numbers as test_pass_at_k_metric_two_updates: pass@1 0.4375, pass@2 0.583333
    assert merged["pass@1"].item() == pytest.approx(0.4375, abs=1e-6)
    assert merged["pass@2"].item() == pytest.approx(0.583333, abs=1e-6)
    for key in expected:
        assert merged[key].item() == pytest.approx(expected[key].item())
