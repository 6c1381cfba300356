"""The run fitted to the machine, decided before anything loads: on a GPU, the token cap and micro-batch whose
estimated peak memory (memory_estimate.py) stays under the card, and how long it should take (time_estimate.py: a
low-high range); with no GPU, the CPU agent.

    python train_paw.py --dry_run                 # this machine's plan, printed before it exits
    python train_paw.py --gpu t4 --dry_run        # the plan for a card you do not have (gpu_cards.py)

Every flag you pass (on the command line or in --config) wins over the plan. If your own flags do not fit, the plan
says so, with the estimate, before the model loads; so does a run that would take more than two 12-hour sessions.
The numbers are ESTIMATES (memory_estimate.py, time_estimate.py), not measurements; the two-session warning and its
suggestions use the time's high end. When a run stops (out of memory, NaN or inf logits, another process that
stopped answering), the message comes from here.
"""

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig

from envs import env_class
from gpu_cards import CARDS, FP32_TFLOPS, find_card
from long_runs import apply_ddp_timeout, last_complete_checkpoint, lost_peer, lost_peer_message
from memory_estimate import GIB, PRESETS, PROMPT_TOKENS, TURN_TOKENS, Shape, estimate, load_shape, parameter_counts
from time_estimate import (ENDS, HOURS_PER_SESSION, TYPICAL_REPLY_TOKENS, TYPICAL_TURN_TOKENS, estimate_time)
from models import AGENT_NAME, LOCAL_MODELS
from rollout import NonFiniteLogits

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


def planned_card(gpu=None, memory_gib=None):
    """(card, GiB, name) the plan is for. `--gpu` names the card (gpu_cards.py), and its memory unless
    `--gpu_memory_gib` says otherwise; `--gpu_memory_gib` alone is a card of that size and unknown speed (card and
    name None); neither is GPU 0, by its name (card None if gpu_cards.py does not know it). With no GPU and neither
    flag, (None, None, None)."""
    if gpu:
        card = find_card(gpu)
        return card, memory_gib or card.memory_gib, card.name
    if memory_gib:
        return None, memory_gib, None
    name = gpu_name()
    card = find_card(name) if name else None
    return card, gpu_memory_gib(), card.name if card else name


def gpu_name():
    """torch's name for GPU 0, or None with no GPU."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


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


def planned_shape(model_name, card_gib):
    """The model's shape for the memory plan; None with no GPU, and for our own small models, which fit any card."""
    return model_shape(model_name) if card_gib and model_name not in LOCAL_MODELS else None


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


def step_settings(paw, args, model_args, typical=False, **layout):
    """time_estimate.estimate_time's arguments for one optimizer step of the run as parsed: every reply at
    --max_action_tokens (the worst case), or `typical` replies and observations. `layout` overrides
    per_device_train_batch_size, gradient_accumulation_steps and max_completion_length (plan.fit_run's flags)."""
    setting = {key: getattr(args, key) for key in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                    "max_completion_length")} | layout
    micro_batch, accumulation = setting["per_device_train_batch_size"], setting["gradient_accumulation_steps"]
    generation_steps = args.steps_per_generation if not layout else accumulation  # TRL's default follows the layout
    reply, turn = (TYPICAL_REPLY_TOKENS, TYPICAL_TURN_TOKENS) if typical else (paw.max_action_tokens, TURN_TOKENS)
    env = env_class(paw.env)
    return dict(
        quantization="nf4" if model_args.load_in_4bit else "bf16",
        lora_r=model_args.lora_r if model_args.use_peft or paw.adapter else None,
        double_quant=model_args.use_bnb_nested_quant, episodes=micro_batch * accumulation,
        rollout_episodes=micro_batch * generation_steps, micro_batch=micro_batch,
        max_completion_length=setting["max_completion_length"], reply_tokens=min(reply, paw.max_action_tokens),
        max_env_steps=paw.max_env_steps, turn_tokens=turn, reuse_cache=paw.reuse_cache,
        gradient_checkpointing=args.gradient_checkpointing,
        rollouts_per_step=accumulation / (generation_steps * args.num_iterations), env_workers=paw.env_workers,
        env_reset_s=env.reset_seconds, env_step_s=env.step_seconds)


