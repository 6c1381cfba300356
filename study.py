"""The paper's experiment in one command, for any model: from one start, does the world-model term beat plain GRPO
(and GiGPO) on games the agent never trained on?

    python study.py --output results/study                 # the CPU agent: 3 modes x 3 seeds x 20 steps, on a CPU
    python study.py --quick --output /tmp/quick            # a reduced version (minutes; the tests run it)
    python study.py --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --warm_start sft --games generated \\
        --game_level 2 --modes off paw --seeds 0 1 --steps 100 --eval_every 25 --output runs/study   # on a GPU
    python study.py ... --dry_run                          # its plan: runs, steps, evaluations, expected time

Every run starts from the same model: as it is (--warm_start none), an adapter you have (--adapter), or a warm start
on the expert's episodes (--warm_start sft: sft.py, done once and shared). Each mode (--wm off = plain GRPO, echo,
paw, gigpo, gigpo-paw, and the ablations) x seed trains with train_paw.py and the plan it makes for this machine
(LoRA on NF4 on a GPU; the CPU agent keeps its run settings), and every --eval_every steps (step 0 = the start)
scores held-out games with eval.py's code: greedy success, per task type, invalid actions, the next-observation NLL
on one fixed set of held-out expert episodes, and with --eval_samples K sampled success over K runs. It writes
OUTPUT.json (every curve, the model, the card, the settings, the wall times) and OUTPUT.png (mean ± std over seeds).

A study outlives a session: the same command continues it, keeping finished runs and evaluations and resuming the
run in progress from its newest complete checkpoint (OUTPUT_runs/ holds them). It refuses to continue, or to write
over, a study whose settings differ.
"""

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # writes files only: works on a server with no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import eval as evaluation  # noqa: E402
import sft  # noqa: E402
import train_paw  # noqa: E402
from env_workers import EnvWorkers  # noqa: E402
from envs import ALFWORLD_SPLITS, DataMissing  # noqa: E402
from models import AGENT_NAME, LOCAL_RUN_FLAGS, ModelMissing, load_model, load_tokenizer  # noqa: E402
from plan import duration_range, gpu_name, planned_card, planned_shape, step_time  # noqa: E402
from rollout import ChatFormat, expert_policy, play  # noqa: E402
from time_estimate import ENDS, HOURS_PER_SESSION  # noqa: E402

# The modes a study can compare: train_paw.py flags on top of the model's run settings.
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
# 4 games x 4 episodes a step, not the CPU agent's run default of 2 x 8: on held-out games the invalid-action rate
# then falls (measured 30.4% -> 22.5% in 8 steps) where with 2 games a step it stayed at 30% (results/README.md).
QUICK = dict(modes=["off", "paw"], seeds=[0], steps=8, eval_every=4, eval_games=40,
             train_flags=["--num_generations", "4"])
# train_paw.py's environment flags a study passes to the warm start and every run; the last two change no result.
GAME_FLAGS = ("env", "games", "game_level", "max_env_steps", "max_action_tokens", "task_types", "env_options",
              "env_workers", "env_timeout")
SAME_RESULTS = ("env_workers", "env_timeout")
STATE = "study.json"  # in OUTPUT_runs/: the settings and every finished piece of work


class Refused(ValueError):
    """The study cannot go on as asked: the message says why and what to do."""


