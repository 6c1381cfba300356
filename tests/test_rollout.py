"""The episode loop: sequence layout and masks, malformed output, crashing environments, budgets, the expert."""

import os
import random

import pytest
import torch
from scripted import ACTIONS, SCRIPTS, ScriptedEnv, scripted_policy
from transformers import AutoModelForCausalLM, GenerationConfig

from env_workers import EnvWorkers
from envs import NOTHING_HAPPENS, format_admissible, make_env, parse_action
from rollout import ModelPolicy, expert_policy, play, random_policy, text_policy
from train_paw import episode_fields, make_invalid_action_penalty


def test_chat_format_pieces_match_the_qwen_template(chat, tokenizer):
    assert tokenizer.decode(chat.user_header) == "\n<|im_start|>user\n"
    assert tokenizer.decode(chat.assistant_header) == "<|im_end|>\n<|im_start|>assistant\n"
    assert chat.eot == "<|im_end|>"


def test_masks_of_a_known_two_turn_episode(chat):
    """Policy tokens are the replies with their <|im_end|>; WM tokens are exactly the raw observation text."""
    (episode,) = play([ScriptedEnv("A", serial=0)], scripted_policy(chat), chat, max_steps=5)
    assert episode.won and len(episode.turns) == 2 and not episode.truncated
    reply_1, reply_2 = SCRIPTS[0]
    o_2, o_3 = "Turn 1: you open box.", "Turn 2: you take key from box. You found the key!"
    pieces = [  # (text, policy?, world-model target of transition t?)
        (reply_1 + chat.eot, 0, None), ("\n<|im_start|>user\n", None, None), (o_2, None, 0),
        (format_admissible(ACTIONS) + "<|im_end|>\n<|im_start|>assistant\n", None, None),
        (reply_2 + chat.eot, 1, None), ("\n<|im_start|>user\n", None, None), (o_3, None, 1), (chat.eot, None, None),
    ]
    ids, action_index, obs_index = [], [], []
    for text, action_t, obs_t in pieces:
        piece = chat.encode(text)
        ids += piece
        action_index += [-1 if action_t is None else action_t] * len(piece)
        obs_index += [-1 if obs_t is None else obs_t] * len(piece)
    assert episode.completion_ids == ids
    assert episode.action_index == action_index
    assert episode.obs_index == obs_index
    assert chat.tokenizer.decode(episode.prompt_ids).startswith("<|im_start|>system\nYou are in a test room.")
    fields = episode_fields([episode])
    assert fields["env_mask"][0] == [int(t >= 0) for t in action_index]


def test_a_reply_cut_at_the_token_cap_gets_a_non_policy_end_of_turn(chat):
    cut = text_policy(chat, lambda e: "<action>open box</action>")  # text_policy appends <|im_end|>...
    policy = lambda episodes: [ids[:-1] for ids in cut(episodes)]  # ...which a capped reply lacks
    (episode,) = play([ScriptedEnv("A")], policy, chat, max_steps=1)
    reply = chat.encode("<action>open box</action>")
    assert episode.completion_ids[: len(reply) + 1] == reply + [chat.eot_id]
    assert episode.action_index[: len(reply) + 1] == [0] * len(reply) + [-1]
    assert episode.turns[0]["action"] == "open box" and episode.truncated


@pytest.mark.parametrize("reply", [
    "", "I will go to the desk.", "x" * 10_000, "<action>" + "x" * 10_000 + "</action>",
    "".join(chr(random.Random(0).randrange(0x20, 0x2FFFF)) for _ in range(300)),
    "<action>look</action><action>inventory</action>", "<action></action>", "<action>" + "go " * 200 + "</action>",
])
def test_parse_action_rejects_malformed_replies(reply):
    assert parse_action(reply) is None


def test_parse_action_normalises_case_and_whitespace_and_ignores_text_around_the_action():
    assert parse_action("<think>x</think>\n<Action>  Go to   Desk 1\n</ACTION>") == "go to desk 1"
    assert parse_action("<action>look</action>" + "x" * 10_000) == "look"