def step_time(shape, card, paw, args, model_args, typical=False, end="high", **layout):
    """time_estimate's estimated seconds of one optimizer step of the run as parsed (estimate_time's dict), at the
    `end` of its range: the high end (the slow one, which the plan's warnings use) or the low end."""
    return estimate_time(shape, card, **step_settings(paw, args, model_args, typical, **layout), end=end)


def faster_runs(step_seconds, shape, card, card_gib, paw, args, model_args, given=frozenset(),
                hours=HOURS_PER_SESSION):
    """Flags that finish the run (`step_seconds` a step: the high end) in about `hours` on `card`, by the estimates'
    high end: fewer steps, and the largest smaller preset model (Qwen2.5, Llama 3.2) that does all the steps with the
    layout the plan would give it."""
    options = [{"max_steps": int(hours * 3600 / step_seconds)}]

    def size(preset):
        return sum(parameter_counts(preset)[:2])

    for name, other in sorted(PRESETS.items(), key=lambda item: -size(item[1])):
        if size(other) >= size(shape):
            continue
        layout = fit_run(other, paw, args, model_args, HEADROOM * card_gib, given)
        if layout is not None and args.max_steps * step_time(other, card, paw, args, model_args, **layout)["step"] <= (
                hours * 3600):
            return options + [{"model_name_or_path": name}]
    return options


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


def duration(seconds):
    if seconds < 100:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


def duration_range(low, high):
    """"50-97 s", "4.9-9.6 min", "16-32 h": both ends in the unit duration() gives the high end."""
    unit, scale = ("s", 1) if high < 100 else ("min", 60) if high < 6000 else ("h", 3600)
    low, high = low / scale, high / scale
    digits = 0 if unit == "s" or high >= 20 else 1
    return f"{low:.{digits}f}-{high:.{digits}f} {unit}"


def describe_time(shape, card, card_gib, paw, args, model_args, given=frozenset()):
    """The plan's time lines, an ESTIMATE with a low and a high end (time_estimate.py): a step (worst case and typical
    replies), the run, its sessions and checkpoints; and a warning, with flags that finish in about one session, if
    the run would take over two at the high end."""
    worst, typical = ([step_time(shape, card, paw, args, model_args, typical=t, end=end) for end in ENDS]
                      for t in (False, True))
    total = [args.max_steps * w["step"] for w in worst]

    def span(runs, key="step", times=1):
        return duration_range(*(times * run[key] for run in runs))

    checkpoints = "no checkpoints (--save_strategy no)" if args.save_strategy == "no" else (
        f"a checkpoint every {args.save_steps:g} steps ({span(worst, times=args.save_steps)})")
    sessions = [math.ceil(t / 3600 / HOURS_PER_SESSION) for t in total]
    lines = [
        f"  time      ESTIMATE on the {card.name} ({card.tflops:g} TFLOPS, {card.bandwidth_gbs:g} GB/s), not measured: "
        f"{span(worst)} a step (rollout {span(worst, 'rollout')}, training {span(worst, 'training')})",
        f"            with every reply at its {paw.max_action_tokens}-token cap (the worst case); "
        f"{span(typical)} with typical {TYPICAL_REPLY_TOKENS}-token replies",
        "            low end: the fastest the published measurements allow (newer kernels, a fast host); high end: "
        "what they measured, on the slowest host for this card (time_estimate.py)",
        f"  run       {args.max_steps} steps: {span(worst, times=args.max_steps)} at worst "
        f"({span(typical, times=args.max_steps)} typical), {'-'.join(str(n) for n in sorted(set(sessions)))} "
        f"session{'s' * (sessions[1] != 1)} of {HOURS_PER_SESSION} h; {checkpoints}",
    ]
    warning = None
    if total[1] > 2 * HOURS_PER_SESSION * 3600:
        options = " or ".join(as_flags(flags) for flags in faster_runs(worst[1]["step"], shape, card, card_gib, paw,
                                                                         args, model_args, given))
        warning = (f"warning: by the estimate's high end this run takes {duration(total[1])} on the {card.name}, over "
                   f"two {HOURS_PER_SESSION}-hour sessions; about {HOURS_PER_SESSION} h at the high end: {options}")
    return "\n".join(lines), warning


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
    if planned and planned.get("load_in_4bit") is False:
        lines.append("  base      16-bit, not NF4: it fits beside training, and by the time estimate's high end a step "
                     "is faster (4-bit layers cost the host more and, past bitsandbytes' fused kernel, dequantize "
                     "every weight); --load_in_4bit true keeps NF4")
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