def shown(value):
    return " ".join(map(str, value)) if isinstance(value, list) else value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--output", default="results/study", help="writes OUTPUT.json, OUTPUT.png and OUTPUT_runs/")
    add("--model_name_or_path", default=AGENT_NAME,
        help="any model train_paw.py takes: a Hub id, a folder, tiny, cpu-agent (the default)")
    add("--warm_start", choices=["none", "sft"], default="none",
        help="sft: behaviour cloning on the expert's episodes first (sft.py), once for every run")
    add("--adapter", help="start every run from this LoRA adapter (on --model_name_or_path)")
    add("--sft_games", type=int, help="training games the expert plays for the warm start (default: sft.py's)")
    add("--sft_flags", default="", help="more sft.py flags, in one quoted string (e.g. \"--num_train_epochs 2\")")
    add("--quick", action="store_true",
        help=f"a reduced study: {' '.join(f'--{k} {shown(v)}' for k, v in QUICK.items())}")
    add("--modes", nargs="+", choices=list(MODES), help=f"default {DEFAULTS['modes']}")
    add("--seeds", nargs="+", type=int, help=f"default {DEFAULTS['seeds']}")
    add("--steps", type=int, help=f"RL steps per run (default {DEFAULTS['steps']})")
    add("--eval_every", type=int, help=f"steps between evaluations (default {DEFAULTS['eval_every']})")
    add("--eval_games", type=int, help=f"held-out games (default {DEFAULTS['eval_games']})")
    add("--eval_split", default="eval_out_of_distribution", choices=list(ALFWORLD_SPLITS)[1:],
        help="held-out split (ALFWorld: eval_in_distribution = valid_seen, the PaW paper's table)")
    add("--eval_samples", type=int, default=0, help="also sampled success (temperature 1) over this many runs")
    add("--env", help="train_paw.py's environment flags (default: the model's run settings)")
    add("--games", choices=["official", "generated"])
    add("--game_level", type=int)
    add("--max_env_steps", type=int)
    add("--max_action_tokens", type=int)
    add("--task_types", nargs="+")
    add("--env_options", nargs="+")
    add("--env_workers", type=int)
    add("--env_timeout", type=float)
    add("--dry_run", action="store_true", help="print the study's plan and exit")
    add("--train_flags", nargs=argparse.REMAINDER,
        help="anything after it goes to every run's train_paw.py (e.g. --learning_rate 1e-4); it replaces --quick's")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("steps", "eval_every", "eval_games"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.eval_samples < 0:
        parser.error("--eval_samples must be >= 0")
    if args.adapter and args.warm_start == "sft":
        parser.error("--adapter is a start already: leave out --warm_start sft")
    return args


def game_flags(args, fingerprint=False):
    """The environment flags given, as train_paw.py flags (`fingerprint`: only those that change results)."""
    flags = []
    for key in GAME_FLAGS:
        value = getattr(args, key)
        if value is not None and not (fingerprint and key in SAME_RESULTS):
            flags += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return flags


def quietly(parse, argv):
    """Parse train_paw.py or sft.py flags without printing the plan (errors still print and exit 2)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return parse(argv)


# ----------------------------------------------------------------------------------------------------------------
# Held-out scores
# ----------------------------------------------------------------------------------------------------------------


def held_out(args, paw, run_args, batch, sampled=False):
    """eval.py's settings: the run's environment, games, caps and batch, on the held-out split."""
    return evaluation.parse_args([
        "--model_name_or_path", args.model_name_or_path, "--env", paw.env, "--games", paw.games,
        "--game_level", str(paw.game_level), "--split", args.eval_split, "--num_games", str(args.eval_games),
        "--max_env_steps", str(paw.max_env_steps), "--max_action_tokens", str(paw.max_action_tokens),
        "--max_completion_length", str(run_args.max_completion_length), "--batch_size", str(batch),
        "--env_workers", str(paw.env_workers), "--env_timeout", str(paw.env_timeout),
        *(["--env_options", *paw.env_options] if paw.env_options else []),
        *(["--temperature", "1", "--num_runs", str(args.eval_samples)] if sampled else [])])


def score(model, held, chat, workers, reference):
    """The model as it is now: greedy success (overall and per task type), invalid actions, steps, next-observation
    NLL on the reference episodes, and sampled success where asked."""
    greedy_args, sampled_args = held
    was_training = model.training
    model.eval()
    summary, _ = evaluation.play_and_summarize(greedy_args, chat, model, workers)
    scores = {"success": summary["success_rate"]["mean"], "nll": evaluation.wm_diagnostic(model, reference)[
        "nll_per_token"], "invalid_action_rate": summary["invalid_action_rate"]["mean"],
        "avg_steps": summary["avg_steps"]["mean"],
        "success_by_type": {t: v["success_rate"]["mean"] for t, v in summary["per_task_type"].items()}}
    if sampled_args:
        scores["sampled_success"] = evaluation.play_and_summarize(sampled_args, chat, model, workers)[0][
            "success_rate"]["mean"]
    model.train(was_training)
    return scores


class HeldOutEval(TrainerCallback):
    """Scores the model every `every` optimizer steps and at the last one into `curve` (lists per metric), and calls
    `save` after each. A run resumed from a checkpoint drops what came after it: those steps come again."""

    def __init__(self, every, evaluate, curve, save):
        self.every, self.evaluate, self.curve, self.save = every, evaluate, curve, save

    def on_train_begin(self, args, state, control, **kwargs):
        kept = sum(step <= state.global_step for step in self.curve["step"])
        for key in self.curve:
            del self.curve[key][kept:]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            scores = self.evaluate(model)
            self.curve["step"].append(state.global_step)
            for key, value in scores.items():
                self.curve[key].append(value)
            self.save()
            print(f"study: step {state.global_step}: held-out success {scores['success']:.3f}, "
                  f"NLL {scores['nll']:.3f}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# The study's state: settings, and every finished piece of work, saved as it is done
# ----------------------------------------------------------------------------------------------------------------


def differences(old, new, prefix=""):
    """The settings that differ, as 'key: old there, new here'."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new))
                for line in differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} there, {new!r} here"]


