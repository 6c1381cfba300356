"""Measure the plan on the card in front of you, in minutes, with no download: memory and time of real PaW steps
against the estimates the plan printed (memory_estimate.py, time_estimate.py).

    python gpu_check.py                           # the shapes that fit this card, in about 15 minutes at most
    python gpu_check.py --minutes 8 --output gpu_check.json

It builds Qwen2.5-0.5B, 1.5B and 7B-Instruct with random weights from their exact configurations (QWEN below),
loads each as train_paw.py does (with LoRA; NF4, or a 16-bit base where the plan picks one; fp16 on cards without
bf16) and runs a few real train_paw.py steps with the plan train_paw.py makes for this card. The environment has
ALFWorld's longest token lengths (a 600-token prompt, 500 tokens fed per turn) and every reply runs to its token cap:
the worst case the estimates assume. No ALFWorld, no Hub. It prints, per shape, the peak memory and the seconds of a
step against their estimates, and whether any NaN or inf appeared in its rollout (logits) or training (logged loss,
gradient norm, ...), and writes a JSON to paste into an issue. Random weights do not overflow float16 as trained ones
can: "none" here does not clear a trained model. The smallest shapes go first, and a shape
runs only if its estimated time fits what is left of --minutes at the time estimate's high end (it says which it
skips). With no GPU it runs the same code at smoke size, which CI does.

Each shape's JSON holds the estimate at both ends, and "measurement": the step as a row of calibration.py, the table
the time estimate is fitted to. `python calibration.py gpu_check.json` prints your rows beside the published ones;
pasting `Measurement(**row)` into calibration.MEASUREMENTS makes tests/test_time_estimate.py check the estimate
against your card too.
"""

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import bitsandbytes
import torch
import transformers

import envs
from envs import Step

# Our timing environment: registered before train_paw.py reads --env (here under __main__ or gpu_check).
SHAPED = "alfworld-shaped"
envs.ENVIRONMENTS[SHAPED] = f"{__name__}:ShapedEnv"

import train_paw  # noqa: E402
from gpu_cards import CARDS, SMOKE_CPU, find_card  # noqa: E402
from memory_estimate import GIB, PRESETS, PROMPT_TOKENS, TURN_TOKENS, load_shape, parameter_counts  # noqa: E402
from plan import HEADROOM, gpu_memory_gib, gpu_name, run_peak, step_settings, step_time  # noqa: E402
from models import load_tokenizer  # noqa: E402
from rollout import ChatFormat, NonFiniteLogits  # noqa: E402
from tiny_model import TINY_SHAPE, cached, tiny_model_path  # noqa: E402

# The configurations of Qwen2.5-0.5B-, 1.5B- and 7B-Instruct, as their config.json files on the Hugging Face Hub
# give them (https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json, and the same for 0.5B and 1.5B);
# memory_estimate.PRESETS holds their shapes (tests/test_gpu_check.py keeps the two in step).
QWEN_COMMON = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                   use_sliding_window=False, bos_token_id=151643, eos_token_id=151645, initializer_range=0.02)
QWEN = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True, max_window_layers=21),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True, max_window_layers=21),
    "Qwen/Qwen2.5-7B-Instruct": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     tie_word_embeddings=False, max_window_layers=28),
}
SMOKE = "tiny"  # with no GPU: the tiny model's shape, and a run of smoke size
SMOKE_FLAGS = ["--num_generations", "4", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
               "--max_env_steps", "3", "--max_action_tokens", "16", "--max_completion_length", "2048"]
CPU = SMOKE_CPU  # with no GPU, the time estimate's "card" (gpu_cards.py)
SETUP_SECONDS_PER_GB = 10  # writing a random checkpoint, then loading and quantising it (our assumption)


# ----------------------------------------------------------------------------------------------------------------
# An environment with ALFWorld's token lengths, no engine
# ----------------------------------------------------------------------------------------------------------------


