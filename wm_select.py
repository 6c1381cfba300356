"""Action-entropy-based selection of world-model transitions (PAW_SPEC §2a).

(Named wm_select.py, not select.py: a top-level select.py would shadow Python's standard `select` module.)

A transition t of an episode is (a_t, o_{t+1}). Tensors are (B, L) over completion tokens, with
`action_index[b, j] = t` on the tokens the policy generated at turn t and -1 elsewhere.
"""

import math

import torch


def per_transition_mean(values, index, num_transitions):
    """(B, T) mean of `values` over the tokens with index == t, and (B, T) token counts (mean 0 where count 0)."""
    rows = torch.arange(values.size(0), device=values.device).unsqueeze(1)
    slot = (rows * num_transitions + index.clamp(min=0)).flatten()
    member = (index >= 0).to(values.dtype).flatten()
    sums = values.new_zeros(values.size(0) * num_transitions).index_add(0, slot, values.flatten() * member)
    counts = values.new_zeros(values.size(0) * num_transitions).index_add(0, slot, member)
    return (sums / counts.clamp(min=1)).view(-1, num_transitions), counts.view(-1, num_transitions)


@torch.no_grad()
def action_entropy(token_entropy, action_index, num_transitions):
    """H_t = mean over the tokens k of a_t of H(pi(. | h_t, a_{t,<k})).

    token_entropy: (B, L) full-vocabulary entropy of the policy's next-token distribution at each position,
    from the training forward pass at temperature 1. Returns (B, T); 0 where a transition has no action token.
    """
    return per_transition_mean(token_entropy.float(), action_index, num_transitions)[0]


def num_selected(num_eligible, alpha):
    """How many of num_eligible transitions top-alpha selection keeps: ceil(alpha * n)."""
    return math.ceil(alpha * num_eligible)


def selection_quotas(num_eligible, alpha):
    """Per episode, in batch order: how many transitions top-alpha selection keeps on its account.

    Episode r's quota is ceil(alpha * S_r) - ceil(alpha * S_{r-1}), S_r the eligible transitions of episodes 0..r:
    alpha * n_r rounded down or up, the roundings carried over so that the quotas of all episodes add up to exactly
    ceil(alpha * all eligible). However the batch is split into micro-batches afterwards, the micro-batches then
    select that many transitions together, the number the WM mean divides by.
    """
    quotas, total = [], 0
    for n in num_eligible:
        quotas.append(num_selected(total + n, alpha) - num_selected(total, alpha))
        total += n
    return quotas


def select_top(scores, eligible, k):
    """Boolean mask of the k highest-scoring eligible entries of `scores` (any shape), k <= eligible entries.

    Ties are broken by position (the earlier entry wins), so exactly k entries are selected.
    """
    flat_scores, flat_eligible = scores.flatten(), eligible.flatten()
    ranked = torch.where(flat_eligible, flat_scores, -math.inf)
    order = torch.sort(ranked, descending=True, stable=True).indices[:k]
    selected = torch.zeros_like(flat_eligible)
    selected[order] = True
    return selected.view_as(eligible)