MALFORMED = ["", "no tags at all", "<action>go to desk 1</action>" * 2, "z" * 10_000,
             "".join(chr(random.Random(1).randrange(0x20, 0x2FFFF)) for _ in range(500))]


def test_malformed_output_is_an_invalid_action_with_the_penalty(chat, small_games):
    envs = [make_env("alfworld", small_games[0]) for _ in MALFORMED]
    policy = lambda episodes: [chat.encode(MALFORMED[envs.index(e.env)]) + [chat.eot_id] for e in episodes]
    episodes = play(envs, policy, chat, max_steps=2)
    penalties = make_invalid_action_penalty(0.1)(None, **{"invalid_actions": [e.invalid_actions for e in episodes]})
    for episode, penalty in zip(episodes, penalties):
        assert episode.error is None and not episode.won and len(episode.turns) == 2
        assert [t["observation"] for t in episode.turns] == [NOTHING_HAPPENS] * 2
        assert episode.invalid_actions == 2 and penalty == pytest.approx(-0.2)
        assert max(episode.obs_index) == 1  # "Nothing happens." is the engine's answer: still a WM target


def test_an_inadmissible_action_reaches_the_engine_and_is_penalised(chat, small_games):
    (episode,) = play([make_env("alfworld", small_games[0])],
                      text_policy(chat, lambda e: "<action>fly to the moon</action>"), chat, max_steps=1)
    assert episode.turns[0]["action"] == "fly to the moon" and not episode.turns[0]["valid"]
    assert episode.turns[0]["observation"] == NOTHING_HAPPENS


def test_a_crashing_environment_ends_only_its_own_episode(chat):
    envs = [ScriptedEnv("A", serial=1), ScriptedEnv("B", serial=1, fail_at=2), ScriptedEnv("C", fail_at="reset")]
    healthy, crashed, unborn = play(envs, scripted_policy(chat), chat, max_steps=5)
    assert healthy.won and healthy.error is None and len(healthy.turns) == 3
    assert not crashed.won and crashed.error.startswith("step 1: RuntimeError") and len(crashed.turns) == 2
    assert not unborn.won and unborn.error.startswith("reset: RuntimeError") and unborn.turns == []
    assert unborn.completion_ids and max(unborn.action_index) == -1  # a placeholder TRL accepts, never trained on
    assert episode_fields([healthy, crashed, unborn])["env_error"] == [False, True, True]


@pytest.mark.parametrize("max_tokens", [1, 7, 40, 64, 100, 333])
def test_the_token_budget_is_never_exceeded(chat, max_tokens):
    envs = [ScriptedEnv("room", serial=k) for k in range(4)]
    for episode in play(envs, scripted_policy(chat), chat, max_steps=6, max_tokens=max_tokens):
        assert len(episode.completion_ids) <= max_tokens
        assert len(episode.completion_ids) == len(episode.action_index) == len(episode.obs_index)
        assert episode.won or episode.truncated or episode.error


def test_the_step_budget_ends_episodes_as_truncated(chat):
    (episode,) = play([ScriptedEnv("room", serial=2)], scripted_policy(chat), chat, max_steps=3)
    assert len(episode.turns) == 3 and episode.truncated and not episode.won
    assert episode.completion_ids[-1] == chat.eot_id and max(episode.obs_index) == 2


def test_random_policy_is_seeded_and_only_takes_admissible_actions(chat, small_games):
    runs = [play([make_env("alfworld", small_games[3])], random_policy(chat, seed=7), chat, max_steps=4)[0]
            for _ in range(2)]
    assert [t["action"] for t in runs[0].turns] == [t["action"] for t in runs[1].turns]
    assert all(t["valid"] for t in runs[0].turns)


def test_environments_in_worker_processes_give_the_same_episodes(chat, small_games):
    games = small_games[:3] * 2
    workers = EnvWorkers(2)
    local = play([make_env("alfworld", g) for g in games], random_policy(chat, seed=3), chat, max_steps=5)
    remote = play([workers.make("alfworld", g) for g in games], random_policy(chat, seed=3), chat, max_steps=5)
    workers.close()
    for a, b in zip(local, remote, strict=True):
        assert a.prompt_ids == b.prompt_ids and a.completion_ids == b.completion_ids and a.turns == b.turns
        assert a.obs_index == b.obs_index and a.won == b.won and a.error is None and b.error is None
    assert len({tuple(e.completion_ids) for e in local}) > 1  # the episodes differ, so the comparison means something


