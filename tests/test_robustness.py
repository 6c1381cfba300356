"""Days-long runs: a run killed with SIGKILL (even during a save) resumes exactly where its last complete checkpoint
left it, and NaN or inf gradients are skipped, then stop the run if they keep coming."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import train_paw

REPO = Path(__file__).resolve().parent.parent
RUN = ["--model_name_or_path", "tiny", "--games", "generated", "--env_workers", "0", "--max_steps", "4",
       "--save_steps", "1", "--seed", "3"]
# train_paw.py with every optimizer save slowed down by 3 s: a window in which the test kills it mid-save.
SLOW_SAVES = """import sys, time, torch
real_save = torch.save
def slow_save(obj, path, *args, **kwargs):
    time.sleep(3 if "optimizer" in str(path) else 0)
    return real_save(obj, path, *args, **kwargs)
torch.save = slow_save
import train_paw
train_paw.main()"""
# train_paw.py that prints, as its last line, the steps for which this process logged a training loss.
LOGGED_STEPS = """import json
from transformers import TrainerCallback
import train_paw
class LoggedSteps(TrainerCallback):
    steps = []
    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.steps.append(state.global_step)
train_paw.main(callbacks=[LoggedSteps()])
print("steps logged:", json.dumps(LoggedSteps.steps))"""


def train(*args, script=("train_paw.py",), **popen):
    return subprocess.Popen([sys.executable, *script, *RUN, *args], cwd=REPO, text=True, **popen)


def logged(run_dir):
    return [(e["step"], e["loss"], e["reward"]) for e in json.loads((run_dir / "trainer_state.json").read_text())[
        "log_history"] if "loss" in e]


def test_a_run_killed_during_a_save_resumes_from_its_last_complete_checkpoint_exactly(tmp_path):
    reference = train("--output_dir", str(tmp_path / "reference"), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    run = train("--output_dir", str(killed), script=("-c", SLOW_SAVES), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
    saving = killed / "checkpoint-3" / "adapter_model.safetensors"  # weights written, optimizer state not yet
    deadline = time.time() + 600
    while not saving.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert saving.exists() and not (killed / "checkpoint-3" / "trainer_state.json").exists()  # killed mid-save

    saved_step = json.loads((killed / "checkpoint-2" / "trainer_state.json").read_text())["global_step"]

    resumed = train("--output_dir", str(killed), "--resume_from_checkpoint", "last", script=("-c", LOGGED_STEPS),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    assert f"{killed / 'checkpoint-3'} is incomplete (its save was interrupted): passed over" in err
    # The resumed process trained the missing steps only: a run that started again at step 0 would reproduce the
    # reference below just as well (it is seeded), but it would log steps 1 to 4.
    steps_here = json.loads(out.strip().splitlines()[-1].removeprefix("steps logged:"))
    assert saved_step == 2 and steps_here == [3, 4]
    assert reference.wait(timeout=900) == 0
    # Same global step, optimizer, scheduler, RNG and data order: the same log and bit-identical weights.
    assert logged(killed) == logged(tmp_path / "reference") and [s for s, _, _ in logged(killed)] == [1, 2, 3, 4]
    want, got = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "reference", killed))
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


@pytest.fixture
def poisoned_steps(monkeypatch):
    """Steps (1-based) whose loss is multiplied by NaN, so that every gradient of that step is NaN."""
    steps = set()
    real_compute_loss = train_paw.PaWTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = real_compute_loss(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step + 1 in steps else loss

    monkeypatch.setattr(train_paw.PaWTrainer, "compute_loss", compute_loss)
    return steps


def test_a_nan_gradient_skips_its_step_and_the_run_goes_on(tmp_path, poisoned_steps, capsys):
    poisoned_steps.add(2)
    out = tmp_path / "run"
    trainer = train_paw.main(RUN + ["--use_peft", "false", "--load_in_4bit", "false", "--output_dir", str(out)])
    assert trainer.state.global_step == 4
    assert "warning: step 2: a NaN or inf gradient; the optimizer step was skipped" in capsys.readouterr().err
    weights = [load_file(out / f"checkpoint-{step}" / "model.safetensors") for step in (1, 2, 3)]
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])  # step 2 changed nothing
    assert any((weights[1][k] != weights[2][k]).any() for k in weights[0])  # step 3 trained again
    assert all(value.isfinite().all() for value in weights[2].values())


def test_nan_gradients_that_keep_coming_stop_the_run_with_a_clear_message(tmp_path, poisoned_steps, capsys):
    poisoned_steps.update(range(2, 10))
    with pytest.raises(SystemExit) as stop:
        train_paw.main(RUN + ["--max_nonfinite_steps", "2", "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err
    assert "2 optimizer steps in a row had a NaN or inf gradient, so the run stopped at step 3" in err
    assert f"{tmp_path / 'run' / 'checkpoint-3'} is intact" in err  # saved after the skipped (unchanged) step
