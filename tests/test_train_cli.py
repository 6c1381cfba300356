"""train_paw.py as users run it: real ALFWorld games, every mode and model setup, saving, resuming, bad flags."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import alfworld_gen
import train_paw

REPO = Path(__file__).resolve().parent.parent
FAST = ["--env", "alfworld", "--model_name_or_path", "tiny", "--train_split", "eval_out_of_distribution",
        "--num_train_games", "1", "--num_generations", "2", "--per_device_train_batch_size", "2",
        "--max_env_steps", "2", "--max_action_tokens", "8", "--use_cpu", "--report_to", "none"]
SETUPS = {
    "full": ["--use_peft", "false", "--load_in_4bit", "false"],
    "lora": ["--use_peft", "true", "--load_in_4bit", "false"],
    "4bit-lora": ["--use_peft", "true", "--load_in_4bit", "true"],
}


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("mode", ["off", "echo", "paw"])
def test_one_real_training_step(tiny_path, tmp_path, unseen_games, mode, setup):
    trainer = train_paw.main(FAST + SETUPS[setup] + ["--wm", mode, "--max_steps", "1", "--output_dir", str(tmp_path)])
    logged = trainer.state.log_history[0]
    assert trainer.state.global_step == 1
    assert {"episode/success_rate", "episode/length", "episode/invalid_action_rate"} <= logged.keys()
    assert ("wm/loss" in logged) == (mode != "off")
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trainable.values())  # LoRA on 4-bit: recast from TRL's bf16
    if setup == "4bit-lora":
        assert any("Linear4bit" in type(m).__name__ for m in trainer.model.modules())
    if mode != "off":  # the random model's episodes all fail: GRPO has no signal, the WM term (lambda = 1) does
        assert logged["wm/lambda_mean"] == 1.0 and logged["wm/loss"] > 0
        if setup == "full":
            initial = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
            assert any(not torch.equal(p.cpu(), initial[n]) for n, p in trainer.model.state_dict().items())
        else:
            assert any(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)  # B starts at zero


@pytest.mark.parametrize("env", ["webshop", "search"])
def test_one_training_step_on_the_other_environments(tmp_path, env):
    trainer = train_paw.main(["--env", env, "--model_name_or_path", "tiny", "--num_train_games", "1",
                              "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_env_steps", "2",
                              "--max_action_tokens", "8", "--use_cpu", "--max_steps", "1", "--output_dir",
                              str(tmp_path)])
    logged = trainer.state.log_history[0]
    assert trainer.state.global_step == 1
    assert logged["episode/env_error_rate"] == 0 and logged["episode/length"] > 0
    assert logged["wm/loss"] > 0  # the environment's pages and passages are WM targets


def run(args, **env):
    return subprocess.run([sys.executable, "train_paw.py", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900)


def test_the_readme_smoke_command_trains_and_saves_an_adapter_that_loads(tiny_path, tmp_path, unseen_games):
    out = tmp_path / "smoke"
    result = run(["--env", "alfworld", "--model_name_or_path", "tiny", "--max_steps", "2", "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2/2" in result.stderr  # the progress bar reached the last step
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    model = PeftModel.from_pretrained(base, out)
    saved = load_file(out / "adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert saved and len(saved) == len(loaded)
    assert any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n)
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


def test_a_killed_run_resumes_from_its_checkpoint_at_its_curriculum_level(tiny_path, tmp_path, monkeypatch):
    args = ["--model_name_or_path", "tiny", "--games", "generated", "--curriculum", "--num_generations", "2",
            "--per_device_train_batch_size", "2", "--max_env_steps", "2", "--max_action_tokens", "8", "--use_cpu",
            "--max_steps", "3", "--save_steps", "1", "--output_dir", str(tmp_path)]
    levels = []  # the room level of each rollout, read from the game files it played
    real_play = train_paw.play

    def play_or_die(envs, *a, **k):
        levels.append({re.search(r"-gen(\d)/", env.game).group(1) for env in envs})
        if len(levels) == 2:
            raise KeyboardInterrupt  # the run dies in step 2, after checkpoint-1 was written
        return real_play(envs, *a, **k)

    monkeypatch.setattr(train_paw, "play", play_or_die)
    # The tiny model never wins: let every rollout earn a promotion, to see the level travel through a checkpoint.
    monkeypatch.setattr(alfworld_gen.Curriculum, "update",
                        lambda self, successes: setattr(self, "level", self.level + 1))
    with pytest.raises(KeyboardInterrupt):
        train_paw.main(args)
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-2").exists()
    assert json.loads((tmp_path / "checkpoint-1" / "curriculum.json").read_text())["level"] == 1

    levels.clear()
    monkeypatch.setattr(train_paw, "play", lambda envs, *a, **k: levels.append(
        {re.search(r"-gen(\d)/", env.game).group(1) for env in envs}) or real_play(envs, *a, **k))
    trainer = train_paw.main(args + ["--resume_from_checkpoint", "last"])
    assert trainer.state.global_step == 3 and levels == [{"1"}, {"2"}]  # steps 2 and 3 only, at the saved level on
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2, 3]
    assert [entry["episode/game_level"] for entry in trainer.state.log_history if "loss" in entry] == [0, 1, 2]


def test_generated_games_train_offline_with_no_alfworld_data_at_all(tiny_path, tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "ALFWORLD_DATA"}
    result = subprocess.run([sys.executable, "train_paw.py", "--model_name_or_path", "tiny", "--games", "generated",
                             "--curriculum", "--max_steps", "1", "--output_dir", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, env=environment, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'episode/game_level': '0'" in result.stderr + result.stdout
    assert (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("args,message", [
    (["--wm_alpha", "0"], "--wm_alpha must be in (0, 1]"),
    (["--cmae_rho", "1.5"], "--cmae_rho must be in (0, 1]"),
    (["--num_generations", "3", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"],
     "must be divisible by num_generations (3)"),
    (["--env", "minecraft"], "--env minecraft: unknown; one of alfworld, webshop, search"),
    (["--gpu", "tpu9"], "--gpu tpu9: unknown card; one of t4, l4,"),
    (["--wm", "dreamer"], "invalid choice: 'dreamer'"),
    (["--temperature", "0.7"], "--wm echo/paw needs --temperature 1.0"),
    (["--task_types", "Sleep"], "invalid choice: 'Sleep'"),
    (["--env_options", "verbose"], "--env_options takes key=value pairs"),
    (["--env_options", "verbose=1"], "--env alfworld takes no option(s) verbose"),
    (["--curriculum"], "--curriculum needs --games generated"),
    (["--games", "generated", "--game_level", "9"], "--game_level must be from 0 to 5"),
    (["--env", "webshop", "--games", "generated"], "--games generated is for --env alfworld"),
])
def test_bad_flags_fail_fast_with_a_clear_message(args, message, capsys):
    # In this process (a new Python costs 10-20 s a flag): any exception other than the parser's exit fails the test,
    # as a traceback would. The script's own exit path is run by the tests below.
    with pytest.raises(SystemExit) as stop:
        train_paw.main(["--model_name_or_path", "tiny", *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_game_files_say_how_to_get_them(tmp_path):
    result = run(["--model_name_or_path", "tiny", "--max_steps", "1"], ALFWORLD_DATA=str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ALFWorld game files are missing" in result.stderr and "alfworld-download" in result.stderr


@pytest.mark.parametrize("script", ["train_paw.py", "sft.py", "eval.py"])
def test_a_model_that_is_not_here_and_not_reachable_says_how_to_work_offline(script, tmp_path):
    args = ["--model_name_or_path", "nobody/no-such-model", "--games", "generated", "--env_workers", "0"]
    result = subprocess.run([sys.executable, script, *args, *([] if script == "eval.py" else ["--output_dir",
                                                                                           str(tmp_path)])],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot load the model 'nobody/no-such-model'" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "--model_name_or_path cpu-agent" in result.stderr


def test_a_checkpoint_folder_that_does_not_exist_is_refused_before_loading(tmp_path):
    result = run(["--model_name_or_path", "tiny", "--resume_from_checkpoint", str(tmp_path / "checkpoint-7")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no checkpoint there" in result.stderr and "--resume_from_checkpoint last" in result.stderr
