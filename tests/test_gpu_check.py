"""gpu_check.py at smoke size (no GPU here): the real train_paw.py run on random weights, measured beside the
estimates; the Qwen2.5 configurations it builds; its environment's ALFWorld token lengths."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import calibration
import gpu_check
import memory_estimate as me
from envs import make_env
from rollout import NonFiniteLogits, play, text_policy

REPO = Path(__file__).resolve().parent.parent


def test_the_configurations_are_the_presets_the_estimates_use():
    for name, values in gpu_check.QWEN.items():
        assert me.Shape.from_config(Qwen2Config(**gpu_check.QWEN_COMMON, **values)) == me.PRESETS[name]


def test_the_environment_has_alfworlds_longest_prompt_and_turns(chat):
    options = dict(option.split("=") for option in gpu_check.word_counts(chat))
    envs = [make_env(gpu_check.SHAPED, "shaped-train-0", options) for _ in range(2)]
    episode = play(envs, text_policy(chat, lambda e: "<action>apple</action>"), chat, 3, 4096)[0]
    assert len(episode.prompt_ids) - me.PROMPT_TOKENS in (0, 1)
    reply = len(chat.encode("<action>apple</action>")) + 1  # and its end-of-turn token
    fed = [t for t in range(len(episode.completion_ids)) if episode.action_index[t] < 0]
    assert len(fed) - 2 * me.TURN_TOKENS - (len(chat.user_header) + 117 + 1) in (0, 1, 2)  # the last: o_T+1 only
    assert len(episode.turns) == 3 and len(episode.completion_ids) == 3 * reply + len(fed)


def test_random_checkpoints_are_written_in_shards_and_load_with_their_values(tmp_path, tiny_path):
    from tiny_model import TINY_SHAPE

    config = Qwen2Config(**TINY_SHAPE, vocab_size=1024)
    gpu_check.write_random_model(tmp_path, config, shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    parameters = dict(model.named_parameters())
    assert set(index["weight_map"]) == set(parameters)
    assert (parameters["model.norm.weight"] == 1).all()
    assert (parameters["model.layers.0.self_attn.q_proj.bias"] == 0).all()
    std = parameters["model.layers.0.mlp.up_proj.weight"].std().item()
    assert 0.018 < std < 0.022


def test_at_smoke_size_it_measures_a_real_run_and_writes_both_sides(tmp_path):
    output = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "gpu_check.py", "--steps", "1", "--cache", str(tmp_path / "models"),
                             "--output", str(output)], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(output.read_text())
    assert saved["gpu"] is None and saved["card"] == gpu_check.CPU.name and not saved["skipped"]
    (row,) = saved["shapes"]
    assert row["model"] == gpu_check.SMOKE and len(row["steps"]) == 1
    measured, estimated = row["measured"], row["estimated"]
    for key in ("step_s", "rollout_s", "training_s", "generated_tokens_per_s", "peak_resident_gib"):
        assert measured[key] > 0, key
    for key in ("step", "rollout", "training", "generated_tokens_per_s", "peak_gib"):
        assert estimated[key] > 0, key
    assert measured["step_s"] == row["steps"][0]["step_s"] > measured["rollout_s"]
    # Every reply ran to its cap and no episode ended early: the turns the estimate counts were played.
    assert row["steps"][0]["turns"] == estimated["turns"] == row["settings"]["max_env_steps"] == 3
    assert 0 < estimated["low_end"]["step"] <= estimated["step"]
    # The step joins the calibration table as a row, and the time estimate gives its seconds again from it.
    measurement = calibration.Measurement(**row["measurement"])
    assert measurement.kind == "rl_step" and measurement.seconds == measured["step_s"]
    assert calibration.estimated(measurement) == pytest.approx(estimated["step"], rel=1e-9)
    assert calibration.estimated(measurement, "low") == pytest.approx(estimated["low_end"]["step"], rel=1e-9)
    assert row["nonfinite"] == {"rollout": False, "training": False} and "| none / none |" in result.stdout
    assert "| tiny | 1 |" in result.stdout and "paste the table" in result.stdout


def test_nan_or_inf_in_a_rollout_or_in_training_is_reported_per_shape(monkeypatch):
    def stopped_by_nan_logits(argv):  # as train_paw.main ends such a run: its message, then exit code 1
        try:
            raise NonFiniteLogits(1, 4, 1)
        except NonFiniteLogits:
            raise SystemExit(1)

    monkeypatch.setattr(gpu_check.train_paw, "main", stopped_by_nan_logits)
    assert gpu_check.measure([]) == ([], {}, {"rollout": True, "training": False})
    step = {"step_time": 2.0, "time/rollout_s": 1.0, "time/generated_tokens_per_s": 9.0, "episode/length": 3.0}
    logged = SimpleNamespace(state=SimpleNamespace(log_history=[{**step, "loss": 0.5}, {**step, "loss": math.nan}]))
    monkeypatch.setattr(gpu_check.train_paw, "main", lambda argv: logged)
    assert gpu_check.measure([])[2] == {"rollout": False, "training": True}
    row = {"model": "m", "steps": [], "measured": {}, "estimated": {"peak_gib": 9.0},
           "nonfinite": {"rollout": True, "training": False}}
    table = gpu_check.table({"gpu": "Tesla T4", "card": "T4", "date": "2026-12-07", "shapes": [row], "skipped": []})
    assert "| m | 0 | - | 9.0 | - (-) | - (-) | - (-) | - (-) | yes / none |" in table


def test_bad_flags_exit_2_with_a_message():
    result = subprocess.run([sys.executable, "gpu_check.py", "--gpu", "tpu9"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "--gpu tpu9: unknown card" in result.stderr and "Traceback" not in result.stderr
