"""Where the time goes, measured side by side in one run on this machine, with the tiny model and with a random
model of a realistic shape (Qwen2-style, 35M parameters, 32k vocabulary).

    python bench.py                  # about 25 minutes on 2 CPU cores; prints markdown tables
    python bench.py --environments   # only official ALFWorld games against generated ones, per level (minutes)
    python bench.py --episode_log    # only tables 5 and 6: the cost of episode records, the viewer's speed

1. rollouts of 16 episodes: batched (one `generate` per turn for all live episodes) against the same 16 one at a
   time; and tokens prefilled per token of the final sequences, with and without KV-cache reuse
2. where a batched rollout's time goes (environment resets and steps, the model), and what an environment costs:
   official ALFWorld games against generated ones
3. training step time on identical rollouts: `--wm paw` against `--wm off` (the WM term reuses the policy forward),
   and `--advantage gigpo` against TRL's GRPO advantage
4. memory_estimate.py's GPU memory estimate for the default 7B run (an estimate: nothing here runs on a GPU)
5. training step time on identical rollouts with and without the step's episodes recorded (episode_log.py), from
   which train_paw.py's default --episode_log_steps is chosen: recording one step in N may cost at most 3% of the time
6. view.py on 1,000 episodes of 50 turns: the page's size, the seconds to write it, and in headless Chromium (if
   installed) the seconds until its list is shown and until an episode is open

Rollouts play generated level-0 games (small rooms, alfworld_gen.py) on the real engine, so that the model's share
shows; official games cost more per reset (table 2).
"""

import argparse
import gzip
import json
import math
import os
import platform
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PrinterCallback, TrainerCallback
from trl import GRPOConfig

import memory_estimate
import view
from alfworld_gen import TASK_TYPES, game_specs, resolve, write_games
from env_workers import EnvWorkers
from envs import alfworld_games, alfworld_task_type, play_walkthrough
from rollout import ChatFormat, ModelPolicy, play
from tiny_model import build_tiny, tiny_model_path
from train_paw import PaWArguments, PaWTrainer, episode_fields, make_invalid_action_penalty, task_reward

REALISTIC_SHAPE = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                       num_key_value_heads=2)
# Training-step timing per model: episodes of the recorded rollout, steps per trainer (the first is dropped: one-off
# costs) and rounds of all modes, interleaved against drift; the spread of the per-round ratios shows what the
# medians can resolve. The 35M rows take most of the script's 25 minutes.
TRAINING = {"tiny": dict(episodes=8, steps=6, rounds=4), "realistic": dict(episodes=4, steps=4, rounds=4)}
TRAIN_MODES = {"off": dict(wm="off"), "paw": dict(wm="paw"), "gigpo": dict(wm="off", advantage="gigpo"),
               "gigpo+paw": dict(wm="paw", advantage="gigpo")}
LOG_MODES = {"paw": dict(wm="paw", episode_log_steps=0),
             "paw, every step recorded": dict(wm="paw", episode_log_steps=1)}
MAX_LOG_SHARE = 0.03  # of step time, averaged over the steps, that episode records may cost


class TimedPolicy:
    """A ModelPolicy whose calls are timed; the rest of a rollout's time is the environments'."""

    def __init__(self, policy):
        self.policy, self.seconds, self.calls, self.first_call = policy, 0.0, 0, None

    def __call__(self, episodes):
        start = time.perf_counter()
        self.first_call = self.first_call or start  # the environments' resets end here
        replies = self.policy(episodes)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.last_logprobs = self.policy.last_logprobs
        return replies


def rollout(model, chat, workers, games, turns, reply_tokens, reuse_cache, batched, seed=0):
    """Play one episode per game; return (episodes, seconds, start time, timed policy)."""
    torch.manual_seed(seed)
    config = GenerationConfig(do_sample=True, max_new_tokens=reply_tokens, eos_token_id=chat.eot_id,
                              pad_token_id=chat.tokenizer.pad_token_id)
    policy = TimedPolicy(ModelPolicy(model, chat, config, reuse_cache))
    start = time.perf_counter()
    envs = [workers.make("alfworld", game) for game in games]
    batches = [envs] if batched else [[env] for env in envs]
    episodes = [e for batch in batches for e in play(batch, policy, chat, turns)]
    return episodes, time.perf_counter() - start, start, policy