def load_state(folder, result_file, settings):
    """The saved state of this study, a fresh one if there is none, or Refused where OUTPUT holds another study."""
    state_file = folder / STATE
    for path in (state_file, result_file):
        if path.exists():
            saved = json.loads(path.read_text())["settings"]
            if saved != settings:
                raise Refused(f"{path} holds a study with other settings ({'; '.join(differences(saved, settings))})"
                              f": nothing was changed. Give another --output, or run it with its own settings.")
    if state_file.exists():
        return json.loads(state_file.read_text())
    return {"settings": settings, "start": None, "warm_start_path": None, "runs": {}, "wall_s": {}}


def save_state(folder, state):
    """Written whole, then renamed: a kill never leaves half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (STATE + ".partial")
    partial.write_text(json.dumps(state, indent=2))
    os.replace(partial, folder / STATE)


# ----------------------------------------------------------------------------------------------------------------
# The plan: what will run, and how long it should take
# ----------------------------------------------------------------------------------------------------------------


def evaluation_steps(steps, every):
    return sorted({*range(every, steps + 1, every), steps})


def expected_time(args, paw, run_args, model_args, batch, sft_args, end="high"):
    """(seconds of the warm start, a step, an evaluation, a run, the study) by time_estimate's estimate for this card at
    one `end` of its range, or a string saying why there is none."""
    card, card_gib, name = planned_card(paw.gpu, paw.gpu_memory_gib)
    shape = planned_shape(model_args.model_name_or_path, card_gib)
    if card is None or shape is None:
        return ("no GPU" if card_gib is None else f"no figures for the {name}" if name and not card else
                "no estimate for this model" if card else "memory alone does not say how fast a card is")
    step = step_time(shape, card, paw, run_args, model_args, end=end)["step"]
    waves = math.ceil(args.eval_games / batch) * (1 + args.eval_samples)
    held_out_s = waves * step_time(shape, card, paw, run_args, model_args, end=end, per_device_train_batch_size=batch,
                                   gradient_accumulation_steps=1)["rollout"]
    warm = 0.0
    if sft_args:  # the expert's episodes, so typical turns; each epoch trains once on each game's episode
        sft_env, sft_config, _ = sft_args
        games = sft_env.num_train_games or len(sft_env.train_games(sft_config.seed))
        warm = games * sft_config.num_train_epochs * step_time(shape, card, paw, run_args, model_args, typical=True,
                                                               end=end)["training"] / (
            run_args.per_device_train_batch_size * run_args.gradient_accumulation_steps)
    run = args.steps * step + len(evaluation_steps(args.steps, args.eval_every)) * held_out_s
    runs = len(args.modes) * len(args.seeds)
    return dict(card=card.name, warm_start=warm, step=step, evaluation=held_out_s, run=run,
                study=warm + held_out_s + runs * run)


def print_plan(args, paw, run_args, start, batch, estimates):
    """The study's plan; `estimates`: expected_time's at the low and the high end."""
    runs, evaluations = len(args.modes) * len(args.seeds), len(evaluation_steps(args.steps, args.eval_every))
    episodes = run_args.per_device_train_batch_size * run_args.gradient_accumulation_steps
    games = f"generated level {paw.game_level}" if paw.games == "generated" else "official"
    print(f"study: {args.model_name_or_path} on {paw.env} ({games} games), starting from {start}")
    print(f"  runs        {len(args.modes)} modes ({', '.join(args.modes)}) x {len(args.seeds)} seeds = {runs} runs of "
          f"{args.steps} RL steps, {episodes} episodes a step")
    print(f"  evaluation  at step 0, then {evaluations} per run (every {args.eval_every} steps and the last): "
          f"{args.eval_games} held-out games of {args.eval_split}, greedy"
          + (f", and sampled over {args.eval_samples} runs" if args.eval_samples else "") + f", {batch} at once")
    low, high = estimates
    if isinstance(low, str):
        print(f"  time        no estimate: {low}")
    else:
        span = {key: duration_range(low[key], high[key])
                for key in ("warm_start", "step", "evaluation", "run", "study")}
        sessions = math.ceil(high["study"] / 3600 / HOURS_PER_SESSION)
        print(f"  time        ESTIMATE on the {low['card']}, not measured, low-high (time_estimate.py): "
              + (f"warm start {span['warm_start']}, " if low["warm_start"] else "")
              + f"a step {span['step']}, an evaluation {span['evaluation']}, a run {span['run']}; the study "
              f"{span['study']}, {sessions} session(s) of {HOURS_PER_SESSION} h at the high end")
    print(f"  resume      the same command continues it after a session ends ({args.output}_runs/ holds its work)")


# ----------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------


def warm_start(args, folder, argv):
    """sft.py on the expert's episodes of the training games, into `folder`; the train_paw.py flags of the start."""
    if not (folder / "trainer_state.json").exists():  # sft.py writes it last: a warm start cut short is done again
        sft.main(argv)  # no winning expert episode, or no model: its message, and exit code 2
    if (folder / "adapter_config.json").exists():
        return ["--model_name_or_path", args.model_name_or_path, "--adapter", str(folder)]
    # a whole model: its folder, with the base model's own run sizes where it has some (tiny, cpu-agent)
    sizes = LOCAL_RUN_FLAGS.get(args.model_name_or_path, {})
    return ["--model_name_or_path", str(folder), *[f"--{key}={value}" for key, value in sizes.items()]]


