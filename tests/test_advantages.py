"""advantages.py: GiGPO and RLOO against the design note's worked example and an independent loop implementation."""

import random
import statistics

import pytest
import torch

from advantages import anchor_group_ids, gigpo_advantages, per_token, rloo_advantages


def batch(episodes, group_size):
    """Tensors (float64, to compare with float loops) from episodes given as lists of (state, reward, invalid) steps:
    what the trainer builds."""
    width = max(len(e) for e in episodes)
    step_mask = torch.tensor([[t < len(e) for t in range(width)] for e in episodes])
    rewards = torch.tensor([[e[t][1] if t < len(e) else 0.0 for t in range(width)] for e in episodes],
                           dtype=torch.float64)
    invalid = torch.tensor([[t < len(e) and e[t][2] for t in range(width)] for e in episodes])
    anchors = anchor_group_ids([[state for state, _, _ in e] for e in episodes], group_size, width)
    return rewards.sum(dim=1), rewards, invalid, step_mask, anchors


# The note's example (gigpo-in-trl-1.16.md §1, computed there by verl-agent's own code), gamma 0.95: A wins at its
# second step; B loops at X and fails; C goes to Z and fails.
EXAMPLE = [[("o1", 0.0, False), ("X", 1.0, False)],
           [("o1", 0.0, False), ("X", 0.0, False), ("X", 0.0, False)],
           [("o1", 0.0, False), ("Z", 0.0, False)]]
ROWS = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]


@pytest.mark.parametrize("std,episode_stats,expected", [
    (False, "steps", [1.3476, 1.3810, -.6024, -.6190, -.6190, -.6024, -.2857]),
    (True, "steps", [2.6185, 2.6185, -1.1629, -1.1629, -1.1629, -1.1629, -.5855]),
    # one entry per trajectory: A^E is +.6667 for A and -.3333 for the others (the note), A^S as above
    (False, "trajectories", [.6667 + .6333, .6667 + .6667, -.3333 - .3167, -.3333 - .3333, -.3333 - .3333,
                             -.3333 - .3167, -.3333]),
])
def test_the_worked_example_of_the_note(std, episode_stats, expected):
    advantages, step_term = gigpo_advantages(*batch(EXAMPLE, 3), group_size=3, gamma=0.95, omega=1.0, std=std,
                                             penalty=0.1, episode_stats=episode_stats)
    assert [round(advantages[i, t].item(), 4) for i, t in ROWS] == pytest.approx(expected, abs=1e-4)
    if not std:
        assert [round(step_term[i, t].item(), 4) for i, t in ROWS] == [.6333, .6667, -.3167, -.3333, -.3333,
                                                                       -.3167, 0.0]


def reference_gigpo(episodes, group_size, gamma, omega, std, penalty, episode_stats, eps=1e-6):
    """verl-agent's layout written with loops: one row per step, groups as dicts, statistics from `statistics`."""
    rows = []
    for i, episode in enumerate(episodes):
        ret, future = [], 0.0
        for _, reward, _ in reversed(episode):
            future = reward + gamma * future
            ret.insert(0, future)
        for t, (state, _, invalid) in enumerate(episode):
            rows.append(dict(uid=i // group_size, traj=i, anchor=state, step_return=ret[t] - penalty * invalid,
                             score=sum(r for _, r, _ in episode) - penalty * invalid,
                             traj_score=sum(r - penalty * bad for _, r, bad in episode)))

    def normalize(value, members):
        mean = statistics.fmean(members)
        if not std:
            return value - mean
        return (value - mean) / ((statistics.stdev(members) if len(members) > 1 else 1.0) + eps)

    out = {}
    for row in rows:
        group = [r for r in rows if r["uid"] == row["uid"]]
        if episode_stats == "steps":
            episode_term = normalize(row["score"], [r["score"] for r in group])
        else:
            per_traj = {r["traj"]: r["traj_score"] for r in group}
            episode_term = normalize(row["traj_score"], list(per_traj.values()))
        anchor = [r["step_return"] for r in group if r["anchor"] == row["anchor"]]
        out.setdefault(row["traj"], []).append(episode_term + omega * normalize(row["step_return"], anchor))
    return out


