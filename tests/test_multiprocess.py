"""Several processes (torchrun, gloo on CPU): on the same rollouts, one optimizer step on 2 processes gives the same
update as on 1. The step's GRPO group of 8 episodes straddles the 2 processes, 4 each, with returns that differ
between the halves: lambda_g, GiGPO's anchor groups, RLOO's baseline and the WM quotas and normaliser must come from
the gathered batch, and TRL's loss is normalised so that DDP's averaged gradient is the global one."""

import json
import os
import sys
from pathlib import Path

import launch
import pytest
import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# Every torchrun launch runs under launch.run: one still going after this many seconds (a run takes under a minute)
# fails, naming each process and printing its Python stacks.
HANG_S = 300


def torchrun(*args):
    return launch.run([TORCHRUN, *args], HANG_S, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})


def updated_weights(tiny_path, out, processes, wm, advantage, micro_batch=4):
    result = torchrun("--nproc_per_node", str(processes), "tests/one_step.py", str(tiny_path), str(out), wm, advantage,
                      str(micro_batch))
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "weights.pt")


def distance(a, b):
    return sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5


@pytest.mark.parametrize("wm,advantage", [("paw", "grpo"), ("paw", "gigpo"), ("off", "rloo")])
def test_two_processes_give_the_same_update_as_one_when_a_group_spans_both(tiny_path, tmp_path, wm, advantage):
    # 1 process trains on the two halves of the group as 2 micro-batches (tests/one_step.py): top-alpha selection
    # runs per micro-batch (README), so it selects among the same transitions as each of the 2 processes.
    start = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    one = updated_weights(tiny_path, tmp_path / "one", 1, wm, advantage)
    two = updated_weights(tiny_path, tmp_path / "two", 2, wm, advantage)
    update = distance(one, start)
    assert update > 1e-2  # the step moved the model
    assert distance(one, two) / update < 1e-5  # a per-process lambda_g, quota or advantage: 1.3e-4 or more
    if (wm, advantage) == ("paw", "grpo"):
        # Top-alpha over the whole group at once (1 process, one micro-batch of 8) keeps other transitions than the
        # two halves do on these rollouts: an update that 2 processes must not give.
        whole = updated_weights(tiny_path, tmp_path / "whole", 1, wm, advantage, micro_batch=8)
        assert distance(whole, two) / update > 1e-5  # measured: 1.1e-4


@pytest.mark.parametrize("name,kind", [("accelerate_ddp.yaml", "MULTI_GPU"), ("accelerate_zero2.yaml", "DEEPSPEED")])
def test_the_shipped_accelerate_configs_load_in_accelerate(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / name))
    assert config.distributed_type.name == kind and config.num_processes == 2 and config.num_machines == 1


# train_paw.py whose process 1 stops answering in the rollout of step 2, as a process stuck in a driver or a loop would.
STALLED_IN_STEP_2 = """import os, time, train_paw
play, rollouts = train_paw.play, []
def stalled(*args, **kwargs):
    rollouts.append(1)
    if os.environ["RANK"] == "1" and len(rollouts) == 2:
        time.sleep(600)
    return play(*args, **kwargs)
train_paw.play = stalled
train_paw.main()"""


def test_train_paw_on_two_processes_trains_and_a_process_left_waiting_past_ddp_timeout_names_the_step(tmp_path):
    out = tmp_path / "run"
    result = torchrun("--nproc_per_node", "2", "--no-python", sys.executable, "-c", STALLED_IN_STEP_2,
                      "--model_name_or_path", "tiny", "--games", "generated", "--curriculum", "--env_workers", "1",
                      "--max_steps", "2", "--save_steps", "1", "--ddp_timeout", "20", "--output_dir", str(out))
    assert result.stdout.count("plan (no GPU)") == 1 and "8 episodes (2 games x 4) over 2 processes" in result.stdout
    # step 1 trained on both processes, and the curriculum counted the episodes of both
    saved = json.loads((out / "checkpoint-1" / "curriculum.json").read_text())
    assert len(saved["recent"]) == 8  # both processes' 4 episodes: every process moves on the same window
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    # step 2: process 0 waited --ddp_timeout for process 1, then stopped with a message; torchrun ended process 1
    assert result.returncode == 1
    assert ("error: step 2: process 0 of 2 waited for another process of the run, which did not answer within "
            "--ddp_timeout (20 s)") in result.stderr
    assert f"{out / 'checkpoint-1'} is intact" in result.stderr and "[rank0]: Traceback" not in result.stderr


def test_a_launch_that_hangs_fails_in_time_naming_the_stuck_process_and_where_it_waits():
    hangs = "import os, time\nif os.environ['RANK'] == '1':\n    time.sleep(600)\n"
    with pytest.raises(AssertionError) as hung:
        launch.run([TORCHRUN, "--nproc_per_node", "2", "--no-python", sys.executable, "-c", hangs], 15, cwd=REPO)
    report = str(hung.value)
    assert "hung: still running after 15 s" in report
    assert "--- rank 1 (pid" in report and 'File "<string>", line 3' in report  # its Python stack, at the sleep
