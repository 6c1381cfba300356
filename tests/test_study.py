"""From the warm-started CPU agent: it plays between the random floor and the expert, GRPO lowers the held-out
invalid-action rate, the WM term lowers the held-out next-observation NLL below plain GRPO, and study.py writes its
curves, table and figure. One quick study serves every test."""

import json
import os

import pytest

import eval as evaluation
import study
from env_workers import EnvWorkers
from models import load_tokenizer
from rollout import ChatFormat

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    output = tmp_path_factory.mktemp("study") / "quick"
    return output, study.main(["--quick", "--output", str(output)])


def held_out_success(policy, settings):
    """The success of eval.py's `random` or `expert` policy on the study's held-out games, with its step budget."""
    runs = settings["runs"]
    args = evaluation.parse_args(["--policy", policy, "--env", runs["env"], "--games", runs["games"], "--game_level",
                                  str(runs["game_level"]), "--split", settings["eval_split"], "--num_games",
                                  str(settings["eval_games"]), "--max_env_steps", str(runs["max_env_steps"])])
    workers = EnvWorkers(args.env_workers, args.env_timeout)
    try:
        chat = ChatFormat(load_tokenizer(settings["model"]))
        return evaluation.play_and_summarize(args, chat, None, workers)[0]["success_rate"]["mean"]
    finally:
        workers.close()


def test_the_warm_start_plays_well_above_the_random_floor_and_below_the_expert(quick):
    _, result = quick
    floor, expert = (held_out_success(policy, result["settings"]) for policy in ("random", "expert"))
    assert floor + 0.1 <= result["warm_start"]["success"] <= expert - 0.3


def test_grpo_lowers_the_held_out_invalid_action_rate_without_losing_games(quick):
    """Held out, RL's clearest effect on this agent: it stops writing actions the game rejects. Measured 30.4% ->
    22.5% of actions in 8 steps (success 17.5% -> 22.5%, 40 games); with the advantage's sign flipped (a throwaway
    patch), 30.4% -> 40.4%, and this test fails."""
    _, result = quick
    grpo = result["runs"]["off"]["0"]
    assert grpo["invalid_action_rate"][-1] <= grpo["invalid_action_rate"][0] - 0.04, grpo
    assert grpo["success"][-1] >= grpo["success"][0], grpo


def test_the_wm_term_lowers_the_held_out_next_observation_nll_below_grpo(quick):
    _, result = quick
    paw, grpo = result["runs"]["paw"]["0"], result["runs"]["off"]["0"]
    assert paw["nll"][0] == grpo["nll"][0]  # the same start
    assert paw["nll"][-1] < grpo["nll"][-1] and paw["nll"][-1] < paw["nll"][0]


def test_the_study_writes_its_curves_settings_and_figure(quick):
    output, result = quick
    saved = json.loads(output.with_name(output.name + ".json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert output.with_name(output.name + ".png").read_bytes()[:8] == PNG_MAGIC
    quick_settings = study.QUICK
    assert set(saved["runs"]) == set(quick_settings["modes"])
    for mode, by_seed in saved["runs"].items():
        assert set(by_seed) == {str(seed) for seed in quick_settings["seeds"]}
        for curve in by_seed.values():
            assert curve["step"] == list(range(0, quick_settings["steps"] + 1, quick_settings["eval_every"]))
            assert all(len(curve[key]) == len(curve["step"]) for key in ("success", "nll", "invalid_action_rate"))
        row = saved["summary"][mode]
        assert row["success_end"]["mean"] == pytest.approx(
            sum(c["success"][-1] for c in by_seed.values()) / len(by_seed))
    assert saved["settings"]["eval_games"] == quick_settings["eval_games"]
    assert saved["machine"]["cpu_count"] == os.cpu_count()
    assert set(saved["wall_s"]["runs"]) == {f"{mode}-seed{seed}" for mode in quick_settings["modes"]
                                            for seed in quick_settings["seeds"]}
    assert saved["wall_s"]["total"] >= sum(saved["wall_s"]["runs"].values())
    assert "| off |" in study.table(saved)