class ShapedEnv:
    """Every observation and admissible list has the given number of words, every step answers the same, and no
    episode ends before its step or token budget. The words are chosen (by `word_counts`) so that a prompt and a
    turn have ALFWorld's longest token lengths with the model's tokenizer."""

    system_prompt = envs.ALFWORLD_SYSTEM_PROMPT
    task_type = "Pick"
    walkthrough = []
    eval_max_steps, gigpo_std = 50, True
    reset_seconds = step_seconds = 0.0
    logged_options = ()

    @staticmethod
    def games(split, num_games=0, task_types=None, seed=None, **words):
        return envs.sample_games([f"shaped-{split}-{i}" for i in range(64)], num_games, task_types, seed,
                                 lambda game: ShapedEnv.task_type)

    def __init__(self, game, first="1", observation="1", admissible="1"):
        self.game, self.first, self.observation = game, int(first), int(observation)
        self.admissible = ["apple"] * int(admissible)

    def reset(self):
        return Step(" ".join(["apple"] * self.first), self.admissible)

    def step(self, reply):
        return Step(" ".join(["apple"] * self.observation), self.admissible, valid=False)

    def random_reply(self, seed):
        return "<action>apple</action>"

    def close(self):
        pass


def word_counts(chat):
    """--env_options for ShapedEnv that give PROMPT_TOKENS per prompt and TURN_TOKENS per turn (observation 117,
    its admissible list and chat pieces the rest) with this tokenizer."""

    def fewest(tokens, target):  # the fewest words whose text reaches `target` tokens
        words = 1
        while tokens(words) < target:
            words += 1
        return words

    admissible = fewest(lambda n: len(chat.encode(envs.format_admissible(["apple"] * n))),
                        TURN_TOKENS - 117 - len(chat.user_header) - len(chat.assistant_header))
    listed = envs.format_admissible(["apple"] * admissible)
    first = fewest(lambda n: len(chat.encode(chat.prompt(ShapedEnv.system_prompt, " ".join(["apple"] * n) + listed))),
                   PROMPT_TOKENS)
    observation = fewest(lambda n: len(chat.encode(" ".join(["apple"] * n))), 117)
    return [f"first={first}", f"observation={observation}", f"admissible={admissible}"]


# ----------------------------------------------------------------------------------------------------------------
# Random models from configurations, written as train_paw.py loads any local model
# ----------------------------------------------------------------------------------------------------------------


