"""The run fitted to the machine (plan.py): GPU plans that stay under the card by memory_estimate.py, the user's flags
winning over the plan, a dry run, the CPU agent with no GPU, and a clear message when the GPU runs out of memory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import eval as evaluation
import train_paw
from memory_estimate import GIB, PROMPT_TOKENS, estimate
from plan import HEADROOM, after_out_of_memory, as_flags, model_shape, run_peak

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
CARDS = (15, 24, 40, 80)  # GiB: a T4 (Colab, Kaggle), a 24 GB card, A100 40 GB and 80 GB


def peak_gib(args, paw, model_args):
    """memory_estimate's peak of a parsed run, computed here from its flags (not through plan.py)."""
    b = args.per_device_train_batch_size
    return estimate(model_args.model_name_or_path, quantization="nf4" if model_args.load_in_4bit else "bf16",
                    lora_r=model_args.lora_r if model_args.use_peft else None,
                    rollout_episodes=b * args.steps_per_generation, micro_batch=b,
                    episode_tokens=PROMPT_TOKENS + args.max_completion_length + paw.max_action_tokens,
                    train_tokens=PROMPT_TOKENS + args.max_completion_length)["peak"] / GIB


def plan_for(*flags):
    paw, args, model_args = train_paw.parse_args(list(flags))
    return paw, args, model_args


def test_the_plans_for_15_24_40_and_80_gib_cards_keep_the_design_model_and_stay_under_the_card(capsys):
    layouts = []
    for card in CARDS:
        paw, args, model_args = plan_for("--gpu_memory_gib", str(card))
        assert model_args.model_name_or_path == DEFAULT_MODEL and model_args.load_in_4bit and model_args.use_peft
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 16  # 2 games x 8 per step
        assert args.gradient_checkpointing  # the estimate assumes it
        assert peak_gib(args, paw, model_args) <= HEADROOM * card
        layouts.append((args.max_completion_length, args.per_device_train_batch_size))
        printed = capsys.readouterr().out
        assert f"plan for a GPU of {card:.1f} GiB" in printed and "estimated peak" in printed
    assert layouts == sorted(layouts) and layouts[0] < layouts[-1]  # a bigger card never gets a smaller plan
    # Without the plan, the design card's defaults would not fit a T4: the plan is what makes the first run work.
    paw, args, model_args = plan_for("--gpu_memory_gib", "15", "--per_device_train_batch_size", "4",
                                     "--gradient_accumulation_steps", "4", "--max_completion_length", "6144")
    assert peak_gib(args, paw, model_args) > 15


def test_flags_you_pass_win_over_the_plan_which_fits_the_rest_around_them(tmp_path, capsys):
    paw, args, model_args = plan_for("--gpu_memory_gib", "15", "--per_device_train_batch_size", "4")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4)  # the user's layout
    assert args.max_completion_length < 6144 and peak_gib(args, paw, model_args) <= HEADROOM * 15
    config = tmp_path / "run.yaml"
    config.write_text("max_completion_length: 3072\n")
    paw, args, model_args = plan_for("--gpu_memory_gib", "15", "--config", str(config))
    assert args.max_completion_length == 3072 and peak_gib(args, paw, model_args) <= HEADROOM * 15
    assert "warning" not in capsys.readouterr().err


def test_flags_that_do_not_fit_are_reported_with_the_estimate_and_flags_that_do(capsys):
    own = ["--gpu_memory_gib", "15", "--per_device_train_batch_size", "4", "--max_completion_length", "8192"]
    paw, args, model_args = plan_for(*own)
    assert (args.per_device_train_batch_size, args.max_completion_length) == (4, 8192)  # kept: the user decides
    err = capsys.readouterr().err
    assert f"warning: the estimated peak, {peak_gib(args, paw, model_args):.1f} GiB" in err
    suggested = err.split("flags that fit: ")[1].split()
    paw, args, model_args = plan_for("--gpu_memory_gib", "15", *suggested)
    assert peak_gib(args, paw, model_args) <= HEADROOM * 15
    plan_for("--gpu_memory_gib", "8")  # a 7B model fits no 8 GiB card
    assert "nothing fits" in capsys.readouterr().err