def sft_argv(args, paw, run_args, model_args, folder):
    """sft.py's flags: the runs' environment, episodes and model handling, and the user's own."""
    return ["--model_name_or_path", args.model_name_or_path, "--env", paw.env, "--games", paw.games,
            "--game_level", str(paw.game_level), "--max_env_steps", str(paw.max_env_steps),
            "--max_completion_length", str(run_args.max_completion_length), "--env_workers", str(paw.env_workers),
            *(["--task_types", *paw.task_types] if paw.task_types else []),
            *(["--env_options", *paw.env_options] if paw.env_options else []),
            *(["--num_train_games", str(args.sft_games)] if args.sft_games else []),
            "--use_peft", str(model_args.use_peft), "--load_in_4bit", str(model_args.load_in_4bit),
            "--dtype", model_args.dtype, "--output_dir", str(folder), *shlex.split(args.sft_flags)]


def main(argv=None):
    args = parse_args(argv)
    try:
        return study(args, " ".join(["python study.py", *(sys.argv[1:] if argv is None else argv)]))
    except (Refused, ModelMissing, DataMissing) as error:  # nothing of an earlier study was written over
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def study(args, command):
    output = Path(args.output)
    folder, result_file = Path(f"{output}_runs"), output.with_name(output.name + ".json")
    paw, run_args, model_args = quietly(train_paw.parse_args, [  # the runs' plan; bad flags stop here
        "--model_name_or_path", args.model_name_or_path, *game_flags(args), *args.train_flags])
    on_a_card = planned_card(paw.gpu, paw.gpu_memory_gib)[1] is not None
    batch = run_args.per_device_train_batch_size * run_args.steps_per_generation if on_a_card else 64  # on a GPU:
    # what the plan fits in a rollout
    sft_flags = sft_argv(args, paw, run_args, model_args, folder / "warm_start") if args.warm_start == "sft" else None
    sft_args = quietly(sft.parse_args, sft_flags) if sft_flags else None
    start = ("an sft.py warm start" if sft_args else f"the adapter {args.adapter}" if args.adapter else
             "the model as it is")
    settings = json.loads(json.dumps({
        "model": args.model_name_or_path, "warm_start": args.warm_start, "adapter": args.adapter,
        "sft_games": args.sft_games, "sft_flags": args.sft_flags, "modes": {m: MODES[m] for m in args.modes},
        "seeds": args.seeds, "steps": args.steps, "eval_every": args.eval_every, "eval_games": args.eval_games,
        "eval_split": args.eval_split, "eval_samples": args.eval_samples, "game_flags": game_flags(args, True),
        "train_flags": args.train_flags,
        # what the plan made of them on this machine: a study continued elsewhere must train the same runs
        "runs": {"env": paw.env, "games": paw.games, "game_level": paw.game_level,
                 "max_env_steps": paw.max_env_steps, "max_action_tokens": paw.max_action_tokens,
                 "max_completion_length": run_args.max_completion_length,
                 "episodes_per_step": run_args.per_device_train_batch_size * run_args.gradient_accumulation_steps,
                 "num_generations": run_args.num_generations, "learning_rate": run_args.learning_rate,
                 "use_peft": model_args.use_peft, "load_in_4bit": model_args.load_in_4bit}}))
    estimates = [expected_time(args, paw, run_args, model_args, batch, sft_args, end) for end in ENDS]
    print_plan(args, paw, run_args, start, batch, estimates)
    if args.dry_run:
        sys.exit(0)
    state = load_state(folder, result_file, settings)
    chat = ChatFormat(load_tokenizer(args.model_name_or_path))  # a model that is not here stops here
    save = lambda: save_state(folder, state)  # noqa: E731
    if sft_flags:
        if not (folder / STATE).exists():  # a warm start left by a study that never recorded its settings
            shutil.rmtree(folder / "warm_start", ignore_errors=True)
        clock = time.time()
        start_flags = warm_start(args, folder / "warm_start", sft_flags)
        state["wall_s"].setdefault("warm_start", time.time() - clock)
        save()
    else:
        start_flags = ["--model_name_or_path", args.model_name_or_path,
                       *(["--adapter", args.adapter] if args.adapter else [])]
    held = (held_out(args, paw, run_args, batch), held_out(args, paw, run_args, batch, True) if args.eval_samples
            else None)
    workers = EnvWorkers(paw.env_workers, paw.env_timeout)  # forked before any model loads: small
    try:
        reference = play([workers.make(paw.env, game, held[0].env_kwargs) for game in held[0].game_files],
                         expert_policy(chat), chat, paw.max_env_steps)  # the NLL's fixed text

        def evaluate(model):
            return score(model, held, chat, workers, reference)

        if state["start"] is None:  # step 0: the start, loaded as every run loads it
            clock = time.time()
            adapter = start_flags[start_flags.index("--adapter") + 1] if "--adapter" in start_flags else None
            start_model_args = quietly(train_paw.parse_args, [*start_flags, *game_flags(args), *args.train_flags])[2]
            state["start"] = evaluate(load_model(start_model_args, run_args.device, adapter)[0])
            state["wall_s"]["start"] = time.time() - clock
            save()
        print(f"study: start: held-out success {state['start']['success']:.3f}, NLL {state['start']['nll']:.3f}",
              file=sys.stderr)
        for mode in args.modes:
            for seed in args.seeds:
                run(args, state, folder, start_flags, mode, seed, evaluate, save)
    finally:
        workers.close()
    result = result_of(args, state, command)
    result_file.write_text(json.dumps(result, indent=2))
    plot(result, output.with_name(output.name + ".png"))
    print(table(result))
    return result