def write_random_model(folder, config, seed=0, shard_bytes=2e9):
    """A checkpoint of `config` with random weights (normal, std 0.02; norms 1, biases 0), written a tensor at a time
    in shards of about `shard_bytes`, so that a 7B model never sits whole in the host's memory (Colab has 12 GB),
    with the tiny model's tokenizer (the tokens are random anyway). On a GPU the numbers are drawn there: faster."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with torch.device("meta"):
        shapes = [(name, p.shape) for name, p in AutoModelForCausalLM.from_config(config).named_parameters()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(seed)
    shards, shard, size, total = {}, {}, 0, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        shards.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, shape in shapes:
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        elif name.endswith("bias"):
            tensor = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            tensor = (0.02 * torch.randn(shape, generator=generator, device=device)).to(torch.bfloat16).cpu()
        shard[name], size, total = tensor, size + tensor.nbytes, total + tensor.nbytes
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": shards}
    Path(folder, "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_path()).save_pretrained(folder)
    return folder


def model_folder(name, cache):
    """The random model `name` (a QWEN key, or SMOKE), built on first use in `cache`."""
    from transformers import AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    values = dict(TINY_SHAPE, vocab_size=len(tokenizer)) if name == SMOKE else {**QWEN_COMMON, **QWEN[name]}
    config = Qwen2Config(**{**values, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id})
    return cached(Path(cache) / name.split("/")[-1], lambda folder: write_random_model(folder, config))


# ----------------------------------------------------------------------------------------------------------------
# One shape: a train_paw.py run, measured, beside the plan's estimates
# ----------------------------------------------------------------------------------------------------------------


def run_argv(folder, options, steps, output_dir, on_gpu):
    """train_paw.py's flags for a measured run; everything else is the plan's (on a GPU) or smoke size."""
    size = [] if on_gpu else SMOKE_FLAGS
    reply = int(size[size.index("--max_action_tokens") + 1]) if size else train_paw.PaWArguments.max_action_tokens
    return ["--model_name_or_path", folder, "--env", SHAPED, "--env_options", *options, "--env_workers", "0",
            "--max_steps", str(steps), "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none",
            "--disable_tqdm", "true", "--output_dir", output_dir, *size,
            # every reply runs to its cap: the end-of-turn token is forbidden until then
            "--generation_kwargs", json.dumps({"min_new_tokens": reply})]


def estimates(argv, card):
    """The plan's settings for the run of `argv`, memory_estimate's peak, and time_estimate's step at its high and
    low ends with the arguments it took (the worst case: every reply at its cap); no time without a card."""
    with contextlib.redirect_stdout(io.StringIO()):  # the run prints the plan; errors and warnings still show
        paw, args, model_args = train_paw.parse_args(argv)
    shape = load_shape(model_args.model_name_or_path)
    times = [step_time(shape, card, paw, args, model_args, end=end) for end in ("high", "low")] if card else [None] * 2
    settings = {key: getattr(args, key) for key in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                    "max_completion_length", "num_generations")}
    settings.update(max_action_tokens=paw.max_action_tokens, max_env_steps=paw.max_env_steps,
                    load_in_4bit=model_args.load_in_4bit, dtype=model_args.dtype, lora_r=model_args.lora_r)
    return settings, run_peak(shape, paw, args, model_args), times, step_settings(paw, args, model_args)


def measure(argv):
    """Run train_paw.py; per step its seconds (TRL's step_time: the rollout and the training passes) and the
    rollout's (with TRL's scoring of it); the peak memory of the run (GPU: the CUDA allocator's; CPU: the process's
    peak resident size, which includes everything Python loaded); and whether a NaN or inf appeared in the rollout's
    logits (which stops the run: no steps then) or in what training logged."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer = train_paw.main(argv)
    except SystemExit as stop:  # train_paw.py printed why; NaN or inf logits are a finding of this check
        if not isinstance(stop.__context__, NonFiniteLogits):
            raise
        return [], {}, {"rollout": True, "training": False}
    logs = [entry for entry in trainer.state.log_history if "step_time" in entry]
    nonfinite = {"rollout": False, "training": any(isinstance(value, float) and not math.isfinite(value)
                                                   for entry in logs for value in entry.values())}
    steps = [{"step_s": e["step_time"], "rollout_s": e["time/rollout_s"],
              "training_s": e["step_time"] - e["time/rollout_s"],
              "generated_tokens_per_s": e["time/generated_tokens_per_s"], "turns": e["episode/length"]} for e in logs]
    if torch.cuda.is_available():
        memory = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
    else:
        memory = {"peak_resident_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return steps, memory, nonfinite


def check(name, card, cache, options, steps, on_gpu):
    """One shape: its run measured, and the estimates of the same run."""
    with tempfile.TemporaryDirectory() as output_dir:
        folder = model_folder(name, cache)
        argv = run_argv(folder, options, steps, output_dir, on_gpu)
        settings, peak, (time_estimate, low), arguments = estimates(argv, card)
        start = time.time()
        measured, memory, nonfinite = measure(argv)
    last = measured[-1] if measured else {}  # the first step also pays for warming up (kernels, allocator)
    estimated, row = {"peak_gib": peak}, {}
    keys = ("step", "rollout", "training", "generated_tokens_per_s", "turns")
    if time_estimate and measured:  # the high end (what the budget plans for), and the low end
        estimated.update({key: time_estimate[key] for key in keys}, low_end={key: low[key] for key in keys})
        # a calibration.py row of this step: Measurement(**row) joins it to the published ones
        key = next((key for key, known in CARDS.items() if known == card), "cpu")
        row = dict(kind="rl_step", card=key, machine="", model=name if name in PRESETS else str(folder),
                   quantization=("nf4-dq" if settings["load_in_4bit"] and arguments["double_quant"] else
                                 "nf4" if settings["load_in_4bit"] else "16bit"),
                   batch=arguments["rollout_episodes"], prompt_tokens=PROMPT_TOKENS,
                   new_tokens=settings["max_action_tokens"], seconds=last["step_s"], lora_r=arguments["lora_r"],
                   software=f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes "
                            f"{bitsandbytes.__version__}, random weights", source=f"gpu_check.py on {gpu_name()}",
                   settings=arguments)
    return {"model": name, "weights": "random", "settings": settings, "steps": measured, "wall_s": time.time() - start,
            "measured": {**memory, **{key: last[key] for key in ("step_s", "rollout_s", "training_s",
                                                                 "generated_tokens_per_s") if key in last}},
            "estimated": estimated, "measurement": row, "nonfinite": nonfinite}


def planned_seconds(name, card, options, steps):
    """What a shape should cost by the estimates, before its model is written: the setup and `steps` steps of the
    plan for this GPU; None where nothing fits its memory by the estimate."""
    _, peak, (time_estimate, _), _ = estimates(run_argv(name, options, steps, "unused", on_gpu=True), card)
    if peak > HEADROOM * gpu_memory_gib():
        return None
    return 2 * sum(parameter_counts(PRESETS[name])[:2]) / 1e9 * SETUP_SECONDS_PER_GB + steps * time_estimate["step"]


def table(result):
    memory = "peak allocated / reserved GiB" if result["gpu"] else "peak resident GiB (process)"
    lines = [f"gpu_check: {result['gpu'] or 'no GPU (smoke size)'} as {result['card'] or 'an unknown card'}, "
             f"{result['date'][:10]}; measured (last step) against the ESTIMATE in brackets",
             f"| model | steps | {memory} | estimated peak GiB | step s | rollout s | training s | "
             "generated tokens/s | NaN or inf: rollout / training |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["shapes"]:
        m, e = row["measured"], row["estimated"]
        peak = (f"{m['peak_allocated_gib']:.1f} / {m['peak_reserved_gib']:.1f}" if "peak_allocated_gib" in m else
                f"{m['peak_resident_gib']:.1f}" if m else "-")

        def pair(key, estimated_key):
            value = f"{m[key]:.1f}" if key in m else "-"  # none where NaN logits stopped the run
            return f"{value} ({e[estimated_key]:.1f})" if estimated_key in e else f"{value} (-)"

        found = " / ".join("yes" if row["nonfinite"][phase] else "none" for phase in ("rollout", "training"))
        lines.append(f"| {row['model']} | {len(row['steps'])} | {peak} | {e['peak_gib']:.1f} | {pair('step_s', 'step')}"
                     f" | {pair('rollout_s', 'rollout')} | {pair('training_s', 'training')} | "
                     f"{pair('generated_tokens_per_s', 'generated_tokens_per_s')} | {found} |")
    lines += [f"skipped {s['model']}: {s['reason']}" for s in result["skipped"]]
    lines.append("NaN or inf: random weights do not overflow float16 as trained ones can, so none here does not clear "
                 "a trained model")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15,
                        help="stop adding shapes once the estimates say this budget would be passed")
    parser.add_argument("--steps", type=int, default=2, help="training steps per shape (1 if 2 do not fit)")
    parser.add_argument("--gpu", help=f"the card, if its name is not recognised: {', '.join(CARDS)}")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "paw" / "gpu-check"),
                        help="where the random models are written (7B: 15 GB; delete it afterwards)")
    parser.add_argument("--output", default="gpu_check.json")
    args = parser.parse_args(argv)
    if args.gpu and not find_card(args.gpu):
        parser.error(f"--gpu {args.gpu}: unknown card; one of {', '.join(CARDS)}")
    if args.minutes <= 0 or args.steps < 1:
        parser.error("--minutes must be > 0 and --steps >= 1")
    on_gpu = torch.cuda.is_available()
    card = find_card(args.gpu or gpu_name()) if on_gpu else CPU
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpu": gpu_name(),
              "card": card.name if card else None, "platform": platform.platform(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "command": " ".join(["python gpu_check.py", *(argv or sys.argv[1:])]),
              "shapes": [], "skipped": []}
    options = word_counts(ChatFormat(load_tokenizer(tiny_model_path())))  # every model has its tokenizer
    start = time.time()
    for name in (QWEN if on_gpu else [SMOKE]):
        left = args.minutes * 60 - (time.time() - start)
        steps = args.steps
        if on_gpu and card:  # an unknown card has no time estimate: every shape runs
            cost = planned_seconds(name, card, options, steps)
            if cost is None:
                result["skipped"].append({"model": name, "reason": "nothing fits this card by the memory estimate"})
                continue
            if cost > left and steps > 1:
                steps, cost = 1, planned_seconds(name, card, options, 1)
            if cost > left:
                result["skipped"].append({"model": name, "reason": f"its estimated {cost / 60:.0f} minutes are more "
                                                                   f"than the {left / 60:.0f} left of --minutes"})
                continue
        print(f"gpu_check: {name}, {steps} step(s)", file=sys.stderr)
        result["shapes"].append(check(name, card, args.cache, options, steps, on_gpu))
    result["wall_s"] = time.time() - start
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"written to {args.output}: paste the table and that file into an issue")
    return result


if __name__ == "__main__":
    main()
