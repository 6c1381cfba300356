"""curves.py: the PNG of a real run draws exactly its log, the checkpoint fallback, bad input in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import curves
import train_paw

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = ["--model_name_or_path", "tiny", "--games", "generated", "--max_steps", "2", "--num_generations", "2",
            "--per_device_train_batch_size", "2", "--max_env_steps", "2", "--max_action_tokens", "8", "--use_cpu",
            "--report_to", "none"]
PANEL_KEYS = ["episode/success_rate", "reward", "rewards/task_reward/mean", "episode/invalid_action_rate",
              "episode/length", "wm/loss"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_log draws, kept open so that a test can read their texts."""
    kept = []
    monkeypatch.setattr(curves.plt, "close", kept.append)
    return kept


def state(steps, **extra):
    """A trainer_state.json as the trainer writes it: one entry per logged step, then the run's summary entry."""
    last = max(steps, default=0)
    log = [{"step": step, "loss": 0.5, "reward": step / 10, "episode/success_rate": step / 100, **extra}
           for step in steps]
    return {"global_step": last, "log_history": log + [{"step": last, "train_runtime": 3.0}]}


def write_state(folder, content):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps(content))


@pytest.mark.parametrize("wm", ["paw", "off"])
def test_the_picture_of_a_real_run_draws_exactly_its_log(tiny_path, tmp_path, capsys, figures, wm):
    trainer = train_paw.main(TINY_RUN + ["--wm", wm, "--output_dir", str(tmp_path)])
    plotted = curves.main([str(tmp_path)])

    picture = tmp_path / "curves.png"
    assert picture.read_bytes()[:8] == PNG_MAGIC and picture.stat().st_size > 10_000
    assert f"wrote {picture}" in capsys.readouterr().out
    steps_logged = [entry for entry in trainer.state.log_history if "train_runtime" not in entry]
    expected_keys = [key for key in PANEL_KEYS if wm != "off" or key != "wm/loss"]
    assert sorted(plotted) == sorted(expected_keys)
    for key in expected_keys:
        assert plotted[key] == ([1, 2], [entry[key] for entry in steps_logged]), key
    [figure] = figures
    assert figure.get_suptitle() == f"Training curves: {tmp_path.name}"
    panel_texts = [text.get_text() for ax in figure.axes for text in ax.texts]
    assert any("--wm off" in text for text in panel_texts) == (wm == "off")


@pytest.mark.parametrize("saved,expected", [
    ({"checkpoint-1": 1, "checkpoint-2": 2}, "checkpoint-2"),
    ({"checkpoint-9": 9, "checkpoint-10": 10}, "checkpoint-10"),  # by number, not by name
    ({"checkpoint-1": 1, "checkpoint-2": 2, "": 3}, ""),  # a finished run's own state file wins
], ids=["newest", "by number", "finished run"])
def test_the_log_is_the_runs_own_or_its_newest_checkpoints(tmp_path, figures, saved, expected):
    for folder, last_step in saved.items():
        write_state(tmp_path / folder, state(range(1, last_step + 1)))
    (tmp_path / "checkpoint-11").mkdir()  # killed while saving: no state file in it

    assert curves.find_state(tmp_path) == tmp_path / expected / "trainer_state.json"
    plotted = curves.main([str(tmp_path)])
    steps = list(range(1, saved[expected] + 1))
    assert plotted == {"reward": (steps, [step / 10 for step in steps]),
                       "episode/success_rate": (steps, [step / 100 for step in steps])}
    assert (tmp_path / "curves.png").exists()  # in the run folder, not in the checkpoint
    assert figures[0].get_suptitle() == f"Training curves: {tmp_path.name}" + (f" (log of {expected})" * bool(expected))


def test_a_state_file_is_read_as_given_and_the_picture_goes_where_asked(tmp_path):
    write_state(tmp_path / "checkpoint-1", state([1], **{"wm/loss": 0.7}))
    write_state(tmp_path / "checkpoint-2", state([1, 2]))
    output = tmp_path / "pictures" / "early.png"
    plotted = curves.main([str(tmp_path / "checkpoint-1" / "trainer_state.json"), "--output", str(output)])
    assert plotted["wm/loss"] == ([1], [0.7]) and output.read_bytes()[:8] == PNG_MAGIC


def bad_run(tmp_path, problem):
    if problem == "missing":
        return tmp_path / "no_such_run"
    if problem == "no state file":
        (tmp_path / "checkpoint-3").mkdir()  # a run killed while saving its first checkpoint
    elif problem == "no step logged":
        write_state(tmp_path, state([]))
    elif problem == "not JSON":
        (tmp_path / "trainer_state.json").write_text('{"log_history": [')  # cut off mid-write
    return tmp_path


@pytest.mark.parametrize("problem,message", [
    ("missing", "no such folder or file"),
    ("no state file", "no trainer_state.json there nor in a checkpoint-N folder"),
    ("no step logged", "no training step logged yet"),
    ("not JSON", "not a trainer_state.json with a log_history"),
])
def test_bad_input_fails_in_one_line_with_exit_code_2(tmp_path, problem, message):
    run = bad_run(tmp_path, problem)
    result = subprocess.run([sys.executable, "curves.py", str(run)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and str(run) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.png"))
