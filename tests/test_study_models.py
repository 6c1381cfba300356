"""study.py for any model: a whole study of the tiny model (sft.py warm start, two modes, evaluations), the same
study killed during its second run and continued by the same command, SmolLM2 through a warm start and one RL step
per mode, its plan, and bad input that stops with a message and loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import study

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Two modes, one seed, two steps each with a checkpoint after each step; held-out evaluations at steps 0 and 2.
TINY_STUDY = ["--model_name_or_path", "tiny", "--warm_start", "sft", "--sft_games", "6", "--games", "generated",
              "--modes", "off", "paw", "--seeds", "0", "--steps", "2", "--eval_every", "2", "--eval_games", "4",
              "--env_workers", "0", "--train_flags", "--save_steps", "1"]


def run_study(output, *args, **popen):
    return subprocess.Popen([sys.executable, "study.py", *TINY_STUDY[:-3], *args, "--output", str(output),
                             *TINY_STUDY[-3:]], cwd=REPO, text=True, **popen)


def without_times(result):
    return {key: value for key, value in result.items() if key not in ("date", "wall_s")}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    output = tmp_path_factory.mktemp("study") / "tiny"
    process = run_study(output, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]
    return output, json.loads(output.with_name("tiny.json").read_text()), out


def test_a_study_of_any_model_warm_starts_it_trains_each_mode_and_writes_every_field(tiny_study):
    output, result, printed = tiny_study
    assert result["model"] == "tiny" and result["settings"]["warm_start"] == "sft"
    assert (Path(f"{output}_runs") / "warm_start" / "adapter_config.json").is_file()  # LoRA, as the runs train
    assert set(result["runs"]) == {"off", "paw"} and all(set(seeds) == {"0"} for seeds in result["runs"].values())
    for curve in (result["runs"][mode]["0"] for mode in ("off", "paw")):
        assert curve["step"] == [0, 2]
        for key in ("success", "nll", "invalid_action_rate", "avg_steps", "success_by_type"):
            assert len(curve[key]) == 2 and curve[key][0] == result["warm_start"][key], key
        assert set(curve["success_by_type"][0]) <= {"Pick", "Look", "Clean", "Heat", "Cool", "Pick2"}
    # The runs trained: the WM term moved the held-out NLL off the start, differently from plain GRPO.
    assert result["runs"]["paw"]["0"]["nll"][1] != result["runs"]["off"]["0"]["nll"][1]
    assert set(result["summary"]) == {"off", "paw"} and result["summary"]["paw"]["seeds"] == 1
    assert result["machine"]["gpu"] is None and result["settings"]["runs"]["episodes_per_step"] == 4
    assert set(result["wall_s"]["runs"]) == {"off-seed0", "paw-seed0"} and "warm_start" in result["wall_s"]
    assert output.with_name("tiny.png").read_bytes()[:8] == PNG_MAGIC
    assert "| paw | 1 | 2 |" in printed and "starting from an sft.py warm start" in printed


def test_a_study_killed_in_its_second_run_continues_to_the_same_result(tiny_study, tmp_path):
    output = tmp_path / "tiny"
    process = run_study(output, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = Path(f"{output}_runs") / "paw-seed0" / "checkpoint-1" / "trainer_state.json"
    deadline = time.time() + 600
    while not second.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = json.loads((Path(f"{output}_runs") / "study.json").read_text())
    assert state["runs"]["off-seed0"]["done"] and not state["runs"]["paw-seed0"]["done"]  # killed in the second

    process = run_study(output, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]
    assert "off seed 0" not in err  # the finished run was kept, not trained again
    assert f"resuming from {output}_runs/paw-seed0/checkpoint-1" in err  # the second went on from its checkpoint
    resumed = json.loads(output.with_name("tiny.json").read_text())
    assert without_times(resumed) | {"command": None} == without_times(tiny_study[1]) | {"command": None}


def test_a_study_with_other_settings_is_refused_and_nothing_is_written_over(tiny_study):
    output, _, _ = tiny_study
    files = {path: path.read_bytes() for path in (output.with_name("tiny.json"), Path(f"{output}_runs") / "study.json")}
    process = run_study(output, "--eval_samples", "2", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 2 and "Traceback" not in err
    assert "holds a study with other settings (eval_samples: 0 there, 2 here)" in err
    assert all(path.read_bytes() == content for path, content in files.items())


@pytest.mark.parametrize("args,message", [
    (["--modes", "dreamer"], "invalid choice: 'dreamer'"),
    (["--model_name_or_path", "nobody/no-such-model"], "cannot load the model 'nobody/no-such-model'"),
    (["--max_env_steps", "1"], "the expert won none of the 6 games within --max_env_steps 1"),
])
def test_bad_input_stops_with_a_message_and_writes_nothing(args, message, tmp_path):
    output = tmp_path / "study"
    process = run_study(output, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "study_runs" / "study.json").exists() and not (tmp_path / "study.json").exists()


def test_the_plan_comes_first_and_a_dry_run_stops_there(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        study.main([*TINY_STUDY[:-3], "--output", str(tmp_path / "s"), "--dry_run"])
    assert stop.value.code == 0 and not list(tmp_path.iterdir())
    printed = capsys.readouterr().out
    assert "2 modes (off, paw) x 1 seeds = 2 runs of 2 RL steps, 4 episodes a step" in printed
    assert "at step 0, then 1 per run" in printed and "no estimate: no GPU" in printed


def test_on_a_card_the_plan_gives_the_studys_expected_time(capsys, tmp_path):
    with pytest.raises(SystemExit):
        study.main(["--model_name_or_path", "Qwen/Qwen2.5-1.5B-Instruct", "--output", str(tmp_path / "s"), "--dry_run",
                    "--train_flags", "--gpu", "t4"])
    printed = capsys.readouterr().out
    assert "ESTIMATE on the T4, not measured, low-high (time_estimate.py): a step " in printed
    total = printed.split("the study ")[1].split(",")[0]  # e.g. "26-50 h"
    low, high = (float(end) for end in total.split()[0].split("-"))
    sessions = int(printed.split(f"the study {total}, ")[1].split()[0])
    assert low < high and total.endswith(" h") and (sessions - 1) * 12 < high + 0.5 and high - 0.5 <= sessions * 12
    assert "session(s) of 12 h at the high end" in printed


def test_smollm2_warm_started_then_one_rl_step_per_mode(smol_path, tmp_path):
    output = tmp_path / "smol"
    command = [sys.executable, "study.py", "--model_name_or_path", smol_path, "--warm_start", "sft", "--sft_games", "6",
               "--sft_flags", "--num_train_epochs 1", "--games", "generated", "--max_env_steps", "4",
               "--max_action_tokens", "16", "--modes", "off", "paw", "--seeds", "0", "--steps", "1",
               "--eval_every", "1", "--eval_games", "2", "--env_workers", "0", "--output", str(output), "--train_flags",
               "--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
               "--max_completion_length", "1024", "--load_in_4bit", "false"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(output.with_name("smol.json").read_text())
    assert saved["settings"]["runs"]["use_peft"] and not saved["settings"]["runs"]["load_in_4bit"]
    assert all(saved["runs"][mode]["0"]["step"] == [0, 1] for mode in ("off", "paw"))
    assert saved["warm_start"]["nll"] > 0 and "sft: the expert won" in result.stdout