# ----------------------------------------------------------------------------------------------------------------
# The plan of a train_paw.py run, as parsed and printed
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    card: object  # gpu_cards.Card, or None where the speed is unknown
    card_gib: float | None  # None with no GPU
    card_name: str | None
    shape: Shape | None  # None where there is no memory plan (no GPU, our own models, an unknown architecture)
    planned: dict | None  # the flags the plan chose
    cpu_agent: bool  # no GPU and no model named: the CPU agent trains
    given: set  # the flags the user set


def fit_to_machine(parser, argv, local_run_flags):
    """Parse `argv` with the run fitted to this machine: the CPU agent with no GPU (and no model named), our own
    models' run sizes (`local_run_flags`), then the caps and micro-batch that fit the GPU. Flags the user passes win
    throughout. (paw, training_args, model_args, Plan); ValueError on bad flags."""
    given = flags_given(argv)
    paw, args, model_args = parser.parse_args_and_config(argv)
    card, card_gib, card_name = planned_card(paw.gpu, paw.gpu_memory_gib)
    cpu_agent = card_gib is None and "model_name_or_path" not in given
    if cpu_agent:  # no GPU: a 7B model would not train, the CPU agent does
        if paw.env != "alfworld":
            raise ValueError(f"no GPU, and the CPU agent plays ALFWorld only: for --env {paw.env} pass "
                             "--model_name_or_path (e.g. tiny for a smoke run)")
        parser.set_defaults(model_name_or_path=AGENT_NAME)
        paw, args, model_args = parser.parse_args_and_config(argv)
    run_flags = local_run_flags.get(model_args.model_name_or_path)
    if run_flags:
        parser.set_defaults(**run_flags)
        paw, args, model_args = parser.parse_args_and_config(argv)
    shape = planned_shape(model_args.model_name_or_path, card_gib)
    planned = fit_run(shape, paw, args, model_args, HEADROOM * card_gib, given) if shape else None
    if planned:
        parser.set_defaults(**planned)
        paw, args, model_args = parser.parse_args_and_config(argv)
    sixteen = sixteen_bit_base(shape, card, paw, args, model_args, HEADROOM * card_gib, given) if planned else None
    if sixteen:
        planned = {**planned, **sixteen}
        parser.set_defaults(**planned)
        paw, args, model_args = parser.parse_args_and_config(argv)
    apply_ddp_timeout(args)  # under torchrun, parsing joined the processes: how long one waits for another
    return paw, args, model_args, Plan(card, card_gib, card_name, shape, planned, cpu_agent, given)


def sixteen_bit_base(shape, card, paw, args, model_args, budget_gib, given):
    """--load_in_4bit false (with the layout that fits it) where a 16-bit base fits beside training at the episode cap
    the NF4 plan (`args`, `model_args`) got. By the time estimate's high end it is then never slower: bitsandbytes'
    4-bit layers cost the host more per layer, and past its fused kernel they dequantize every weight at each
    decoding step and each training pass (time_estimate.py; only the low end's fused kernel, reading a quarter of the
    bytes, can put NF4 ahead). None where the user set --load_in_4bit, without LoRA, or on a card of unknown speed."""
    if card is None or "load_in_4bit" in given or not model_args.load_in_4bit or not model_args.use_peft:
        return None
    layout = fit_run(shape, paw, args, replace(model_args, load_in_4bit=False), budget_gib, given)
    if layout is None or layout.get("max_completion_length", args.max_completion_length) < args.max_completion_length:
        return None
    return {"load_in_4bit": False, **layout}


