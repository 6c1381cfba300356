"""World-model (WM) losses and their weighting (PAW_SPEC §2b, §2c).

To try another WM loss, edit `cmae_token_loss` (or add a function beside it and name it in TOKEN_LOSSES): it maps
the log-probability of each observation token to that token's loss, and everything else follows.
"""

import torch

from wm_select import per_transition_mean


def cmae_token_loss(logp, rho):
    """Clipped MAE: l(p) = (1 - p) * [p <= rho], with p = exp(logp) the model's probability of the target token.

    Its gradient is -p * grad(log p): tokens the model finds unlikely (noise such as random ids) get tiny
    gradients, and tokens already predicted with p > rho get none.
    """
    p = logp.exp()
    return (1 - p) * (p <= rho).to(p.dtype)


def ce_token_loss(logp, rho=None):
    """Cross-entropy: l(p) = -log p (the ECHO baseline and the CMAE ablation; rho is unused)."""
    return -logp


TOKEN_LOSSES = {"cmae": cmae_token_loss, "ce": ce_token_loss}


def transition_wm_loss(token_loss, obs_index, num_transitions):
    """L_WM(t) = sum over the tokens of o_{t+1} of l / (number of tokens of o_{t+1}).

    Clipped tokens (l = 0) stay in the denominator. obs_index[b, j] = t on the tokens of o_{t+1}, -1 elsewhere.
    Returns the (B, T) losses and the (B, T) number of target tokens (a transition with none has no WM loss).
    """
    return per_transition_mean(token_loss, obs_index, num_transitions)


def adaptive_lambda(group_mean_return, r_max=1.0):
    """lambda_g = clip(1 - R_g / R_max, 0, 1): full WM weight for groups that always fail, none for solved ones."""
    return (1 - group_mean_return / r_max).clamp(0.0, 1.0)


def wm_objective(transition_loss, selected, weight, num_selected):
    """sum over selected transitions t of ( weight_t * L_WM(t) ) / num_selected: the mean over selected transitions.

    num_selected counts the selected transitions of the whole batch (which the micro-batches' selections add up to:
    wm_select.selection_quotas), so that when TRL splits the batch into micro-batches their terms add up to one mean
    in which every selected transition weighs the same.
    """
    terms = torch.where(selected, weight * transition_loss, torch.zeros_like(transition_loss))
    return terms.sum() / num_selected