@pytest.mark.parametrize("std", [True, False])
@pytest.mark.parametrize("episode_stats", ["steps", "trajectories"])
def test_gigpo_equals_a_loop_implementation_on_random_groups(std, episode_stats):
    rng = random.Random(0)
    for trial in range(20):
        group_size = rng.choice([2, 3, 4])
        episodes = []
        for _ in range(group_size * rng.choice([1, 2, 3])):
            length = rng.randint(1, 6)  # short ones stand for truncated or failed episodes
            won = rng.random() < 0.4
            episodes.append([(rng.choice("abc"), float(won and t == length - 1), rng.random() < 0.3)
                             for t in range(length)])  # states repeat within and across episodes
        gamma, omega = rng.choice([0.95, 1.0, 0.5]), rng.choice([1.0, 0.5, 0.0])
        got, _ = gigpo_advantages(*batch(episodes, group_size), group_size, gamma, omega, std, 0.1, episode_stats)
        expected = reference_gigpo(episodes, group_size, gamma, omega, std, 0.1, episode_stats)
        for i, episode in enumerate(episodes):
            assert got[i, :len(episode)].tolist() == pytest.approx(expected[i], abs=1e-5), trial


def test_an_action_with_no_step_gets_the_episode_term_without_penalty_and_no_step_term():
    # Episode 1 has two actions but one step: its second reply was cut by the token budget before it was acted on.
    returns, rewards, invalid, step_mask, anchors = batch([[("a", 1.0, False), ("b", 0.0, False)],
                                                           [("a", 0.0, True), ("a", 0.0, False)]], 2)
    step_mask[1, 1], invalid[1, 1] = False, True
    advantages, step_term = gigpo_advantages(returns, rewards, invalid, step_mask, anchors, 2, std=False, penalty=0.1)
    mean = (1 + 1 + (0 - 0.1)) / 3  # the three steps make the statistics
    assert advantages[1, 1].item() == pytest.approx(0 - mean)
    assert step_term[1, 1].item() == 0


def test_with_omega_0_and_one_entry_per_episode_gigpo_is_trls_grpo_advantage():
    rng = random.Random(1)
    episodes = [[(rng.choice("ab"), float(t == 2 and rng.random() < 0.5), rng.random() < 0.3) for t in range(3)]
                for _ in range(8)]
    got, _ = gigpo_advantages(*batch(episodes, 4), 4, omega=0.0, std=True, penalty=0.1,
                              episode_stats="trajectories", eps=1e-4)
    rewards = torch.tensor([sum(r - 0.1 * bad for _, r, bad in e) for e in episodes], dtype=torch.float64).view(2, 4)
    trl = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()  # TRL's
    assert torch.allclose(got, trl.unsqueeze(1).expand(8, 3), atol=1e-6)


def test_states_no_other_episode_reached_get_no_step_advantage():
    episodes = [[(f"{i}-{t}", float(t == 1 and i % 2), False) for t in range(2)] for i in range(4)]
    advantages, step_term = gigpo_advantages(*batch(episodes, 4), 4)
    assert torch.all(step_term == 0)
    assert advantages.abs().sum() > 0  # the episode term remains


def test_rloo_is_the_leave_one_out_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.5, -0.2, 0.3, 0.3, 0.9, 0.0])
    got = rloo_advantages(rewards, 4)
    for i in range(8):
        others = [rewards[j].item() for j in range(i // 4 * 4, i // 4 * 4 + 4) if j != i]
        assert got[i].item() == pytest.approx(rewards[i].item() - sum(others) / 3)
    assert torch.equal(rloo_advantages(rewards, 1), torch.zeros(8))


def test_per_token_gives_each_action_its_steps_advantage_and_other_tokens_none():
    step = torch.tensor([[1.0, 2.0, 3.0]])
    action_index = torch.tensor([[-1, 0, 0, -1, 1, -1, 2, 2, -1]])
    assert per_token(step, action_index).tolist() == [[0, 1, 1, 0, 2, 0, 3, 3, 0]]
