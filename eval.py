"""Evaluate an agent with the same episode loop as training, and write results nobody can misread.

    python eval.py --env alfworld --split eval_out_of_distribution --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --load_in_4bit --adapter runs/paw
    python eval.py --env alfworld --split eval_out_of_distribution --policy expert   # replays walkthroughs: 100%
    python eval.py --env alfworld --split eval_out_of_distribution --policy random   # the floor

Writes OUT.json (the summary), OUT.jsonl (every trajectory) and prints a markdown table whose caption names the
split. `--wm_eval` adds how well the model predicts each next observation (PaW's world model); `--episode_details` and
`--imagine` add per-token values and the model's own predicted observations to every trajectory (view.py draws them).
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig
from trl import ModelConfig

from alfworld_gen import LEVELS
from env_workers import EnvWorkers
from envs import ALFWORLD_SPLITS, ENVIRONMENTS, DataMissing, env_class, env_options, list_games
from episode_log import SCHEMA_VERSION, add_token_values, imagine
from memory_estimate import PROMPT_TOKENS
from models import ModelMissing, hardware_dtype, load_model
from plan import HEADROOM, fit_eval_batch, gpu_memory_gib, planned_shape
from rollout import ChatFormat, ModelPolicy, NonFiniteLogits, episode_record, expert_policy, play, random_policy
from tiny_model import tiny_model_path

SPLITS = list(ALFWORLD_SPLITS)  # every environment names its splits train / eval_in_distribution / ..._out_of_...


def boolean(text):
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="alfworld", choices=list(ENVIRONMENTS))
    parser.add_argument("--split", default="eval_out_of_distribution", choices=SPLITS,
                        help="ALFWorld: eval_in_distribution = valid_seen, eval_out_of_distribution = valid_unseen")
    parser.add_argument("--games", default="official", choices=["official", "generated"],
                        help="ALFWorld: the official game files, or games generated offline (see alfworld_gen.py)")
    parser.add_argument("--game_level", type=int, default=0, help="generated games: room size, 0 to 5")
    parser.add_argument("--policy", default="model", choices=["model", "expert", "random"],
                        help="expert replays each game's stored walkthrough; random picks an admissible action")
    parser.add_argument("--model_name_or_path", help="a Hub id or folder, or `tiny` (required for --policy model)")
    parser.add_argument("--adapter", help="folder of a LoRA adapter trained by train_paw.py")
    parser.add_argument("--load_in_4bit", action="store_true", help="load the base model in NF4")
    parser.add_argument("--dtype", default=hardware_dtype(), choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--num_runs", type=int, default=1, help="repeats with seeds seed, seed+1, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_games", type=int, help="evaluate a fixed seeded sample of this many games")
    parser.add_argument("--batch_size", type=int,
                        help="games played at once (one generate per turn); default: on a GPU, as many as its memory "
                             "holds by memory_estimate.py, else 16")
    parser.add_argument("--gpu_memory_gib", type=float,
                        help="size the default --batch_size for a GPU of this many GiB instead of the one found")
    parser.add_argument("--max_env_steps", type=int,
                        help="actions per episode; default as in the literature: ALFWorld 50, WebShop 15, search "
                             "50 (its own max_turns=, 4 by default, ends episodes first)")
    parser.add_argument("--max_action_tokens", type=int, default=256)
    parser.add_argument("--max_completion_length", type=int, default=16384,
                        help="token cap of a whole episode for --policy model (expert and random have none)")
    parser.add_argument("--max_observation_tokens", type=int, default=512,
                        help="each observation is cut to this many tokens, as in training")
    parser.add_argument("--show_admissible", type=boolean, default=True)
    parser.add_argument("--reuse_cache", type=boolean, default=True,
                        help="keep each episode's KV cache between turns instead of re-reading its history")
    parser.add_argument("--env_options", nargs="*", default=[], help="the environment's key=value settings")
    parser.add_argument("--env_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that run environment resets and steps in parallel (0: none)")
    parser.add_argument("--env_timeout", type=float, default=120,
                        help="seconds an environment call may take: one that hangs ends its episode as an "
                             "environment error and its worker process is replaced (needs --env_workers >= 1)")
    parser.add_argument("--wm_eval", action="store_true",
                        help="also report next-observation NLL per token and top-1 accuracy")
    parser.add_argument("--episode_details", action="store_true",
                        help="record each reply token's log-prob and entropy and each observation token's log-prob in "
                             "OUTPUT.jsonl (one scoring forward per episode; python view.py OUTPUT.jsonl)")
    parser.add_argument("--imagine", action="store_true",
                        help="after each action, the model's greedy prediction of the next observation beside the real "
                             "one, with their token overlap (F1), per turn in OUTPUT.jsonl and averaged in OUTPUT.json")
    parser.add_argument("--output", default="eval_results/result", help="writes OUTPUT.json and OUTPUT.jsonl")
    args = parser.parse_args(argv)
    if args.max_env_steps is None:
        args.max_env_steps = env_class(args.env).eval_max_steps

    if args.policy == "model" and not args.model_name_or_path:
        parser.error("--policy model needs --model_name_or_path")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        parser.error(f"--adapter {args.adapter}: no adapter_config.json there (is it the run's --output_dir?)")
    for name in ("wm_eval", "episode_details", "imagine"):
        if getattr(args, name) and args.policy != "model":
            parser.error(f"--{name} measures a model: it needs --policy model")
    for name in ("num_runs", "batch_size", "max_env_steps", "max_action_tokens", "max_observation_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.env_workers < 0:
        parser.error("--env_workers must be >= 0")
    if args.env_timeout <= 0:
        parser.error("--env_timeout must be > 0")
    if args.num_games is not None and args.num_games < 1:
        parser.error("--num_games must be >= 1 (leave it out to evaluate every game of the split)")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.games == "generated" and args.env != "alfworld":
        parser.error("--games generated is for --env alfworld")
    if not 0 <= args.game_level < len(LEVELS):
        parser.error(f"--game_level must be from 0 to {len(LEVELS) - 1}")
    if args.gpu_memory_gib is not None and args.gpu_memory_gib <= 0:
        parser.error("--gpu_memory_gib must be > 0")
    if args.batch_size is None:
        args.batch_size = fitted_batch_size(args)
        if args.batch_size is None:
            parser.error(f"{args.model_name_or_path} does not fit a {card_gib(args):.1f} GiB GPU even one episode at "
                         "a time by memory_estimate.py: add --load_in_4bit or lower --max_completion_length")
    try:
        args.env_kwargs = env_options(args.env_options, args.games, args.game_level)
        args.game_files = list_games(args.env, args.split, args.num_games or 0, seed=0 if args.num_games else None,
                                     options=args.env_kwargs)
    except (DataMissing, ValueError) as error:
        parser.error(str(error))
    return args


def card_gib(args):
    return args.gpu_memory_gib or gpu_memory_gib()


def fitted_batch_size(args):
    """The games played at once: on a GPU, the most whose estimated peak stays under the card (plan.py), else 16."""
    shape = planned_shape(args.model_name_or_path, card_gib(args)) if args.policy == "model" else None
    if shape is None:
        return 16
    episode_tokens = PROMPT_TOKENS + args.max_completion_length + args.max_action_tokens
    batch = fit_eval_batch(shape, "nf4" if args.load_in_4bit else "bf16", episode_tokens, args.reuse_cache,
                           HEADROOM * card_gib(args))
    if batch:
        print(f"--batch_size {batch}: the most episodes of {episode_tokens} tokens that fit {HEADROOM:.0%} of the "
              f"{card_gib(args):.1f} GiB GPU by memory_estimate.py (an estimate)")
    return batch


def load(args):
    """The chat format, and the model (None for expert and random, which use the tiny tokenizer's format)."""
    if args.policy != "model":
        return ChatFormat(AutoTokenizer.from_pretrained(tiny_model_path())), None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_args = ModelConfig(model_name_or_path=args.model_name_or_path, dtype=args.dtype,
                             load_in_4bit=args.load_in_4bit, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
    model, tokenizer = load_model(model_args, device, args.adapter)
    return ChatFormat(tokenizer), model.eval()


def make_policy(args, chat, model, seed):
    if args.policy == "expert":
        return expert_policy(chat)
    if args.policy == "random":
        return random_policy(chat, seed)
    config = GenerationConfig(
        max_new_tokens=args.max_action_tokens, do_sample=args.temperature > 0, use_cache=True,
        temperature=args.temperature or None, top_p=args.top_p if args.temperature > 0 else None,
        pad_token_id=chat.tokenizer.pad_token_id, eos_token_id=model.generation_config.eos_token_id,
    )
    return ModelPolicy(model, chat, config, args.reuse_cache)


def run_episodes(args, chat, model, workers, seed, progress):
    torch.manual_seed(seed)
    policy = make_policy(args, chat, model, seed)
    max_tokens = args.max_completion_length if args.policy == "model" else None
    episodes = []
    for start in range(0, len(args.game_files), args.batch_size):
        games = args.game_files[start:start + args.batch_size]
        envs = [workers.make(args.env, game, args.env_kwargs) for game in games]
        episodes += play(envs, policy, chat, args.max_env_steps, max_tokens, args.show_admissible,
                         args.max_observation_tokens)
        progress.update(len(envs))
    return episodes


@torch.no_grad()
def wm_diagnostic(model, episodes):
    """Next-observation prediction quality: mean NLL per observation token and top-1 accuracy (temperature 1).

    Only the logits at observation positions are computed (`logits_to_keep`), never the whole (L, vocab) matrix.
    """
    nll, correct, count = 0.0, 0, 0
    for e in episodes:
        positions = [len(e.prompt_ids) + j for j, t in enumerate(e.obs_index) if t >= 0]
        if not positions:
            continue
        ids = torch.tensor([e.context_ids], device=model.device)
        keep = torch.tensor(positions, device=model.device) - 1  # the logits at i predict token i + 1
        logp = torch.log_softmax(model(input_ids=ids, logits_to_keep=keep).logits[0].float(), dim=-1)
        targets = ids[0, positions]
        nll -= logp.gather(1, targets.unsqueeze(1)).sum().item()
        correct += (logp.argmax(-1) == targets).sum().item()
        count += len(positions)
    return {"nll_per_token": nll / max(count, 1), "top1_accuracy": correct / max(count, 1), "tokens": count}


def mean_std(values):
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "runs": values}


def summarize(args, runs, seeds):
    """runs: one list of episodes per seed, in the order of args.game_files."""
    def rate(episodes, key):
        return sum(key(e) for e in episodes) / max(len(episodes), 1)

    types = sorted({e.env.task_type for e in runs[0]})
    steps = [sum(len(e.turns) for e in eps) for eps in runs]
    return {
        "env": args.env, "split": args.split, "split_folder": split_folder(args), "num_games": len(args.game_files),
        "games": args.games if args.games == "official" else f"generated, level {args.game_level}",
        "policy": args.policy, "model": args.model_name_or_path,
        "adapter": args.adapter, "temperature": args.temperature, "max_env_steps": args.max_env_steps,
        "seeds": seeds,
        "success_rate": mean_std([rate(eps, lambda e: e.won) for eps in runs]),
        "score": mean_std([100 * rate(eps, lambda e: e.task_return) for eps in runs]),
        "avg_steps": mean_std([rate(eps, lambda e: len(e.turns)) for eps in runs]),
        "invalid_action_rate": mean_std([sum(e.invalid_actions for e in eps) / max(n, 1)
                                         for eps, n in zip(runs, steps)]),
        "env_errors": sum(e.error is not None for eps in runs for e in eps),
        "per_task_type": {
            t: {"games": sum(e.env.task_type == t for e in runs[0]),
                "success_rate": mean_std([rate([e for e in eps if e.env.task_type == t], lambda e: e.won)
                                          for eps in runs])}
            for t in types
        },
    }


def split_folder(args):
    """What the split is on disk, for tables that must not mix splits up."""
    if args.games == "generated":
        return f"generated level {args.game_level}, seeds of {args.split}"
    return ALFWORLD_SPLITS[args.split] if args.env == "alfworld" else args.split


def trajectory(e, run, seed):
    return {"schema": SCHEMA_VERSION, "source": "eval", "run": run, "seed": seed, **episode_record(e)}


def markdown(summary):
    def pct(stat):
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"

    folder = f" ({summary['split_folder']})" if summary["split_folder"] != summary["split"] else ""
    who = summary["model"] or summary["policy"]
    lines = [
        f"**{summary['env']} {summary['split']}{folder}**, {summary['num_games']} games, policy {summary['policy']}"
        f" ({who}{', adapter ' + summary['adapter'] if summary['adapter'] else ''}), "
        f"{len(summary['seeds'])} run(s), success % (mean ± std over runs)", "",
        "| task type | games | success % |", "|---|---|---|",
    ]
    lines += [f"| {t} | {v['games']} | {pct(v['success_rate'])} |" for t, v in summary["per_task_type"].items()]
    lines += [f"| **all** | {summary['num_games']} | {pct(summary['success_rate'])} |", "",
              f"score {summary['score']['mean']:.1f}, average steps {summary['avg_steps']['mean']:.1f}, "
              f"invalid actions {pct(summary['invalid_action_rate'])} %, environment errors {summary['env_errors']}"]
    if "wm_eval" in summary:
        wm = summary["wm_eval"]
        lines.append(f"world model: next-observation NLL {wm['nll_per_token']:.3f} nats/token, top-1 accuracy "
                     f"{100 * wm['top1_accuracy']:.1f} % over {wm['tokens']} tokens")
    if "imagine" in summary:
        lines.append(f"imagined observations: token overlap {summary['imagine']['overlap']:.3f} (F1), exact "
                     f"{100 * summary['imagine']['exact']:.1f} % of {summary['imagine']['turns']} turns")
    return "\n".join(lines)


def play_and_summarize(args, chat, model, workers):
    """Play every game of args.game_files once per seed; the summary and the episodes (one list per seed)."""
    seeds = [args.seed + k for k in range(args.num_runs)]
    with tqdm(total=len(args.game_files) * len(seeds), desc="games", unit="game") as progress:
        runs = [run_episodes(args, chat, model, workers, seed, progress) for seed in seeds]
    summary = summarize(args, runs, seeds)
    if args.wm_eval:
        summary["wm_eval"] = wm_diagnostic(model, [e for eps in runs for e in eps])
    if args.episode_details:
        add_token_values(model, chat.tokenizer, [e for eps in runs for e in eps])
    if args.imagine:
        turns = imagine(model, chat, [e for eps in runs for e in eps], args.max_observation_tokens, args.batch_size)
        summary["imagine"] = {"overlap": statistics.fmean(o for o, _ in turns) if turns else 0.0,
                              "exact": sum(exact for _, exact in turns) / max(len(turns), 1), "turns": len(turns)}
    return summary, runs


def nonfinite_message(error, args):
    """What to do when the model's logits held NaN or inf: greedy decoding would have made replies of them."""
    if args.dtype != "float16":
        cause = (f"the model computes in {args.dtype}, where an overflow is unlikely: its weights hold NaN or inf "
                 "(a diverged training run?)")
    elif torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        cause = "likely cause: float16 overflowed (it tops out at 65504); --dtype bfloat16 avoids it at the same speed"
    else:
        cause = ("likely cause: float16 overflowed (it tops out at 65504; Qwen2-family models were trained in "
                 "bfloat16), on a GPU without bfloat16 such as a T4. --dtype float32 avoids it: a T4 multiplies "
                 "float32 at 8.1 TFLOPS against 65 in float16 (NVIDIA's figures), and its activations and KV cache "
                 "take twice the memory (halve --batch_size if it runs out)")
    return f"{error}. Replies decoded from them would be noise: nothing was scored or written.\n  {cause}."


def evaluate(args):
    workers = EnvWorkers(args.env_workers, args.env_timeout)  # forked before the model loads: small
    try:
        chat, model = load(args)
        summary, runs = play_and_summarize(args, chat, model, workers)
    except ModelMissing as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError:
        print(f"error: the GPU ran out of memory playing {args.batch_size} games at once: try --batch_size "
              f"{max(1, args.batch_size // 2)} (or a shorter --max_completion_length)", file=sys.stderr)
        sys.exit(1)
    except NonFiniteLogits as error:
        print(f"error: {nonfinite_message(error, args)}", file=sys.stderr)
        sys.exit(1)
    finally:
        workers.close()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_name(output.name + ".json").write_text(json.dumps(summary, indent=2))
    with open(output.with_name(output.name + ".jsonl"), "w") as f:
        for run, (seed, episodes) in enumerate(zip(summary["seeds"], runs)):
            for e in episodes:
                f.write(json.dumps(trajectory(e, run, seed)) + "\n")
    print(markdown(summary))
    return summary


def main(argv=None):
    return evaluate(parse_args(argv))


if __name__ == "__main__":
    main()