class StepTimer(TrainerCallback):
    """Seconds per step, and of each step the seconds spent in the methods it `timed`."""

    def __init__(self):
        self.times, self.inside = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.inside.append(0.0)

    def timed(self, method):
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = method(*args, **kwargs)
            self.inside[-1] += time.perf_counter() - start
            return result

        return call

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def time_games(levels, per_type, seed=0):
    """Official valid_unseen games and generated games of each level, `per_type` per task type, played round robin
    (so that load changes hit every source alike): {source: [(reset s, mean step s, won, receptacles) per game]}."""
    official = alfworld_games("eval_out_of_distribution")
    rng = random.Random(seed)
    sources = {"official valid_unseen": [g for t in TASK_TYPES for g in rng.sample(
        [g for g in official if alfworld_task_type(g) == t], per_type)]}
    with tempfile.TemporaryDirectory() as root:
        for level in levels:
            sources[f"generated, level {level}"] = write_games(root, level=level, count=per_type, seed=seed)
        results = {name: [] for name in sources}
        play_walkthrough(sources[f"generated, level {levels[0]}"][0])  # imports and first-use caches: not a reset cost
        for i in range(len(TASK_TYPES) * per_type):
            for name, games in sources.items():
                reset_time, step_time, steps = play_walkthrough(games[i])
                problem = json.loads(Path(games[i]).read_text())["pddl_problem"]
                receptacles = len(re.findall(r"^\s*\w+_bar_\w+ - receptacle$", problem, re.MULTILINE))
                results[name].append((reset_time, step_time, steps[-1][1].won, receptacles))
    return results


def game_levels(levels, per_type):
    """A markdown table of reset/step times: generated games per level and official valid_unseen games."""
    lines = [f"| games ({per_type} per task type) | receptacles | reset ms (mean / max) | step ms (mean) "
             "| walkthrough wins |", "|---|---|---|---|---|"]
    for name, rows in time_games(levels, per_type).items():
        resets, steps, wins, receptacles = zip(*rows)
        lines.append(f"| {name} | {statistics.mean(receptacles):.1f} | {1000 * statistics.mean(resets):.0f} / "
                     f"{1000 * max(resets):.0f} | {1000 * statistics.mean(steps):.1f} | {sum(wins)}/{len(wins)} |")
    return "\n".join(lines)


def environment_costs():
    """Reset and step milliseconds of official valid_unseen games and generated ones, one game per task type, with
    TextWorld's text templates parsed once per process (envs.py) and, side by side, parsed at every call (TextWorld)."""
    import envs
    from textworld.envs.pddl import textgen

    once = time_games(levels=[0, 5], per_type=1)
    parse_once, patch = textgen._parse_and_convert, envs._parse_templates_once
    textgen._parse_and_convert, envs._parse_templates_once = parse_once.__wrapped__, lambda: None
    try:
        every_call = time_games(levels=[0, 5], per_type=1)
    finally:
        textgen._parse_and_convert, envs._parse_templates_once = parse_once, patch
    rows = []
    for name in once:
        (reset, step), (reset_tw, step_tw) = [[statistics.mean(game[k] for game in run[name]) for k in (0, 1)]
                                              for run in (once, every_call)]
        rows.append(f"| {name} | {1000 * reset:.0f} | {1000 * step:.0f} | {1000 * reset_tw:.0f} | "
                    f"{1000 * step_tw:.0f} | {step_tw / step:.2f} |")
    return rows