def run(args, state, folder, start_flags, mode, seed, evaluate, save):
    """One mode and seed: done already, resumed from its newest complete checkpoint, or trained from the start."""
    name = f"{mode}-seed{seed}"
    record = state["runs"].setdefault(name, {"curve": {"step": [0], **{k: [v] for k, v in state["start"].items()}},
                                             "done": False, "wall_s": 0.0})
    if record["done"]:
        return
    save()
    clock = time.time()
    argv = [*start_flags, *game_flags(args), *MODES[mode], "--seed", str(seed), "--max_steps", str(args.steps),
            "--save_steps", str(args.eval_every), "--save_total_limit", "1", "--disable_tqdm", "true",
            "--output_dir", str(folder / name), "--resume_from_checkpoint", "last", *args.train_flags]
    train_paw.main(argv, callbacks=[HeldOutEval(args.eval_every, evaluate, record["curve"], save)])
    gc.collect()  # the run's model and optimizer, before the next loads
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    record["done"], record["wall_s"] = True, record["wall_s"] + time.time() - clock
    save()
    curve = record["curve"]
    print(f"study: {mode} seed {seed}: success {curve['success'][0]:.3f} -> {curve['success'][-1]:.3f}, "
          f"NLL {curve['nll'][0]:.3f} -> {curve['nll'][-1]:.3f} ({record['wall_s']:.0f} s)", file=sys.stderr)