def print_plan(paw, args, model_args, plan):
    """The plan, before anything loads; a warning where the user's own flags do not fit the card by the estimate, or
    would take more than two sessions."""
    card, card_gib, shape = plan.card, plan.card_gib, plan.shape
    if plan.cpu_agent:
        print(f"no GPU: training the CPU agent ({AGENT_NAME}: a 1M-parameter model for small generated ALFWorld "
              "rooms, built offline on first use); --model_name_or_path picks another model")
    elif card_gib:
        print(f"plan for a GPU of {card_gib:.1f} GiB{f' ({plan.card_name})' if plan.card_name else ''} (--gpu or "
              "--gpu_memory_gib plans for another card; --dry_run prints this and exits):")
    else:
        print("plan (no GPU):")
    peak = run_peak(shape, paw, args, model_args) if shape else None
    print(describe(paw, args, model_args, card_gib, peak, plan.planned))
    if shape and peak > HEADROOM * card_gib:
        fitting = fit_run(shape, paw, args, model_args, HEADROOM * card_gib)  # the user's own knobs set aside
        advice = (f"flags that fit: {as_flags(fitting)}" if fitting else
                  "nothing fits even at the smallest cap and micro-batch 1: use --load_in_4bit, LoRA, a smaller "
                  "model (e.g. Qwen/Qwen2.5-1.5B-Instruct) or fewer episodes per step")
        print(f"warning: the estimated peak, {peak:.1f} GiB, is over {HEADROOM:.0%} of this {card_gib:.1f} GiB card; "
              f"{advice}", file=sys.stderr)
    elif card_gib and shape is None and model_args.model_name_or_path not in LOCAL_MODELS:
        print(f"  memory    no estimate: {model_args.model_name_or_path} is not a preset, a local folder or a "
              "Llama/Qwen-style config the Hub provides")
    if shape and card:
        lines, slow = describe_time(shape, card, card_gib, paw, args, model_args, plan.given)
        print(lines)
        if slow:
            print(slow, file=sys.stderr)
    elif shape:
        why = f"gpu_cards.py does not know the {plan.card_name}" if plan.card_name else (
            "memory alone does not say how fast a card is")
        print(f"  time      no estimate: {why}; --gpu names a card: {', '.join(CARDS)}")


def out_of_memory_message(paw, args, model_args, steps_done):
    """What to do after the GPU ran out of memory: flags that fit (aiming lower than the failed estimate), and the
    checkpoint to resume from."""
    card_gib = planned_card(paw.gpu, paw.gpu_memory_gib)[1]
    shape = planned_shape(model_args.model_name_or_path, card_gib)
    retry = after_out_of_memory(shape, paw, args, model_args, card_gib)
    last = last_complete_checkpoint(args.output_dir)
    return "\n".join([
        f"the GPU ran out of memory in step {steps_done + 1}.",
        f"  flags that fit{' by the estimate, aiming 15% lower' if shape else ''}: {as_flags(retry)}" if retry else
        "  nothing fits this card by the estimate: use a smaller model, or NF4 (--load_in_4bit) with LoRA",
        f"  {last} is intact: run again with these flags and --resume_from_checkpoint last" if last else
        "  no checkpoint was saved yet: run again with these flags",
    ])


def stop_message(error, paw, args, model_args, steps_done):
    """What to do after `error` stopped training in step `steps_done` + 1 (train_paw.main prints it, with no traceback,
    and exits 1); None for an error that has no advice here."""
    if isinstance(error, torch.OutOfMemoryError):
        return out_of_memory_message(paw, args, model_args, steps_done)
    if isinstance(error, NonFiniteLogits):
        return nonfinite_logits_message(error, paw, args, model_args, steps_done)
    if lost_peer(error):  # in a step, or in the processes' last meeting after the last step
        where = f"step {steps_done + 1}" if steps_done < args.max_steps else f"after the last step ({steps_done})"
        return lost_peer_message(error, args.output_dir, args.ddp_timeout, where)
    return None


def float32_card(card):
    """`card` computing in float32, for the time estimate: its FP32 rate (gpu_cards.FP32_TFLOPS), and half its
    bandwidth, since every activation and KV-cache byte doubles (an ESTIMATE that overcounts 4-bit weights); None
    where the FP32 rate is not known."""
    tflops = FP32_TFLOPS.get(card.name) if card else None
    return dataclasses.replace(card, tflops=tflops, bandwidth_gbs=card.bandwidth_gbs / 2) if tflops else None


