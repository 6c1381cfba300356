"""Draw a training run's curves from its log into one PNG: no TensorBoard needed.

    python curves.py runs/paw                                          # writes runs/paw/curves.png
    python curves.py runs/paw --output paw.png
    python curves.py runs/paw/checkpoint-50/trainer_state.json         # the log as it was at that checkpoint

Reads RUN_DIR/trainer_state.json (train_paw.py writes it at the end of training) or, for a run that was stopped
early, the one in its newest checkpoint-N folder. Panels against the optimizer step: success rate, reward,
invalid-action rate, episode length and the world-model loss.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # writes files only: works on a server with no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

STATE_FILE = "trainer_state.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# Title, y-axis label, y range (None: fit the data), and the log keys the panel draws (key -> legend label, None
# when it draws one line).
PANELS = [
    ("Success rate", "fraction of episodes won", (0, 1), {"episode/success_rate": None}),
    ("Reward", "mean per episode", None, {"reward": "total", "rewards/task_reward/mean": "task only (no penalty)"}),
    ("Invalid actions", "fraction of actions", (0, 1), {"episode/invalid_action_rate": None}),
    ("Episode length", "actions per episode", None, {"episode/length": None}),
    ("World-model loss", "WM loss", None, {"wm/loss": None}),
]
ABSENT = {"wm/loss": "No world-model loss in this log:\nthe run used --wm off."}


def logged_series(log_history):
    """key -> (steps, values) for each panel key in the log; the final summary entry holds none of them."""
    series = {}
    for *_, lines in PANELS:
        for key in lines:
            points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
            if points:
                series[key] = tuple(list(column) for column in zip(*points))
    return series


def find_state(path):
    """The trainer_state.json to plot: `path` itself, the one in folder `path`, or in its newest checkpoint-N."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"{path}: no such folder or file")
    if (path / STATE_FILE).is_file():
        return path / STATE_FILE
    # A run stopped early has only checkpoints; one killed while saving may lack its state file, so skip those.
    saved = [state for state in path.glob(f"checkpoint-*/{STATE_FILE}") if CHECKPOINT.fullmatch(state.parent.name)]
    if not saved:
        raise ValueError(f"{path}: no {STATE_FILE} there nor in a checkpoint-N folder (is it the run's --output_dir?)")
    return max(saved, key=lambda state: int(CHECKPOINT.fullmatch(state.parent.name).group(1)))


def load_log(path):
    """(the state file found from `path`, its log_history), which has at least one training step to plot."""
    state_file = find_state(path)
    try:
        log_history = json.loads(state_file.read_text())["log_history"]
    except (ValueError, KeyError, TypeError) as error:  # not JSON, or JSON without a log
        raise ValueError(f"{state_file}: not a trainer_state.json with a log_history ({error!r})") from None
    if not logged_series(log_history):
        raise ValueError(f"{state_file}: no training step logged yet (the trainer logs every --logging_steps steps)")
    return state_file, log_history


def run_title(state_file):
    folder = Path(state_file).resolve().parent
    if CHECKPOINT.fullmatch(folder.name):  # say that the log ends at that checkpoint
        return f"Training curves: {folder.parent.name} (log of {folder.name})"
    return f"Training curves: {folder.name}"


def plot_log(log_history, output, title):
    """One panel per metric against the step, written to `output` (PNG). Returns the series drawn: key -> (steps,
    values), each value as logged."""
    plotted = logged_series(log_history)
    figure, axes = plt.subplots(2, 3, figsize=(14, 7.5), layout="constrained")
    for ax, (panel_title, ylabel, ylim, lines) in zip(axes.flat, PANELS):
        ax.set_title(panel_title)
        drawn = [key for key in lines if key in plotted]
        if not drawn:
            key = next(iter(lines))
            ax.text(0.5, 0.5, ABSENT.get(key, f"No {key} in this log."), ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for key in drawn:
            steps, values = plotted[key]
            # Dots show each step of a short run (one step is otherwise invisible); on a long one they blur the line.
            ax.plot(steps, values, marker="o" if len(steps) < 50 else "", markersize=3, label=lines[key])
        if len(drawn) > 1:
            ax.legend()
        if ylim:
            ax.set_ylim(ylim[0] - 0.03, ylim[1] + 0.03)  # a fixed scale, so 0.02 never looks like 1
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)  # plain values, not "1e-6 + 9.98e-1" above the axis
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[-1].remove()  # five panels on a 2 x 3 grid
    figure.suptitle(title, fontsize=14)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return plotted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the run's --output_dir, a checkpoint-N folder, or a trainer_state.json")
    parser.add_argument("--output", help="the PNG to write (default: curves.png in RUN, or beside it if it is a file)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    output = args.output or (run if run.is_dir() else run.parent) / "curves.png"
    try:
        state_file, log_history = load_log(run)
        plotted = plot_log(log_history, output, run_title(state_file))
    except (ValueError, OSError) as error:  # bad input or an unwritable output: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {output} (from {state_file})")
    return plotted


if __name__ == "__main__":
    main()