def test_closed_workers_exit_at_once_even_when_later_workers_were_forked_beside_them(small_games):
    import multiprocessing
    import time

    first, second = EnvWorkers(2), EnvWorkers(2)  # the second pair's fork copies the first pair's pipes
    first.make("alfworld", small_games[0])
    start = time.time()
    first.close()
    second.close()
    assert time.time() - start < 5  # none had to be waited out and terminated
    assert not multiprocessing.active_children()


def test_game_after_game_one_process_keeps_one_copy_of_the_planner_library_on_disk(chat, small_games):
    def mapped_copies():  # fast-downward's library, copied to a temporary file per game, then deleted but mapped
        maps = [os.readlink(f"/proc/self/map_files/{name}") for name in os.listdir("/proc/self/map_files")]
        return len({path for path in maps if "libdownward.so" in path and "(deleted)" in path})

    episodes = [play([make_env("alfworld", game)], expert_policy(chat), chat, max_steps=30)[0]
                for game in small_games[:4] * 3]
    assert all(e.won for e in episodes)  # a reused copy plays its next game right
    before = mapped_copies()
    for game in small_games[:4] * 3:
        play([make_env("alfworld", game)], expert_policy(chat), chat, max_steps=30)
    assert mapped_copies() == before  # without reuse: one more copy per game


def test_templates_parsed_once_play_every_game_exactly_as_parsing_them_at_every_step(chat, small_games, unseen_games,
                                                                                    monkeypatch):
    """envs.py parses TextWorld's text templates once per process (half of a step's time): the same random episodes,
    observation for observation and admissible list for list, as TextWorld's own parse at every step."""
    import envs
    from textworld.envs.pddl import textgen

    games = small_games + random.Random(0).sample(unseen_games, 3)

    def played():
        episodes = play([make_env("alfworld", game) for game in games], random_policy(chat, seed=0), chat, max_steps=8)
        return [[(t["observation"], t["valid"]) for t in e.turns] + [e.last.admissible, e.won] for e in episodes]

    cached = played()
    assert textgen._parse_and_convert.parses_once
    monkeypatch.setattr(textgen, "_parse_and_convert", textgen._parse_and_convert.__wrapped__)
    monkeypatch.setattr(envs, "_parse_templates_once", lambda: None)
    assert played() == cached


def test_a_failing_remote_environment_ends_only_its_episode(chat, small_games):
    workers = EnvWorkers(2)
    envs = [workers.make("alfworld", small_games[0]), workers.make("alfworld", "/no/such/game.tw-pddl")]
    good, bad = play(envs, random_policy(chat, seed=0), chat, max_steps=2)
    workers.close()
    assert good.error is None and len(good.turns) == 2
    assert bad.error.startswith("reset:") and "Unable to find game" in bad.error


def test_an_environment_that_never_answers_ends_its_episode_after_the_timeout_and_its_worker_is_replaced(
        chat, monkeypatch):
    import multiprocessing
    import time

    import envs

    monkeypatch.setitem(envs.ENVIRONMENTS, "hanging", "scripted:HangingEnv")  # before the fork: workers see it
    workers = EnvWorkers(2, timeout=1.5)
    winning = text_policy(chat, lambda e: SCRIPTS[0][min(len(e.turns), 1)])  # wins at the 2nd step
    # Environments go to the workers in turn: 0 and 2 share one worker, 1 and 3 the other; 0 hangs at its 1st step.
    games = [workers.make("hanging", f"room{k}", {"hang_at": 1 if k == 0 else None}) for k in range(4)]
    start = time.time()
    hung, neighbour_1, neighbour_0, other = play(games, winning, chat, max_steps=3)
    assert time.time() - start < 1.5 + 3  # the hang costs the timeout, once
    assert hung.error == "step 0: TimeoutError: the environment did not answer in 1.5 s; its worker was replaced"
    assert "worker was replaced" in neighbour_0.error  # its state died with the worker
    assert neighbour_1.error is None and neighbour_1.won and other.error is None and other.won
    (fresh,) = play([workers.make("hanging", "room4")], winning, chat, max_steps=3)
    assert fresh.error is None and fresh.won  # the replacement worker serves new episodes
    workers.close()
    assert not multiprocessing.active_children()