def step_times(path, chat, fields, group, flags, steps, out):
    """Seconds per training step of one trainer (flags: PaWArguments' fields) on the same recorded rollouts, and of
    each step the seconds spent in its episode log (episode_log.py: statistics, and records if it keeps them)."""
    timer = StepTimer()
    args = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                      max_steps=steps, logging_strategy="no", num_generations=group,
                      per_device_train_batch_size=len(fields["prompt_ids"]), max_completion_length=100_000,
                      disable_tqdm=True, seed=0)
    trainer = PaWTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        reward_funcs=[task_reward, make_invalid_action_penalty(0.1)], args=args,
        train_dataset=Dataset.from_dict({"prompt": ["game"] * len(fields["prompt_ids"]) * steps}),
        processing_class=chat.tokenizer, rollout_func=lambda prompts, trainer: fields, callbacks=[timer],
        paw=PaWArguments(**flags),
    )
    trainer.remove_callback(PrinterCallback)
    log = trainer.episode_log
    log.rollout, log.micro_batch = timer.timed(log.rollout), timer.timed(log.micro_batch)
    trainer.train()
    return timer.times[1:], timer.inside[1:]  # the first step pays one-off costs


def interleaved_medians(path, chat, fields, group, modes, training, out):
    """Each mode's median step seconds over rounds run in turn (against drift), every round's medians, and each
    mode's median seconds of a step spent in its episode log."""
    rounds, logging = [], {mode: [] for mode in modes}
    for _ in range(training["rounds"]):
        rounds.append({})
        for mode, flags in modes.items():
            times, inside = step_times(path, chat, fields, group, flags, training["steps"], os.path.join(out, mode))
            rounds[-1][mode] = statistics.median(times)
            logging[mode] += inside
    return ({mode: statistics.median(r[mode] for r in rounds) for mode in modes}, rounds,
            {mode: statistics.median(seconds) for mode, seconds in logging.items()})


def episode_log_cost(name, path, chat, episodes, group, out):
    """A row of table 5: training steps with and without recording every step's episodes; the seconds a step spends
    recording, timed inside the step (a difference of medians drowns in the noise of a shared machine); and the
    smallest --episode_log_steps N whose records cost at most MAX_LOG_SHARE of the time (the first step, every N-th)."""
    training = TRAINING[name]
    fields = episode_fields(episodes[:training["episodes"]])
    median, rounds, inside = interleaved_medians(path, chat, fields, min(group, training["episodes"]), LOG_MODES,
                                                 training, os.path.join(out, "episode-log"))
    plain, logged = (median[mode] for mode in LOG_MODES)
    plain_inside, logged_inside = (inside[mode] for mode in LOG_MODES)
    per_round = [r["paw, every step recorded"] / r["paw"] for r in rounds]
    recording = logged_inside - plain_inside  # the statistics, logged every step by both, cancel
    every = max(1, math.ceil(recording / plain / MAX_LOG_SHARE))
    tokens = sum(len(p) + len(c) for p, c in zip(fields["prompt_ids"], fields["completion_ids"]))
    return (f"| {name} | {training['episodes']} | {tokens} | {plain:.3f} | {logged:.3f} | {logged / plain:.3f} "
            f"({min(per_round):.2f}-{max(per_round):.2f}) | {1000 * recording:.0f} ({100 * recording / plain:.1f}%) "
            f"| {every} |")


def synthetic_records(steps, per_step, turns, seed=0):
    """Records in episode_log.py's schema with random values: ALFWorld-sized turns (a 40-token reply, a 30-token
    observation, 20 admissible actions), for timing the viewer."""
    rng = random.Random(seed)
    words = ["go", "to", "the", "cabinet", "1", "you", "see", "a", "mug", "on", "countertop", "open", "take", "from"]

    def tokens(n):
        return [" " + rng.choice(words) for _ in range(n)], [round(-rng.expovariate(1), 5) for _ in range(n)]

    records = {}
    for step in range(1, steps + 1):
        records[step] = []
        for episode in range(per_step):
            turns_ = []
            for _ in range(turns):
                reply, reply_logp = tokens(40)
                obs, obs_logp = tokens(30)
                turns_.append({"admissible": ["go to cabinet %d" % k for k in range(20)], "reply": "".join(reply),
                               "action": "go to cabinet 1", "valid": True, "reward": 0.0, "observation": "".join(obs),
                               "reply_tokens": reply, "reply_logp": reply_logp,
                               "reply_entropy": [-x for x in reply_logp],
                               "entropy": 1.0, "obs_tokens": obs, "obs_logp": obs_logp,
                               "obs_clipped": [x > -0.1 for x in obs_logp], "selected": rng.random() < 0.5,
                               "wm_loss": 0.5, "advantage": 0.1})
            records[step].append({
                "schema": view.SCHEMA_VERSION, "source": "train", "step": step, "episode": episode,
                "group": episode // 8,
                "game": f"game-{episode % 40}", "task_type": rng.choice(list(TASK_TYPES)), "won": rng.random() < 0.3,
                "task_return": 0.0, "steps": turns, "invalid_actions": 0, "truncated": False, "error": None,
                "first_observation": "You are in the middle of a room.", "turns": turns_, "reward": 0.0,
                "advantage": 0.1, "group_return": 0.3, "lambda": 0.7, "micro_batch": 0})
    return records


