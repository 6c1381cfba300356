"""Soak: hundreds of episodes of all three environments through the worker pool, random and garbage replies mixed,
with nothing crashing and the memory of the main process and of the workers staying flat."""

import multiprocessing
import random

from alfworld_gen import game_specs, resolve
from env_workers import EnvWorkers
from envs import list_games
from rollout import play, random_policy

ROUNDS, EPISODES = 8, 12  # per environment and round: 3 x 8 x 12 = 288 episodes
GARBAGE = ["", "<action>", "<action></action>", "<action>" + "take " * 2000 + "</action>", "<think>" * 300,
           "<action>go to</action><action>look</action>", "\x00\x01\x02 \ufffd\u202e <action>\u00e9\u4e2d</action>",
           "</action>open<action>", "<action>search[" + "]" * 50 + "</action>", "<action>click[</action>"]


def fuzzed(chat, seed):
    """The random policy, with a third of its replies replaced by malformed, huge or binary text."""
    legal, rng = random_policy(chat, seed), random.Random(seed)

    def policy(episodes):
        return [reply if rng.random() > 1 / 3 else chat.encode(rng.choice(GARBAGE)) + [chat.eot_id]
                for reply in legal(episodes)]

    return policy


def rss_mib(pid="self"):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_hundreds_of_random_and_garbage_episodes_crash_nothing_and_memory_stays_flat(chat):
    games = {"alfworld": [resolve(spec, 0) for spec in game_specs("train", EPISODES * ROUNDS)],
             "webshop": list_games("webshop", "train", EPISODES * ROUNDS, seed=0),
             "search": list_games("search", "train", EPISODES * ROUNDS, seed=0)}
    workers = EnvWorkers(2, timeout=60)
    memory, played = [], []
    for round_ in range(ROUNDS):
        for env, pool in games.items():
            batch = pool[round_ * EPISODES:(round_ + 1) * EPISODES]
            played += play([workers.make(env, game) for game in batch], fuzzed(chat, round_), chat, max_steps=6)
        memory.append([rss_mib()] + [rss_mib(child.pid) for child in multiprocessing.active_children()])
    workers.close()
    assert len(played) == 3 * ROUNDS * EPISODES and all(e.error is None for e in played)
    assert sum(e.invalid_actions for e in played) > len(played) / 2 and any(e.won for e in played)
    warm, last = memory[1], memory[-1]  # after one round every cache and lazily loaded dataset is in place
    print(f"RSS MiB (main, workers) after round 2: {[round(m) for m in warm]}; after round {ROUNDS}: "
          f"{[round(m) for m in last]}")
    assert len(last) == len(warm) == 3 and all(end < start * 1.1 + 20 for start, end in zip(warm, last))