def machine():
    card = planned_card()[0]
    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "gpu": gpu_name(),
            "card": card.name if card else None}


def result_of(args, state, command):
    runs = {mode: {str(seed): state["runs"][f"{mode}-seed{seed}"]["curve"] for seed in args.seeds}
            for mode in args.modes}
    wall = {"runs": {name: record["wall_s"] for name, record in state["runs"].items()}, **state["wall_s"]}
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
            "machine": machine(), "model": args.model_name_or_path, "settings": state["settings"],
            "warm_start": state["start"], "runs": runs, "summary": summarize(runs, args.steps),
            "wall_s": {"total": sum(wall["runs"].values()) + wall.get("warm_start", 0) + wall.get("start", 0),
                       **wall}}


def summarize(runs, steps):
    """Per mode: success, NLL and invalid actions at the start and the end (mean ± std over seeds)."""
    table = {}
    for mode, by_seed in runs.items():
        curves = list(by_seed.values())

        def stat(key, index):
            values = [curve[key][index] for curve in curves]
            return {"mean": statistics.fmean(values), "std": statistics.pstdev(values)}

        table[mode] = {"seeds": len(curves), "steps": steps, "success_start": stat("success", 0),
                       "success_end": stat("success", -1), "nll_start": stat("nll", 0), "nll_end": stat("nll", -1),
                       "invalid_start": stat("invalid_action_rate", 0), "invalid_end": stat("invalid_action_rate", -1)}
        if "sampled_success" in curves[0]:
            table[mode]["sampled_success_end"] = stat("sampled_success", -1)
    return table


PANELS = (("success", "Held-out success\n({games}, greedy)", "success rate"),
          ("invalid_action_rate", "Held-out invalid actions", "share of actions"),
          ("nll", "Next-observation NLL on held-out expert episodes", "nats per observation token"))


def plot(result, output):
    figure, axes = plt.subplots(1, len(PANELS), figsize=(17, 4.5), layout="constrained")
    settings = result["settings"]
    games = f"{settings['eval_games']} {settings['runs']['games']} {settings['eval_split']} games"
    for mode, by_seed in result["runs"].items():
        curves = list(by_seed.values())
        steps = curves[0]["step"]
        for ax, (key, _, _) in zip(axes, PANELS):
            values = [[curve[key][i] for curve in curves] for i in range(len(steps))]
            mean = [statistics.fmean(v) for v in values]
            std = [statistics.pstdev(v) for v in values]
            line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"{mode} ({len(curves)} seeds)")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
            if key == "success" and "sampled_success" in curves[0]:
                sampled = [statistics.fmean(c["sampled_success"][i] for c in curves) for i in range(len(steps))]
                ax.plot(steps, sampled, linestyle="--", color=line.get_color(), label=f"{mode}, sampled")
    for ax, (_, title, ylabel) in zip(axes, PANELS):
        ax.set(title=title.format(games=games), xlabel="RL step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(f"PaW study: {result['model']}, mean ± std over seeds ({result['date'][:10]})")
    figure.savefig(output, dpi=100)
    plt.close(figure)


def table(result):
    lines = ["| mode | seeds | steps | success at start | success at end (mean ± std) | invalid actions start → end | "
             "NLL start → end |", "|---|---|---|---|---|---|---|"]
    for mode, row in result["summary"].items():
        lines.append(f"| {mode} | {row['seeds']} | {row['steps']} | {100 * row['success_start']['mean']:.1f} | "
                     f"{100 * row['success_end']['mean']:.1f} ± {100 * row['success_end']['std']:.1f} | "
                     f"{100 * row['invalid_start']['mean']:.1f} → {100 * row['invalid_end']['mean']:.1f} | "
                     f"{row['nll_start']['mean']:.3f} → {row['nll_end']['mean']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