def test_a_dry_run_prints_the_plan_for_a_card_you_do_not_have_and_exits():
    result = subprocess.run([sys.executable, "train_paw.py", "--gpu_memory_gib", "15", "--dry_run"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "plan for a GPU of 15.0 GiB" in result.stdout and "micro-batch 2 x accumulation 8" in result.stdout
    assert "Traceback" not in result.stderr


def test_with_no_gpu_the_main_command_trains_the_cpu_agent_and_eval_loads_what_it_saved(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")  # a machine with no GPU
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "train_paw.py", "--env", "alfworld", "--max_steps", "1",
                             "--output_dir", str(out)], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("no GPU: training the CPU agent (cpu-agent")
    assert "--model_name_or_path picks another model" in result.stdout
    result = subprocess.run([sys.executable, "eval.py", "--model_name_or_path", str(out), "--games", "generated",
                             "--num_games", "2", "--max_env_steps", "3", "--max_action_tokens", "32",
                             "--env_workers", "0", "--output", str(tmp_path / "eval")],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| **all** | 2 |" in result.stdout


def test_no_gpu_and_another_environment_asks_for_a_model():
    result = subprocess.run([sys.executable, "train_paw.py", "--env", "webshop"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "the CPU agent plays ALFWorld only" in result.stderr
    assert "Traceback" not in result.stderr


class OutOfMemoryAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_running_out_of_gpu_memory_says_which_flags_fit_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train_paw.main(["--model_name_or_path", "tiny", "--games", "generated", "--env_workers", "0", "--max_steps",
                        "3", "--save_steps", "1", "--output_dir", str(out)], callbacks=[OutOfMemoryAt(2)])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "the GPU ran out of memory in step 2" in err and "Traceback" not in err
    # The tiny model's layout is 4 x 1; with no estimate for it, the advice halves the micro-batch.
    assert "--per_device_train_batch_size 2 --gradient_accumulation_steps 2" in err
    assert f"{out / 'checkpoint-1'} is intact" in err and (out / "checkpoint-1" / "trainer_state.json").is_file()


def test_after_an_out_of_memory_the_advice_aims_below_the_failed_estimate():
    paw, args, model_args = plan_for("--gpu_memory_gib", "15")
    shape = model_shape(DEFAULT_MODEL)
    retry = after_out_of_memory(shape, paw, args, model_args, 15)
    paw, smaller, model_args = plan_for("--gpu_memory_gib", "15", *as_flags(retry).split())
    assert peak_gib(smaller, paw, model_args) <= 0.85 * run_peak(shape, paw, args, model_args)


@pytest.mark.parametrize("card", CARDS)
def test_eval_plays_as_many_games_at_once_as_the_card_holds(card, capsys):
    args = evaluation.parse_args(["--model_name_or_path", DEFAULT_MODEL, "--load_in_4bit", "--gpu_memory_gib",
                                  str(card), "--games", "generated", "--num_games", "2"])

    def inference_gib(batch):
        e = estimate(DEFAULT_MODEL, lora_r=16, rollout_episodes=batch,
                     episode_tokens=PROMPT_TOKENS + args.max_completion_length + args.max_action_tokens)
        return (e["weights"] + e["cuda_overhead"] + e["rollout"]) / GIB

    assert inference_gib(args.batch_size) <= HEADROOM * card < inference_gib(2 * args.batch_size)
    assert f"--batch_size {args.batch_size}" in capsys.readouterr().out


def test_eval_out_of_gpu_memory_suggests_a_smaller_batch(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(evaluation, "play_and_summarize", out_of_memory)
    with pytest.raises(SystemExit) as stop:
        evaluation.main(["--model_name_or_path", "tiny", "--games", "generated", "--num_games", "2", "--batch_size",
                         "8", "--env_workers", "0", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "try --batch_size 4" in err and "Traceback" not in err