def viewer_speed(out, steps=10, per_step=100, turns=50):
    """Table 6: view.py on steps x per_step episodes of `turns` turns, and (with Chromium) the page opened."""
    run = Path(out) / "viewer-run"
    for step, records in synthetic_records(steps, per_step, turns).items():
        (run / "episodes").mkdir(parents=True, exist_ok=True)
        with gzip.open(run / "episodes" / f"step-{step:06d}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    start = time.perf_counter()
    page = view.main([str(run)])
    written = time.perf_counter() - start
    row = f"| {steps * per_step} x {turns} | {page.stat().st_size / 2**20:.1f} | {written:.1f} |"
    try:
        browser = view.headless_chromium()
    except Exception as error:  # Selenium or Chromium missing: the page's numbers alone
        return row + f" not measured ({error}) | |"
    try:
        start = time.perf_counter()
        browser.get(page.resolve().as_uri())
        browser.execute_script("document.querySelector('nav button[data-view=episodes]').click()")
        opened = time.perf_counter() - start  # get() returns once the page's scripts have run
        start = time.perf_counter()
        browser.execute_script("document.querySelector('#rows tr.ep').click()")
        while len(browser.find_elements("css selector", "#episode .turn")) < turns:
            time.sleep(0.01)
        episode = time.perf_counter() - start
    finally:
        browser.quit()
    return row + f" {opened:.1f} | {episode:.2f} |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=6, help="actions per episode in the rollouts")
    parser.add_argument("--reply_tokens", type=int, default=32, help="tokens per reply (the random model rarely stops)")
    parser.add_argument("--environments", action="store_true",
                        help="only time official ALFWorld games against generated ones of --levels")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 2, 5], help="--environments: levels to time")
    parser.add_argument("--per_type", type=int, default=3, help="--environments: games per task type and source")
    parser.add_argument("--episode_log", action="store_true",
                        help="only the cost of episode records (table 5) and the viewer's speed (table 6)")
    args = parser.parse_args()
    if args.environments:
        print(game_levels(args.levels, args.per_type))
        return
    torch.set_num_threads(1)
    workers = EnvWorkers(2)  # forked before any model exists
    out = tempfile.mkdtemp()
    models = {"tiny": tiny_model_path(),
              "realistic": build_tiny(os.path.join(out, "realistic"), shape=REALISTIC_SHAPE, vocab_size=32768)}
    chat = ChatFormat(AutoTokenizer.from_pretrained(models["tiny"]))
    games = [resolve(spec, 0) for spec in game_specs("train", 4)] * 4  # 4 games x 4 episodes
    group = 4

    rows, split, train, logging = [], [], [], []
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        if args.episode_log:
            episodes = rollout(model, chat, workers, games, args.turns, args.reply_tokens, True, True)[0]
            logging.append(episode_log_cost(name, path, chat, episodes, group, out))
            continue
        runs = {}
        for label, reuse, batched in [("batched, cache reuse", True, True), ("batched, no reuse", False, True),
                                      ("one at a time, cache reuse", True, False)]:
            runs[label] = rollout(model, chat, workers, games, args.turns, args.reply_tokens, reuse, batched)
        episodes, seconds, start, policy = runs["batched, cache reuse"]
        final = sum(len(e.context_ids) for e in episodes)
        for label, (_, run_seconds, _, run_policy) in runs.items():
            rows.append(f"| {name} ({params:.1f}M) | {label} | {run_seconds:.1f} | "
                        f"{seconds and run_seconds / seconds:.2f} | {run_policy.policy.prefilled / final:.2f} |")
        resets = policy.first_call - start
        split.append(f"| {name} | {seconds:.1f} | {resets:.1f} | {policy.seconds:.1f} | "
                     f"{seconds - resets - policy.seconds:.1f} | {1000 * policy.seconds / policy.calls:.0f} |")

        training = TRAINING[name]
        fields = episode_fields(episodes[:training["episodes"]])  # the same episodes for both modes
        median, rounds, _ = interleaved_medians(path, chat, fields, min(group, training["episodes"]), TRAIN_MODES,
                                                training, out)

        def ratio(mode, base):
            per_round = [r[mode] / r[base] for r in rounds]
            return f"{median[mode] / median[base]:.3f} ({min(per_round):.2f}-{max(per_round):.2f})"

        tokens = sum(len(p) + len(c) for p, c in zip(fields["prompt_ids"], fields["completion_ids"]))
        train.append(f"| {name} | {training['episodes']} | {tokens} | "
                     + " | ".join(f"{median[mode]:.3f}" for mode in TRAIN_MODES)
                     + f" | {ratio('paw', 'off')} | {ratio('gigpo', 'off')} | {ratio('gigpo+paw', 'gigpo')} | "
                     f"{len(rounds) * (training['steps'] - 1)} |")
        logging.append(episode_log_cost(name, path, chat, episodes, group, out))
    workers.close()
    viewer = viewer_speed(out)
    if args.episode_log:
        print_episode_log(logging, viewer)
        return
    costs = environment_costs()

    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, 1 thread, 2 environment workers; {len(games)} episodes of up to {args.turns} "
          f"actions on generated level-0 games, {args.reply_tokens}-token replies\n")
    print("1. rollouts (time relative to batched with cache reuse; prefill = tokens run through the model before "
          "generating / tokens in the final sequences)\n")
    print("| model | rollout | seconds | x batched | prefill / final |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n2. where a batched rollout's time goes (environments in 2 worker processes; the random models' replies "
          "are nearly all unparseable, which an environment answers without its engine: real step costs below)\n")
    print("| model | rollout s | env resets s | model s | env steps + loop s | model ms per turn |")
    print("|---|---|---|---|---|---|")
    print("\n".join(split))
    print("\n| environment (one game per task type) | reset ms | step ms | reset ms, templates parsed at every call "
          "(TextWorld) | step ms, same | step x |\n|---|---|---|---|---|---|")
    print("\n".join(costs))
    print("\n3. training step on identical rollouts, median seconds; ratios of medians (range of the per-round "
          "ratios)\n")
    print("| model | episodes | tokens | " + " | ".join(TRAIN_MODES) + " | paw / off | gigpo / off | "
          "gigpo+paw / gigpo | steps per mode |\n|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(train))
    print("\n4. GPU memory of train_paw.py's defaults (Qwen2.5-7B-Instruct, NF4, LoRA r=16)\n")
    memory_estimate.main([])
    print_episode_log(logging, viewer)


def print_episode_log(logging, viewer):
    print(f"\n5. episode records (episode_log.py): training step on identical rollouts, median seconds, without and "
          "with every step recorded; milliseconds a step spends recording (timed inside it; share of the step "
          f"without); the smallest --episode_log_steps N at which they cost <= {MAX_LOG_SHARE:.0%} of the training "
          "time (a real step also plays its episodes, so their share of it is smaller)\n")
    print("| model | episodes | tokens | paw | paw, every step recorded | ratio (range over rounds) | ms recording a "
          "step | N for <= 3% |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(logging))
    print("\n6. view.py on synthetic records (10 logged steps of 100 episodes): the page, and in headless Chromium the "
          "seconds from opening the file to the list shown, then to an episode's 50 turns shown\n")
    print("| episodes x turns | page MiB | seconds to write | seconds to open | seconds to open an episode |")
    print("|---|---|---|---|---|")
    print(viewer)


if __name__ == "__main__":
    main()