def step_seconds(shape, card, paw, args, model_args, **layout):
    """A step's estimated seconds at the estimate's (low, high) ends; None where there is no model shape or card."""
    return tuple(step_time(shape, card, paw, args, model_args, end=end, **layout)["step"]
                 for end in ENDS) if shape and card else None


def overflow_remedies(paw, args, model_args):
    """Flags that keep a float16 run's numbers in range, each with its estimated seconds a step at the low and high
    end (None where there is no estimate): bfloat16 on a card that has it; otherwise float32 compute for the same 4-bit
    model, and the largest smaller preset model in float32 without 4-bit whose plan fits the card (float32 doubles the
    estimate's 16-bit memory: it is fitted to half the card)."""
    card, card_gib, _ = planned_card(paw.gpu, paw.gpu_memory_gib)
    shape = planned_shape(model_args.model_name_or_path, card_gib)
    if card and card.bf16:
        return [(dict(dtype="bfloat16", bf16="true", fp16="false"), step_seconds(shape, card, paw, args, model_args))]
    fp32 = float32_card(card)
    remedies = [(dict(dtype="float32", fp16="false"), step_seconds(shape, fp32, paw, args, model_args))]
    if shape is None:
        return remedies

    def size(preset):
        return sum(parameter_counts(preset)[:2])

    family = model_args.model_name_or_path.split("-")[0]  # e.g. Qwen/Qwen2.5: its own smaller models first
    smaller = [(name, other) for name, other in PRESETS.items() if size(other) < size(shape)]
    unquantized = dataclasses.replace(model_args, load_in_4bit=False)
    for name, other in sorted(smaller, key=lambda item: (not item[0].startswith(family), -size(item[1]))):
        layout = fit_run(other, paw, args, unquantized, HEADROOM * card_gib / 2)
        if layout is not None:
            flags = dict(model_name_or_path=name, load_in_4bit="false", dtype="float32", fp16="false", **layout)
            return remedies + [(flags, step_seconds(other, fp32, paw, args, unquantized, **layout))]
    return remedies


def nonfinite_logits_message(error, paw, args, model_args, steps_done):
    """What happened when the policy's logits held NaN or inf in a rollout, its likely cause, the flags that avoid it
    (with the time the estimate gives each), and the checkpoint to resume from."""
    lines = [f"step {steps_done + 1}, in its rollout: {error}. Tokens sampled from them would be noise, so the run "
             "stopped."]
    if model_args.dtype == "float16" or args.fp16:
        card, card_gib, _ = planned_card(paw.gpu, paw.gpu_memory_gib)
        shape = planned_shape(model_args.model_name_or_path, card_gib)
        ends = step_seconds(shape, card, paw, args, model_args)
        now = f"this run: {duration_range(*ends)}; " if ends else ""
        lines += ["  likely cause: float16 overflowed (it tops out at 65504). Qwen2-family models were trained in "
                  "bfloat16, and in float16 their activations can overflow" + (
                      "" if card and card.bf16 else ", on a card without bfloat16 such as a T4") + ".",
                  f"  flags that avoid it, with the estimated time of a step ({now}ESTIMATES, not measured):"]
        for flags, seconds in overflow_remedies(paw, args, model_args):
            lines.append(f"    {as_flags(flags)}: " + (f"{duration_range(*seconds)} a step" if seconds else
                                                       "no time estimate for this card or model"))
        resume = "with the first (another model starts a new run)"
    else:
        lines.append(f"  the run computes in {model_args.dtype}, where an overflow is unlikely: NaN or inf in the "
                     "weights or inputs is (a diverged update: try a lower --learning_rate).")
        resume = "with a lower --learning_rate"
    last = last_complete_checkpoint(args.output_dir)
    lines.append(f"  {last} is intact: run again {resume} and --resume_from_checkpoint last" if last else
                 "  no checkpoint was saved yet")
    return "\n".join(lines)