def test_a_worker_that_dies_ends_its_episode_and_is_replaced(chat, monkeypatch):
    import envs

    monkeypatch.setitem(envs.ENVIRONMENTS, "crashing", "scripted:CrashingEnv")  # before the fork: workers see it
    monkeypatch.setitem(envs.ENVIRONMENTS, "scripted", "scripted:ScriptedEnv")
    workers = EnvWorkers(1, timeout=60)
    winning = text_policy(chat, lambda e: SCRIPTS[0][min(len(e.turns), 1)])
    (crashed,) = play([workers.make("crashing", "room0")], winning, chat, max_steps=3)
    assert crashed.error == "step 0: RuntimeError: the environment worker process died; it was replaced"
    (fresh,) = play([workers.make("scripted", "room1")], winning, chat, max_steps=3)
    assert fresh.error is None and fresh.won
    workers.close()


def test_long_observations_are_cut_and_the_cut_text_is_the_wm_target(chat):
    (episode,) = play([ScriptedEnv("a very long room name " * 20, serial=1)], scripted_policy(chat), chat,
                      max_steps=2, max_observation_tokens=5)
    targets = [sum(1 for i in episode.obs_index if i == t) for t in range(2)]
    assert targets == [5, 5]
    assert len(chat.encode(episode.turns[0]["observation"])) > 5  # the full text is still recorded


@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


def model_play(chat, model, reuse_cache, greedy, seed=0):
    """Six episodes of the tiny model; two of them crash at turn 2, so the batch shrinks mid-way."""
    torch.manual_seed(seed)
    config = GenerationConfig(do_sample=not greedy, max_new_tokens=12, eos_token_id=chat.eot_id,
                              pad_token_id=chat.tokenizer.pad_token_id)
    policy = ModelPolicy(model, chat, config, reuse_cache)
    envs = [ScriptedEnv(f"room {k}", serial=k, fail_at=2 if k in (1, 4) else None) for k in range(6)]
    return policy, play(envs, policy, chat, max_steps=4)


def assert_logprobs_match_a_fresh_forward(model, episodes):
    """Each recorded sampling log-prob equals the model's log-prob of that token in one fresh forward pass over the
    whole episode (0 on environment tokens)."""
    for e in episodes:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([e.context_ids])).logits[0], dim=-1)
        start = len(e.prompt_ids)
        for j, (t, recorded) in enumerate(zip(e.action_index, e.logprobs, strict=True)):
            expected = logp[start + j - 1, e.completion_ids[j]].item() if t >= 0 else 0.0
            assert recorded == pytest.approx(expected, abs=1e-4)


def test_logprobs_recorded_while_reusing_the_cache_match_a_fresh_forward(chat, tiny_model):
    policy, episodes = model_play(chat, tiny_model, reuse_cache=True, greedy=False)
    final = sum(len(e.context_ids) for e in episodes)
    assert policy.prefilled < 1.2 * final  # the history was not read again each turn
    assert sorted(len(e.turns) for e in episodes) == [2, 2, 4, 4, 4, 4]
    assert_logprobs_match_a_fresh_forward(tiny_model, episodes)


def test_greedy_replies_are_identical_with_and_without_cache_reuse(chat, tiny_model):
    reused_policy, reused = model_play(chat, tiny_model, reuse_cache=True, greedy=True)
    fresh_policy, fresh = model_play(chat, tiny_model, reuse_cache=False, greedy=True)
    assert [e.completion_ids for e in reused] == [e.completion_ids for e in fresh]
    assert fresh_policy.prefilled > 2 * reused_policy.prefilled
