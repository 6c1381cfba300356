"""Advantages other than GRPO's: GiGPO (episode + step-level credit) and RLOO. Plain tensor functions.

GRPO (TRL's own, `--advantage grpo`): A_i = (R_i - mean_g R) / (std_g R + 1e-4), one value per episode i of group g.

GiGPO (Feng et al. 2025, as verl-agent computes it; `--advantage gigpo`): A(i, t) = A^E(i, t) + omega * A^S(i, t).
  A^E, the episode term: each step row (i, t) scores R_i - c * invalid(i, t), normalized over all step rows of the
      group (so an episode weighs as many times as it has steps); or, with `episode_stats="trajectories"`, each
      episode scores R_i - c * (its invalid steps), normalized over the episodes of the group (GRPO's advantage).
  A^S, the step term: G(i, t) = r(i, t) + gamma * G(i, t + 1) is the discounted return from step t; the steps of a
      group whose states (the observation before the action) are identical form an anchor group, and
      A^S = (G - c * invalid - mean) [/ (std + eps)] within it. A state seen once gets A^S = 0.
  "Normalized" is (x - mean) / (std + eps) with the unbiased std, or x - mean when std=False.

RLOO (`--advantage rloo`): A_i = R_i - mean of the other episodes' R_j in the group.
"""

import torch


def discounted_returns(step_rewards, step_mask, gamma):
    """G(i, t) = r(i, t) + gamma * G(i, t + 1) over each episode's steps (step_mask); 0 where there is no step."""
    returns = torch.zeros_like(step_rewards)
    future = torch.zeros_like(step_rewards[:, 0])
    for t in reversed(range(step_rewards.size(1))):
        future = torch.where(step_mask[:, t], step_rewards[:, t] + gamma * future, torch.zeros_like(future))
        returns[:, t] = future
    return returns


def anchor_group_ids(anchors, group_size, width):
    """(N, width) ids: equal for steps of the same group of episodes whose states (strings) are identical; -1 where
    an episode has no step t. anchors[i] lists episode i's states, one per step."""
    ids = torch.full((len(anchors), width), -1, dtype=torch.long)
    names = {}
    for i, states in enumerate(anchors):
        for t, state in enumerate(states):
            ids[i, t] = names.setdefault((i // group_size, state), len(names))
    return ids


def group_normalize(values, ids, std, eps=1e-6, stats_mask=None):
    """(v - mean of v over its id) [/ (unbiased std + eps)], a group with one member gets 0; -1 ids get 0.

    stats_mask: the entries that make up the statistics (default: all with an id); the others are normalized with
    their id's statistics.
    """
    member = ids >= 0
    counted = member if stats_mask is None else member & stats_mask
    num_ids = int(ids.max().clamp(min=0)) + 1
    index = ids.clamp(min=0)[counted]
    count = torch.zeros(num_ids, dtype=values.dtype).index_add_(0, index, torch.ones_like(values[counted]))
    mean = torch.zeros(num_ids, dtype=values.dtype).index_add_(0, index, values[counted]) / count.clamp(min=1)
    centered = values - mean[ids.clamp(min=0)]
    if std:
        squares = torch.zeros(num_ids, dtype=values.dtype).index_add_(0, index, centered[counted] ** 2)
        deviation = torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), torch.ones_like(count))
        centered = centered / (deviation[ids.clamp(min=0)] + eps)
    return torch.where(member, centered, torch.zeros_like(centered))


def gigpo_advantages(episode_return, step_rewards, step_invalid, step_mask, anchor_ids, group_size, gamma=0.95,
                     omega=1.0, std=True, penalty=0.1, episode_stats="steps", eps=1e-6):
    """A = A^E + omega * A^S per step, (N, T) (see the module's docstring), and the step term A^S alone.

    episode_return (N,): R_i. step_rewards, step_invalid, step_mask (N, T): the environment's reward, whether the
    step is penalized, and whether episode i has a step t. anchor_ids (N, T): from anchor_group_ids. An action with
    no step (a reply the token budget cut off before it reached the environment) gets A^E with no penalty and
    A^S = 0; pass step_mask False for it.
    """
    num, width = step_rewards.shape
    group = (torch.arange(num) // group_size).unsqueeze(1).expand(num, width)
    penalty_per_step = penalty * (step_invalid & step_mask).to(step_rewards.dtype)
    if episode_stats == "steps":
        score = episode_return.unsqueeze(1) - penalty_per_step
        episode_term = group_normalize(score, group, std, eps, stats_mask=step_mask)
    elif episode_stats == "trajectories":
        score = episode_return - penalty_per_step.sum(dim=1)
        episode_term = group_normalize(score, group[:, 0], std, eps).unsqueeze(1).expand(num, width)
    else:
        raise ValueError(f"episode_stats must be 'steps' or 'trajectories', got {episode_stats!r}")
    step_value = discounted_returns(step_rewards, step_mask, gamma) - penalty_per_step
    step_term = group_normalize(step_value, anchor_ids.where(step_mask, -1), std, eps)
    return episode_term + omega * step_term, step_term


def rloo_advantages(rewards, group_size):
    """A_i = R_i - (sum of the group's R - R_i) / (G - 1); 0 for a group of one."""
    if group_size < 2:
        return torch.zeros_like(rewards)
    total = rewards.view(-1, group_size).sum(dim=1).repeat_interleave(group_size)
    return rewards - (total - rewards) / (group_size - 1)


def per_token(step_advantages, action_index):
    """(B, L): each token of action t gets step t's advantage; tokens of no action (action_index -1) get 0."""
    gathered = step_advantages.gather(1, action_index.clamp(min=0))
    return torch.where(action_index >= 0, gathered, torch.zeros_like(gathered))
