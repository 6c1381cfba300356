"""The run fitted to the machine, decided before anything loads: on a GPU, the token cap and micro-batch whose
estimated peak memory (memory_estimate.py) stays under the card; with no GPU, the CPU agent.

    python train_paw.py --dry_run                        # this machine's plan, printed before it exits
    python train_paw.py --gpu_memory_gib 15 --dry_run    # the plan for a card you do not have (a T4: 15 GiB)

Every flag you pass (on the command line or in --config) wins over the plan. If your own flags do not fit, the plan
says so, with the estimate, before the model loads. The numbers are ESTIMATES (memory_estimate.py), not measurements.
"""

import os
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig

from memory_estimate import GIB, PROMPT_TOKENS, Shape, estimate, load_shape

HEADROOM = 0.9  # plan to 90% of the card: the estimate's fixed 1 GiB does not cover every allocator's slack
EPISODE_CAPS = (6144, 4096, 3072, 2048)  # --max_completion_length, longest first: a cut episode loses its ending
MICRO_BATCHES = (16, 8, 4, 2, 1)  # largest first: fewer, fuller forward passes train faster
EVAL_BATCHES = (64, 32, 16, 8, 4, 2, 1)  # eval.py: episodes decoded together
# The flags that fix how the episodes of a step are batched: if the user sets one, the plan keeps the layout.
LAYOUT_FLAGS = {"per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                "generation_batch_size"}


def gpu_memory_gib():
    """GPU 0's memory in GiB, or None with no GPU."""
    return torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else None


def launched_processes():
    """How many processes torchrun or accelerate launch started (they set WORLD_SIZE); 1 for a plain run."""
    return int(os.environ.get("WORLD_SIZE", 1))


def flags_given(argv):
    """The flags the user set, on the command line or in --config's YAML: the plan leaves them alone."""
    given = {arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    if "--config" in argv[:-1]:
        given |= set(yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text()) or {})
    return given


def model_shape(name):
    """The sizes memory depends on: a preset, a local folder, or a config from the Hub or its cache. None if none is
    reachable or the architecture is not Llama/Qwen-like: the run then goes on without a memory plan."""
    try:
        return load_shape(name)
    except ValueError:
        try:
            return Shape.from_config(AutoConfig.from_pretrained(name))
        except (OSError, ValueError):
            return None


def train_peak(shape, model_args, micro_batch, rollout_episodes, episode_cap, max_action_tokens, reuse_cache):
    """memory_estimate's peak, in GiB, of a train_paw.py run with these settings."""
    e = estimate(shape, quantization="nf4" if model_args.load_in_4bit else "bf16",
                 lora_r=model_args.lora_r if model_args.use_peft else None,
                 double_quant=model_args.use_bnb_nested_quant, rollout_episodes=rollout_episodes,
                 episode_tokens=PROMPT_TOKENS + episode_cap + max_action_tokens, micro_batch=micro_batch,
                 train_tokens=PROMPT_TOKENS + episode_cap, reuse_cache=reuse_cache)
    return e["peak"] / GIB


def run_peak(shape, paw, args, model_args):
    """The estimated peak (GiB) of the run exactly as parsed."""
    return train_peak(shape, model_args, args.per_device_train_batch_size,
                      args.per_device_train_batch_size * args.steps_per_generation, args.max_completion_length,
                      paw.max_action_tokens, paw.reuse_cache)


def fit_run(shape, paw, args, model_args, budget_gib, given=frozenset()):
    """The flags (among the episode cap and the micro-batch / accumulation split) that the user did not set, chosen
    so that the estimated peak stays under `budget_gib`: the longest episode cap first, then the largest micro-batch.
    The episodes per step stay as they are. None if nothing fits."""
    episodes = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if given & LAYOUT_FLAGS:
        layouts = [(args.per_device_train_batch_size, args.gradient_accumulation_steps, args.steps_per_generation)]
    else:
        layouts = [(b, episodes // b, episodes // b) for b in MICRO_BATCHES if episodes % b == 0]
    caps = [args.max_completion_length] if "max_completion_length" in given else [
        cap for cap in EPISODE_CAPS if cap >= paw.max_action_tokens]
    for cap in caps:
        for micro_batch, accumulation, generation_steps in layouts:
            peak = train_peak(shape, model_args, micro_batch, micro_batch * generation_steps, cap,
                              paw.max_action_tokens, paw.reuse_cache)
            if peak <= budget_gib:
                fitted = dict(max_completion_length=cap, per_device_train_batch_size=micro_batch,
                              gradient_accumulation_steps=accumulation)
                return {key: value for key, value in fitted.items() if key not in given}
    return None


def after_out_of_memory(shape, paw, args, model_args, card_gib):
    """Flags for a retry after the GPU ran out of memory: the plan for 85% of what the failed run was estimated to
    need (the estimate fell short, so aim lower); with no estimate, half the micro-batch or half the episode cap.
    None if nothing fits the card."""
    if shape is not None:
        budget = 0.85 * min(run_peak(shape, paw, args, model_args), HEADROOM * card_gib)
        return fit_run(shape, paw, args, model_args, budget)
    micro_batch, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    if micro_batch % 2 == 0:
        return dict(per_device_train_batch_size=micro_batch // 2, gradient_accumulation_steps=2 * accumulation)
    return dict(max_completion_length=max(paw.max_action_tokens, args.max_completion_length // 2))


def as_flags(flags):
    return " ".join(f"--{key} {value}" for key, value in flags.items())


def describe(paw, args, model_args, card_gib=None, peak_gib=None, planned=None):
    """The plan, in a few lines."""
    if model_args.use_peft or paw.adapter:
        tuning = f"LoRA r={model_args.lora_r}" if not paw.adapter else f"LoRA adapter {paw.adapter}"
    else:
        tuning = "full fine-tuning"
    quantization = "NF4 + " if model_args.load_in_4bit else ""
    world = launched_processes()
    episodes = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    games = episodes // args.num_generations
    lines = [
        f"  model     {model_args.model_name_or_path}: {quantization}{tuning}",
        f"  per step  {episodes} episodes ({games} game{'s' * (games != 1)} x {args.num_generations})"
        + (f" over {world} processes" if world > 1 else "")
        + f", micro-batch {args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}",
        f"  caps      {args.max_completion_length} tokens per episode, {paw.max_action_tokens} per reply, "
        f"{paw.max_env_steps} actions",
    ]
    if peak_gib is not None:
        lines.append(f"  memory    estimated peak {peak_gib:.1f} GiB of the card's {card_gib:.1f} GiB "
                     "(memory_estimate.py: an estimate, not a measurement"
                     + ("" if args.gradient_checkpointing else "; it assumes gradient checkpointing") + ")")
    if planned:
        lines.append(f"  planned   {as_flags(planned)} (flags you pass win)")
    return "\n".join(lines)


def fit_eval_batch(shape, quantization, episode_tokens, reuse_cache, budget_gib):
    """eval.py: the most episodes that decode together under `budget_gib`, by the estimate (weights + the rollout
    phase; there is no training state). None if not even one fits."""
    for batch in EVAL_BATCHES:
        # estimate() wants LoRA with NF4 (it sizes training); an adapter's rank changes neither term used here
        e = estimate(shape, quantization=quantization, lora_r=16 if quantization == "nf4" else None,
                     rollout_episodes=batch, episode_tokens=episode_tokens, reuse_cache=reuse_cache)
        if (e["weights"] + e["cuda_overhead"] + e["rollout"]) / GIB <= budget_gib:
            return batch
    return None
