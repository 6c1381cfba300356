"""The laptop-scale experiment: does the agent learn, and does the world-model term help?

    python study.py --output results/study                 # the default study, about 80 minutes on 2 CPU cores
    python study.py --quick --output /tmp/quick            # a reduced version (minutes; the tests run it)
    python study.py --modes off paw --seeds 0 1 --steps 20 --output results/mine

From the same warm-started CPU agent (cpu_agent.py: a few-million-parameter model cloned from the expert on small
generated ALFWorld rooms), it trains each mode (--wm off = plain GRPO, echo, paw, and optional ablations) with
several seeds on generated training games, and every --eval_every steps (step 0 = the warm start) evaluates on
held-out generated games with eval.py's code: greedy success, and the next-observation NLL (eval.py's WM diagnostic)
on a fixed set of held-out expert episodes, so every checkpoint of every mode is scored on the same text. Writes
OUT.json (every run's curve, the settings, the machine, the wall time) and OUT.png (success and NLL against the
training step, mean ± std over seeds). This is not the paper's setting: a tiny agent on tiny rooms.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # writes files only: works on a server with no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402
from trl import ModelConfig  # noqa: E402

import eval as evaluation  # noqa: E402
import train_paw  # noqa: E402
from cpu_agent import AGENT_NAME, GAME_LEVEL, MAX_ENV_STEPS, RUN_FLAGS, agent_path  # noqa: E402
from env_workers import EnvWorkers  # noqa: E402
from rollout import ChatFormat, expert_policy, play  # noqa: E402

# The modes a study can compare: train_paw.py flags on top of the CPU agent's run defaults.
MODES = {
    "off": ["--wm", "off"],
    "echo": ["--wm", "echo"],
    "paw": ["--wm", "paw"],
    "paw-alpha1": ["--wm", "paw", "--wm_alpha", "1"],  # ablation: no action-entropy selection
    "paw-ce": ["--wm", "paw", "--wm_loss", "ce"],  # ablation: cross-entropy instead of CMAE
    "paw-constant": ["--wm", "paw", "--wm_weighting", "constant"],  # ablation: no reward-adaptive weight
    "gigpo": ["--wm", "off", "--advantage", "gigpo"],  # GiGPO: step-level credit from repeated states
    "gigpo-paw": ["--wm", "paw", "--advantage", "gigpo"],
    "rloo": ["--wm", "off", "--advantage", "rloo"],
}
DEFAULTS = dict(modes=["off", "echo", "paw"], seeds=[0, 1, 2], steps=20, eval_every=10, eval_games=120, train_flags=[])
# 4 games x 4 episodes a step, not the run default's 2 x 8: on held-out games the invalid-action rate then falls
# (measured 30.4% -> 22.5% in 8 steps) where with 2 games a step it stayed at 30% (README, "The study").
QUICK = dict(modes=["off", "paw"], seeds=[0], steps=8, eval_every=4, eval_games=40,
             train_flags=["--num_generations", "4"])


def shown(value):
    return " ".join(map(str, value)) if isinstance(value, list) else value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="results/study", help="writes OUTPUT.json, OUTPUT.png and OUTPUT_runs/")
    parser.add_argument("--quick", action="store_true",
                        help=f"a reduced study: {' '.join(f'--{k} {shown(v)}' for k, v in QUICK.items())}")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help=f"default {DEFAULTS['modes']}")
    parser.add_argument("--seeds", nargs="+", type=int, help=f"default {DEFAULTS['seeds']}")
    parser.add_argument("--steps", type=int, help=f"RL steps per run (default {DEFAULTS['steps']})")
    parser.add_argument("--eval_every", type=int, help=f"steps between evaluations (default {DEFAULTS['eval_every']})")
    parser.add_argument("--eval_games", type=int, help=f"held-out games (default {DEFAULTS['eval_games']})")
    parser.add_argument("--train_flags", nargs=argparse.REMAINDER,
                        help="anything after it goes to every run's train_paw.py (e.g. --learning_rate 1e-4); "
                             "it replaces --quick's")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("steps", "eval_every", "eval_games"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def held_out_games(num_games):
    """eval.py's settings for the study: greedy, on held-out generated games of the agent's level and step budget."""
    return evaluation.parse_args([
        "--model_name_or_path", AGENT_NAME, "--games", "generated", "--game_level", str(GAME_LEVEL),
        "--split", "eval_out_of_distribution", "--num_games", str(num_games), "--max_env_steps", str(MAX_ENV_STEPS),
        "--max_action_tokens", str(RUN_FLAGS["max_action_tokens"]), "--batch_size", "64",
    ])


def score(model, eval_args, chat, workers, reference):
    """Held-out success (greedy) and next-observation NLL on the reference episodes, of the model as it is now."""
    was_training = model.training
    model.eval()
    summary, _ = evaluation.play_and_summarize(eval_args, chat, model, workers)
    wm = evaluation.wm_diagnostic(model, reference)
    model.train(was_training)
    return {"success": summary["success_rate"]["mean"], "nll": wm["nll_per_token"],
            "invalid_action_rate": summary["invalid_action_rate"]["mean"], "avg_steps": summary["avg_steps"]["mean"]}


class HeldOutEval(TrainerCallback):
    """Scores the model every `every` optimizer steps and at the last one, into `curve` (lists per metric)."""

    def __init__(self, every, evaluate, curve):
        self.every, self.evaluate, self.curve = every, evaluate, curve

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.curve["step"].append(state.global_step)
            scores = self.evaluate(model)
            for key, value in scores.items():
                self.curve[key].append(value)
            print(f"study: step {state.global_step}: held-out success {scores['success']:.3f}, "
                  f"NLL {scores['nll']:.3f}", file=sys.stderr)


def machine():
    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def summarize(runs, steps):
    """Per mode: success at the start and end (mean ± std over seeds) and the final NLL."""
    table = {}
    for mode, by_seed in runs.items():
        curves = list(by_seed.values())

        def stat(key, index):
            values = [curve[key][index] for curve in curves]
            return {"mean": statistics.fmean(values), "std": statistics.pstdev(values)}

        table[mode] = {"seeds": len(curves), "steps": steps, "success_start": stat("success", 0),
                       "success_end": stat("success", -1), "nll_start": stat("nll", 0), "nll_end": stat("nll", -1)}
    return table


def plot(result, output):
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for mode, by_seed in result["runs"].items():
        curves = list(by_seed.values())
        steps = curves[0]["step"]
        for ax, key in zip(axes, ("success", "nll")):
            values = [[curve[key][i] for curve in curves] for i in range(len(steps))]
            mean = [statistics.fmean(v) for v in values]
            std = [statistics.pstdev(v) for v in values]
            ax.plot(steps, mean, marker="o", markersize=3, label=f"{mode} ({len(curves)} seeds)")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    settings = result["settings"]
    axes[0].set(title=f"Held-out success ({settings['eval_games']} generated level-{settings['game_level']} games, "
                      "greedy)", xlabel="RL step", ylabel="success rate")
    axes[1].set(title="Next-observation NLL on held-out expert episodes", xlabel="RL step",
                ylabel="nats per observation token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(f"PaW study: CPU agent, mean ± std over seeds ({result['date'][:10]})")
    figure.savefig(output, dpi=100)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    command = " ".join(["python study.py", *(sys.argv[1:] if argv is None else argv)])
    start = time.time()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    path = agent_path()  # built once, before any run, so that its time is not a run's
    chat = ChatFormat(AutoTokenizer.from_pretrained(path, padding_side="left"))
    eval_args = held_out_games(args.eval_games)
    workers = EnvWorkers(eval_args.env_workers, eval_args.env_timeout)  # forked before any model loads: small
    try:
        reference = play([workers.make("alfworld", game) for game in eval_args.game_files], expert_policy(chat), chat,
                         MAX_ENV_STEPS)

        def evaluate(model):
            return score(model, eval_args, chat, workers, reference)

        warm_start = evaluate(train_paw.load_model(ModelConfig(model_name_or_path=path, dtype="float32"), "cpu")[0])
        print(f"study: warm start: held-out success {warm_start['success']:.3f}, NLL {warm_start['nll']:.3f}",
              file=sys.stderr)
        runs, wall = {}, {}
        for mode in args.modes:
            runs[mode] = {}
            for seed in args.seeds:
                run_start = time.time()
                curve = {"step": [0], **{key: [value] for key, value in warm_start.items()}}  # the same start
                run_argv = ["--model_name_or_path", AGENT_NAME, *MODES[mode], "--seed", str(seed),
                        "--max_steps", str(args.steps), "--save_strategy", "no", "--disable_tqdm", "true",
                        "--output_dir", f"{output}_runs/{mode}-seed{seed}", *args.train_flags]
                train_paw.main(run_argv, callbacks=[HeldOutEval(args.eval_every, evaluate, curve)])
                runs[mode][str(seed)] = curve
                wall[f"{mode}-seed{seed}"] = time.time() - run_start
                print(f"study: {mode} seed {seed}: success {curve['success'][0]:.3f} -> {curve['success'][-1]:.3f}, "
                      f"NLL {curve['nll'][0]:.3f} -> {curve['nll'][-1]:.3f} ({wall[f'{mode}-seed{seed}']:.0f} s)",
                      file=sys.stderr)
    finally:
        workers.close()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
        "machine": machine(),
        "settings": {"modes": {mode: MODES[mode] for mode in args.modes}, "seeds": args.seeds, "steps": args.steps,
                     "eval_every": args.eval_every, "eval_games": args.eval_games, "game_level": GAME_LEVEL,
                     "max_env_steps": MAX_ENV_STEPS, "train_flags": args.train_flags,
                     "run_defaults": RUN_FLAGS, "agent": path},
        "warm_start": warm_start, "runs": runs, "summary": summarize(runs, args.steps),
        "wall_s": {"total": time.time() - start, "runs": wall},
    }
    output.with_name(output.name + ".json").write_text(json.dumps(result, indent=2))
    plot(result, output.with_name(output.name + ".png"))
    print(table(result))
    return result


def table(result):
    lines = ["| mode | seeds | steps | success at start | success at end (mean ± std) | NLL start → end |",
             "|---|---|---|---|---|---|"]
    for mode, row in result["summary"].items():
        lines.append(f"| {mode} | {row['seeds']} | {row['steps']} | {100 * row['success_start']['mean']:.1f} | "
                     f"{100 * row['success_end']['mean']:.1f} ± {100 * row['success_end']['std']:.1f} | "
                     f"{row['nll_start']['mean']:.3f} → {row['nll_end']['mean']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
