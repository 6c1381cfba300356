"""eval.py: the expert and random floors, the model policy's outputs, the WM diagnostic, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import eval as evaluation
from envs import make_env
from rollout import play, text_policy

REPO = Path(__file__).resolve().parent.parent


def run_eval(tmp_path, *args):
    summary = evaluation.main([*args, "--output", str(tmp_path / "result")])
    saved = json.loads((tmp_path / "result.json").read_text())
    trajectories = [json.loads(line) for line in (tmp_path / "result.jsonl").read_text().splitlines()]
    assert saved == json.loads(json.dumps(summary))
    return saved, trajectories


@pytest.mark.parametrize("split,folder", [("eval_out_of_distribution", "valid_unseen"),
                                          ("eval_in_distribution", "valid_seen")])
def test_the_expert_wins_the_games_of_both_eval_splits(tmp_path, split, folder, capsys):
    # The core check that the stored walkthroughs win through our own env and action parser, on a fixed sample of
    # each split (all 274 games passed when we checked them; the sample keeps CI fast).
    games = 48
    summary, trajectories = run_eval(tmp_path, "--split", split, "--policy", "expert", "--num_games", str(games))
    assert (summary["split"], summary["split_folder"], summary["num_games"]) == (split, folder, games)
    assert summary["success_rate"]["mean"] == 1.0 and summary["env_errors"] == 0
    assert sum(t["games"] for t in summary["per_task_type"].values()) == games
    assert set(summary["per_task_type"]) == {"Pick", "Look", "Clean", "Heat", "Cool", "Pick2"}
    assert len(trajectories) == games and all(t["won"] and t["invalid_actions"] == 0 for t in trajectories)
    assert f"{split} ({folder})" in capsys.readouterr().out  # the table's caption names the split


def test_the_random_policy_is_a_stable_low_floor(tmp_path):
    args = ["--games", "generated", "--policy", "random", "--num_games", "6", "--max_env_steps", "15",
            "--num_runs", "2", "--seed", "3"]
    first, trajectories = run_eval(tmp_path / "a", *args)
    second, _ = run_eval(tmp_path / "b", *args)
    assert first == second  # same seeds, same numbers
    assert first["seeds"] == [3, 4] and len(trajectories) == 12
    assert first["success_rate"]["mean"] < 0.5 and first["invalid_action_rate"]["mean"] == 0.0
    actions = [[turn["action"] for turn in t["turns"]] for t in trajectories]
    assert actions[:6] != actions[6:]  # the two runs used different seeds


@pytest.mark.parametrize("env,steps,games", [("alfworld", 50, ["--games", "generated"]), ("webshop", 15, []),
                                             ("search", 50, [])])
def test_each_environment_has_its_literature_step_budget_and_dotted_output_names_stay(tmp_path, env, steps, games):
    output = tmp_path / "qwen2.5-7b"
    summary = evaluation.main(["--env", env, *games, "--policy", "expert", "--num_games", "2", "--env_workers", "0",
                               "--output", str(output)])
    assert summary["max_env_steps"] == steps and summary["success_rate"]["mean"] == 1.0
    assert json.loads((tmp_path / "qwen2.5-7b.json").read_text()) == json.loads(json.dumps(summary))
    assert len((tmp_path / "qwen2.5-7b.jsonl").read_text().splitlines()) == 2


def test_search_episodes_run_to_the_environments_own_turn_limit(tmp_path):
    summary = evaluation.main(["--env", "search", "--env_options", "max_turns=6", "--model_name_or_path", "tiny",
                               "--num_games", "1", "--max_action_tokens", "8", "--env_workers", "0",
                               "--output", str(tmp_path / "result")])
    assert summary["avg_steps"]["mean"] == 6  # the tiny model never answers: the episode ends at max_turns


def test_the_tiny_model_on_real_games_writes_results_that_replay(tmp_path, chat):
    summary, trajectories = run_eval(tmp_path, "--model_name_or_path", "tiny", "--num_games", "3",
                                     "--max_env_steps", "3", "--max_action_tokens", "24", "--temperature", "1",
                                     "--num_runs", "2", "--wm_eval")
    assert {"env", "split", "split_folder", "num_games", "policy", "model", "adapter", "seeds", "success_rate",
            "score", "avg_steps", "invalid_action_rate", "per_task_type", "wm_eval"} <= summary.keys()
    assert summary["model"] == "tiny" and summary["num_games"] == 3 and len(trajectories) == 6
    assert sum(t["games"] for t in summary["per_task_type"].values()) == 3
    for task_type, stats in summary["per_task_type"].items():
        assert stats["games"] == sum(t["task_type"] == task_type for t in trajectories) / 2
    assert summary["wm_eval"]["tokens"] > 0  # its NLL is checked against an independent computation below
    for recorded in trajectories:  # feeding the recorded replies to a fresh game reproduces the trajectory
        replies = [turn["reply"] for turn in recorded["turns"]]
        (episode,) = play([make_env("alfworld", recorded["game"])],
                          text_policy(chat, lambda e: replies[len(e.turns)]), chat, max_steps=len(replies))
        assert episode.first_observation == recorded["first_observation"]
        assert episode.turns == recorded["turns"] and episode.won == recorded["won"]


def test_wm_diagnostic_against_an_independent_computation(tiny_path, chat, small_games):
    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    replies = ["<action>look</action>", "<action>inventory</action>"]
    episodes = play([make_env("alfworld", small_games[0])], text_policy(chat, lambda e: replies[len(e.turns)]),
                    chat, max_steps=2)
    got = evaluation.wm_diagnostic(model, episodes)
    (e,) = episodes
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([e.context_ids])).logits[0]
    nll, hits, count = 0.0, 0, 0
    for j, t in enumerate(e.obs_index):
        if t >= 0:
            position = len(e.prompt_ids) + j
            probs = torch.softmax(logits[position - 1].double(), dim=-1)
            nll -= torch.log(probs[e.context_ids[position]]).item()
            hits += int(probs.argmax().item() == e.context_ids[position])
            count += 1
    assert got["tokens"] == count > 10
    assert got["nll_per_token"] == pytest.approx(nll / count, rel=1e-5)
    assert got["top1_accuracy"] == hits / count


def test_an_adapter_is_loaded_and_changes_the_model(tmp_path, tiny_path):
    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)  # non-zero: changes outputs
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), lora).save_pretrained(adapter)
    args = ["--model_name_or_path", "tiny", "--games", "generated", "--num_games", "1", "--max_env_steps", "2",
            "--max_action_tokens", "8", "--wm_eval"]
    base, _ = run_eval(tmp_path / "base", *args)
    tuned, _ = run_eval(tmp_path / "tuned", *args, "--adapter", str(adapter))
    assert tuned["adapter"] == str(adapter)
    assert tuned["wm_eval"]["nll_per_token"] != base["wm_eval"]["nll_per_token"]


@pytest.mark.parametrize("args,message", [
    (["--model_name_or_path", "tiny", "--adapter", "/no/such/run"], "--adapter /no/such/run: no adapter_config.json"),
    (["--policy", "expert", "--split", "valid_unseen"], "invalid choice: 'valid_unseen'"),
    (["--policy", "expert", "--num_games", "0"], "--num_games must be >= 1"),
    (["--policy", "model"], "--policy model needs --model_name_or_path"),
    (["--policy", "random", "--wm_eval"], "--wm_eval measures a model"),
])
def test_bad_input_exits_2_with_a_clear_message(args, message):
    result = subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True, text=True,
                            env=os.environ, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_game_files_exit_2_with_advice(tmp_path):
    result = subprocess.run([sys.executable, "eval.py", "--policy", "expert"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "ALFWORLD_DATA": str(tmp_path)}, timeout=300)
    assert result.returncode == 2 and "alfworld-download" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("env", ["webshop", "search"])
def test_the_tiny_model_evaluates_on_the_other_environments(tmp_path, env):
    summary, trajectories = run_eval(tmp_path, "--env", env, "--split", "eval_in_distribution",
                                     "--model_name_or_path", "tiny", "--num_games", "3", "--max_env_steps", "2",
                                     "--max_action_tokens", "16", "--wm_eval")
    assert summary["env"] == env and summary["num_games"] == 3 and len(trajectories) == 3
    assert sum(t["games"] for t in summary["per_task_type"].values()) == 3
    assert summary["env_errors"] == 0 and summary["wm_eval"]["tokens"] > 0
