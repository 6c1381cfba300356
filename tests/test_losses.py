"""Every PaW formula against a value computed independently, by hand or with plain Python loops."""

import math
import random

import pytest
import torch

from losses import adaptive_lambda, ce_token_loss, cmae_token_loss, transition_wm_loss, wm_objective
from wm_select import action_entropy, select_top, selection_quotas


def test_cmae_token_loss_values_and_clipping():
    p = torch.tensor([0.05, 0.5, 0.9, 0.91, 1.0])
    loss = cmae_token_loss(p.log(), rho=0.9)
    assert torch.allclose(loss, torch.tensor([0.95, 0.5, 0.1, 0.0, 0.0]), atol=1e-6)


def test_cmae_gradient_is_minus_p_times_grad_log_p():
    logits = torch.randn(7, requires_grad=True)
    logp = torch.log_softmax(logits, dim=0)
    cmae_token_loss(logp[2], rho=1.0).backward()
    p = torch.softmax(logits.detach(), dim=0)
    expected = -p[2] * (torch.eye(7)[2] - p)  # d(1 - p_2)/dz = -p_2 * d(log p_2)/dz
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_clipped_token_gets_no_gradient():
    logits = torch.tensor([5.0, 0.0, 0.0], requires_grad=True)  # p_0 ~ 0.987 > rho
    cmae_token_loss(torch.log_softmax(logits, 0)[0], rho=0.9).backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_ce_token_loss():
    p = torch.tensor([0.25, 0.5])
    assert torch.allclose(ce_token_loss(p.log()), torch.tensor([math.log(4), math.log(2)]))


def test_transition_loss_keeps_clipped_tokens_in_the_denominator():
    # Row 0: o_1 has tokens with p = 0.5, 0.95 (clipped), 0.2; o_2 has one token p = 0.4. Row 1: o_1 only.
    p = torch.tensor([[0.9, 0.5, 0.95, 0.2, 0.9, 0.4], [0.3, 0.3, 0.9, 0.9, 0.9, 0.9]])
    obs_index = torch.tensor([[-1, 0, 0, 0, -1, 1], [0, 0, -1, -1, -1, -1]])
    loss, count = transition_wm_loss(cmae_token_loss(p.log(), 0.9), obs_index, num_transitions=2)
    expected = torch.tensor([[(0.5 + 0.0 + 0.8) / 3, 0.6], [0.7, 0.0]])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert count.tolist() == [[3, 1], [2, 0]]


def test_adaptive_lambda_clips_and_handles_mixed_groups():
    # Group mean returns: all fail, 1 of 4, half, all succeed, and out-of-range values that must be clipped.
    returns = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5, -0.5])
    assert torch.allclose(adaptive_lambda(returns), torch.tensor([1.0, 0.75, 0.5, 0.0, 0.0, 1.0]))
    assert torch.allclose(adaptive_lambda(torch.tensor([5.0]), r_max=10.0), torch.tensor([0.5]))


def test_action_entropy_is_the_mean_over_each_actions_tokens():
    entropy = torch.rand(3, 9)
    action_index = torch.tensor([[0, 0, -1, -1, 1, 1, 1, -1, -1], [-1, 0, 0, 0, 0, -1, -1, -1, -1],
                                 [0, -1, -1, 1, -1, -1, 2, 2, -1]])
    got = action_entropy(entropy, action_index, num_transitions=3)
    for b in range(3):
        for t in range(3):
            tokens = [entropy[b, j].item() for j in range(9) if action_index[b, j] == t]
            assert got[b, t].item() == pytest.approx(sum(tokens) / len(tokens) if tokens else 0.0, abs=1e-6)


def test_select_top_keeps_the_k_highest_scoring_eligible_entries():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.3, 0.8]])
    eligible = torch.tensor([[True, True, False], [True, True, True]])  # 0.5 is not eligible
    assert select_top(scores, eligible, 3).tolist() == [[False, True, False], [True, False, True]]  # 0.9, 0.8, 0.7
    assert select_top(scores, eligible, 5).tolist() == eligible.tolist()


def test_select_top_breaks_ties_by_position():
    scores = torch.tensor([0.5, 0.2, 0.5, 0.5, 0.1])
    chosen = select_top(scores, torch.ones(5, dtype=torch.bool), 2)  # two among three ties
    assert chosen.tolist() == [True, False, True, False, False]


def test_select_top_against_a_sort_of_random_batches():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 30)
        values = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
        eligible = [rng.random() < 0.7 for _ in range(n)]
        candidates = sorted((-v, i) for i, (v, ok) in enumerate(zip(values, eligible)) if ok)
        k = rng.randint(0, len(candidates))
        got = select_top(torch.tensor(values), torch.tensor(eligible), k).tolist()
        keep = {i for _, i in candidates[:k]}
        assert got == [i in keep for i in range(n)]


def test_selection_quotas_round_each_episodes_share_and_add_up_to_ceil_alpha_n():
    # The example: micro-batches of 3, 3, 2 and 2 eligible transitions at alpha 0.5 each rounding up would
    # select 2 + 2 + 1 + 1 = 6, where ceil(0.5 * 10) = 5.
    assert selection_quotas([3, 3, 2, 2], 0.5) == [2, 1, 1, 1]
    rng = random.Random(0)
    for _ in range(200):
        counts = [rng.randint(0, 9) for _ in range(rng.randint(1, 12))]
        alpha = rng.choice([0.1, 0.25, 0.3, 0.5, 0.7, 1.0])
        quotas = selection_quotas(counts, alpha)
        assert sum(quotas) == math.ceil(alpha * sum(counts))
        assert all(math.floor(alpha * n) <= q <= math.ceil(alpha * n) for q, n in zip(quotas, counts))


def test_wm_objective_is_the_weighted_mean_over_selected_transitions():
    loss = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    selected = torch.tensor([[True, False], [True, True]])
    weight = torch.tensor([[0.5], [1.0]])
    assert wm_objective(loss, selected, weight, 3).item() == pytest.approx((0.5 * 1 + 3 + 4) / 3)
    assert wm_objective(loss, torch.zeros_like(selected), weight, 1).item() == 0.0


def test_wm_objective_over_micro_batches_adds_up_to_the_batch_mean():
    loss, weight = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]]), torch.tensor([[0.5], [1.0], [0.25]])
    selected = torch.tensor([[True, False], [True, True], [True, False]])
    whole = wm_objective(loss, selected, weight, 4)
    parts = [wm_objective(loss[rows], selected[rows], weight[rows], 4) for rows in ([0], [1, 2])]
    assert sum(parts).item() == pytest.approx(whole.item())
    assert whole.item() == pytest.approx((0.5 * 1 + 3 + 4 + 0.25 * 5) / 4)
