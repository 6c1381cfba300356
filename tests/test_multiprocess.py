"""Several processes (torchrun, gloo on CPU): on the same rollouts, one optimizer step on 2 processes gives the same
update as on 1. The GRPO groups, the WM normaliser and lambda_g, and GiGPO's anchor groups are computed over the
gathered batch, and TRL's loss is normalised so that DDP's averaged gradient is the global one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent


def updated_weights(tiny_path, out, processes, wm, advantage):
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), "--nproc_per_node", str(processes), "tests/one_step.py", str(tiny_path),
                             str(out), wm, advantage], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "weights.pt")


@pytest.mark.parametrize("wm,advantage", [("off", "grpo"), ("paw", "grpo"), ("paw", "gigpo")])
def test_two_processes_give_the_same_update_as_one(tiny_path, tmp_path, wm, advantage):
    start = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    one = updated_weights(tiny_path, tmp_path / "one", 1, wm, advantage)
    two = updated_weights(tiny_path, tmp_path / "two", 2, wm, advantage)
    update = sum(((one[k] - start[k]) ** 2).sum() for k in start) ** 0.5
    difference = sum(((one[k] - two[k]) ** 2).sum() for k in start) ** 0.5
    assert update > 1e-2  # the step moved the model
    assert difference / update < 1e-5


@pytest.mark.parametrize("name,kind", [("accelerate_ddp.yaml", "MULTI_GPU"), ("accelerate_zero2.yaml", "DEEPSPEED")])
def test_the_shipped_accelerate_configs_load_in_accelerate(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / name))
    assert config.distributed_type.name == kind and config.num_processes == 2 and config.num_machines == 1


def test_train_paw_on_two_processes_trains_and_the_curriculum_counts_the_episodes_of_both(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "run"
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "train_paw.py", "--model_name_or_path", "tiny",
                             "--games", "generated", "--curriculum", "--env_workers", "1", "--max_steps", "1",
                             "--save_steps", "1", "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("plan (no GPU)") == 1 and "8 episodes (2 games x 4) over 2 processes" in result.stdout
    saved = json.loads((out / "checkpoint-1" / "curriculum.json").read_text())
    assert len(saved["recent"]) == 8  # both processes' 4 episodes: every process moves on the same window
    assert (out / "adapter_model.safetensors").is_file()
