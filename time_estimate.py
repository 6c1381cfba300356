"""An ESTIMATE (not a measurement) of how long a train_paw.py step takes on a card, as a range a user can plan with.

    python time_estimate.py                          # train_paw.py's defaults on every card (gpu_cards.py)
    python time_estimate.py --gpu t4 --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct

A step is a rollout (every turn: a prefill of the new tokens, then one decoding step per reply token, then the
environments) and the training passes (forward, recompute, backward). Each piece is as slow as the slowest of what
the GPU must move and compute and what the host (Python and kernel launches) must issue. The constants below were
fitted to published end-to-end measurements, not to kernel release notes: calibration.py holds them with their
sources and software versions, and tests/test_time_estimate.py checks that this model reproduces every decoding row
within 25%. Where the measurements leave a factor open, the estimate has two ends:

- high: what the published measurements reproduce, on the slowest host measured for this kind of card (Colab's, for
  a T4): bitsandbytes 0.45's 4-bit paths (its fused kernel of 0.50 counted as slow as dequantize + matmul), the KV
  cache moved as slowly as transformers' eager attention of 2023 did, LoRA's unmerged adapters at +100% of a layer's
  host time, training at 33% of the peak (the Qwen README's 1.8B rows);
- low: what newer software could give at best, on the fastest host measured for this kind of card: bitsandbytes
  0.50's fused kernel reading 4-bit weights as fast as 16-bit ones are read, the cache moved as fast as the weights,
  LoRA at +45%, training at 51% of the peak (the Qwen README's 7B rows).

The calibration rows, measured with the older software, are checked at the high end with their own machine's host.
Not counted: the optimizer step, TRL's scoring, --beta's reference forward, --num_iterations' extra forward, torch
compile or CUDA graphs (not used), and a GPU slowed by heat or a shared host.
"""

import ast
import functools
import os
from pathlib import Path

import torch

from envs import env_class
from gpu_cards import CARDS, find_card
from memory_estimate import (DEFAULTS, FP32, HALF, NF4_BYTES, PROMPT_TOKENS, TURN_TOKENS, arguments, linear_shapes,
                             load_shape, parameter_counts)

ENDS = ("low", "high")

# --- The host: seconds of Python and kernel launches, relative to bitsandbytes' H100 benchmark machine ----------------
# A decoder layer in 16 bits (all of generate's work per step included): bitsandbytes' H100 rows of Llama-3.1-8B and
# Qwen2.5-32B in bf16 at batch 1-32 are flat at 24.4-26.1 ms / 32 layers and 50.8-54.7 ms / 64 layers.
HOST_LAYER_16BIT = 0.76e-3
# What each 4-bit linear adds to its layer: the one-kernel path (0.45's batch-1 GEMV, 0.50's fused kernel), from the
# same H100 rows in NF4 at batch 1 (33.1 ms / 32 layers); dequantize + matmul, from NF4 at batch 8 and 32 (47.6 and
# 48.6 ms); with double quantisation ("nested") each adds the kernels that restore the absmax first (NF4 + DQ: 41.1,
# 56.6 and 57.7 ms). bitsandbytes 0.50's fused kernel restores it inside: no nested cost at the low end.
HOST_LINEAR_4BIT = {"fused": 0.039e-3, "dequantize": 0.104e-3}
HOST_LINEAR_NESTED = {"fused": 0.036e-3, "dequantize": 0.040e-3}
# LoRA's unmerged adapters (cast, two matmuls, scale, add on each linear): +45-50% of generate's time in
# huggingface/peft issue 957, +100% in issue 303 (card and model sizes not stated), as a fraction of a 16-bit layer.
HOST_LORA = {"low": 0.45, "high": 1.0}
# How long each calibration machine's host takes for these calls, against bitsandbytes' H100 machine (2.25: 2.25x as
# long). Fitted to the rows where the host bounds decoding: bitsandbytes' T4 rows at batch 1 (NF4 60.8 ms, NF4 + DQ 73.6
# ms over 36 layers); its RTX 4090 rows at batch 1 (Llama-3.1-8B and Qwen2.5-14B in NF4 and NF4 + DQ: 14.8-25.6 ms, a
# desktop CPU); optimum's A100 rows of Llama-2-13B in fp16 at batch 1-4 (37.0-37.9 ms / 40 layers; transformers of
# August 2023); Colab's T4 running Qwen2.5-0.5B in fp16 at batch 1 (24.4 tokens/s over 24 layers).
HOST_SPEED = {"bnb-h100": 1.0, "bnb-t4": 1.6, "bnb-4090": 0.44, "optimum-a100": 1.21, "colab-t4": 2.25}

# --- The GPU: fractions of the published bandwidth and peak (gpu_cards.py) reached at decoding's small batches -------
# (16-bit weights read, 4-bit weights dequantized to a 16-bit copy, matmuls of a few rows). Fitted per architecture:
# turing to bitsandbytes' T4 rows of Qwen2.5-3B (fp16 39.0 / 42.2 / 60.1 ms at batch 1 / 8 / 32; NF4 96.0 / 115.0 and
# NF4 + DQ 104.2 / 121.5 at batch 8 / 32); ada to its RTX 4090 rows (Llama-3.1-8B bf16 21.1 / 23.9 / 30.4, NF4 42.5 /
# 46.1 and NF4 + DQ 44.3 / 47.1 at batch 8 / 32; Qwen2.5-14B at batch 8); hopper's dequantize to its H100 rows of
# Llama-3.1-70B and Qwen2.5-32B in NF4 at batch 8 and 32 (the only H100 rows the GPU bounds); ampere's dequantize to
# the A100 row of Llama-2-13B in 4 bits at batch 16 (bitsandbytes 0.41). Where no row is bound by a term (every H100
# and A100 row is bound by the host or the KV cache at small batches), the ada value stands in.
DECODE_EFFICIENCY = {  # (weights, dequantize, compute)
    "turing": (0.56, 0.41, 0.12),
    "ampere": (0.72, 0.46, 0.34),
    "ada": (0.72, 0.90, 0.34),
    "hopper": (0.72, 0.29, 0.34),
    "cpu": (1.0, 1.0, 1.0),  # gpu_check's smoke size: no GPU
}
# transformers' DynamicCache grows each layer's keys and values by torch.cat, which reads and writes the whole cache
# every decoding step, and attention reads it once more: 3 passes over the cache. The high end moves them at 28% of the
# bandwidth, fitted to optimum's A100 rows of Llama-2-13B in fp16 at batch 8 and 16 (47.4 and 69.9 ms a token over
# 512-1024 tokens of context; transformers of August 2023, eager attention), the only rows with a long context; the
# low end as fast as the weights (today's sdpa reads the cache in one kernel).
KV_EFFICIENCY = {"low": None, "high": 0.28}
KV_PASSES = 3
PREFILL_EFFICIENCY = 0.5  # of the peak, for prefill's large matmuls: optimum's A100 prefill rows of Llama-2-13B in
# fp16 (512 tokens, batch 1-16) reached 44-57%
# Of the peak, for forward + recompute + backward, counted in hardware FLOPs (the recompute included): the Qwen README's
# LoRA rows on an A100 at 4096 and 8192 tokens reach 49-51% for Qwen-7B and 33-37% for Qwen-1.8B.
TRAIN_EFFICIENCY = {"low": 0.51, "high": 0.33}
BLOCKSIZE = 64  # bitsandbytes' 4-bit block: an inner dimension that is no multiple of it takes dequantize + F.linear

# A typical turn, against the worst case's full-length reply and TURN_TOKENS (shared/notes/alfworld-token-budget.md):
TYPICAL_REPLY_TOKENS = 70  # a short thought (about 60 tokens) and the action in its tags (about 10)
TYPICAL_TURN_TOKENS = 210  # observation (mean 23) + admissible list (mean 173) + chat headers
HOURS_PER_SESSION = 12  # a Colab or Kaggle session


@functools.cache
def bitsandbytes_dispatch():
    """bitsandbytes' own choice between its fused 4-bit kernel and dequantize + F.linear, `_gemm_4bit_use_custom_cuda`
    in the installed backends/cuda/ops.py, and its row limits. That module imports only with a CUDA torch, so the
    function is compiled from its source alone, with the card's SM count and compute capability in place of the GPU's
    (`_gpu_dispatch_props`, the one call it makes)."""
    import bitsandbytes  # the pinned 0.50.2; another version's heuristic follows it

    tree = ast.parse((Path(bitsandbytes.__file__).parent / "backends" / "cuda" / "ops.py").read_text())
    assigned = {}  # each name's first assignment: the CUDA branch's (ROCm's follows in the else branch)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            assigned.setdefault(node.targets[0].id, node.value)
    function = next(node for node in tree.body if getattr(node, "name", "") == "_gemm_4bit_use_custom_cuda")
    function.decorator_list = []
    namespace = {"torch": torch, "_GEMM_4BIT_CUSTOM_FLOOR_M": ast.literal_eval(assigned["_GEMM_4BIT_CUSTOM_FLOOR_M"])}
    exec(compile(ast.Module([function], []), "bitsandbytes/backends/cuda/ops.py", "exec"), namespace)
    return namespace, ast.literal_eval(assigned["_gemm_4bit_custom_max_m"])


def fused_4bit(card, rows, n, k):
    """Whether bitsandbytes 0.50 multiplies `rows` rows by an (n x k) 4-bit weight with its fused kernel (else it
    dequantizes the weight to 16 bits, then F.linear), on `card` in its compute dtype (fp16 on a T4, bf16 after):
    bitsandbytes' own decision (gemm_4bit in backends/cuda/ops.py), made for the card's SM count and compute
    capability."""
    namespace, max_rows = bitsandbytes_dispatch()
    if rows > max_rows or k % BLOCKSIZE:
        return False
    namespace["_gpu_dispatch_props"] = lambda device: (card.sms, *card.compute_capability)
    return namespace["_gemm_4bit_use_custom_cuda"](0, torch.bfloat16 if card.bf16 else torch.float16, rows, n, k)


def forward_seconds(shape, card, rows, keys, compute_efficiency, *, quantization="nf4", double_quant=True,
                    lora_r=None, end="high", host=1.0, bnb="0.50"):
    """(GPU seconds, host seconds) of one forward call over `rows` new tokens (a batch's decoding step, or a
    prefill) that attend to `keys` keys each, its cache traffic aside. bnb: "0.50", or "0.45" for the calibration
    rows (their batch 1 took bitsandbytes' GEMV kernel, every larger batch dequantize + matmul)."""
    weights, dequantize, _ = DECODE_EFFICIENCY[card.architecture]
    bandwidth, peak = card.bandwidth_gbs * 1e9, card.tflops * 1e12
    nf4 = NF4_BYTES[double_quant]
    gpu, host_layer = 0.0, HOST_LAYER_16BIT * (1 + (HOST_LORA[end] if lora_r else 0.0))
    for n, k in ((o, i) for i, o in linear_shapes(shape)):
        gpu += 2 * rows * n * k / (peak * compute_efficiency)
        if lora_r:  # fp32 adapters: read, and their two thin matmuls
            gpu += lora_r * (n + k) * (FP32 / (bandwidth * weights) + 2 * rows / (peak * compute_efficiency))
        if quantization != "nf4":
            gpu += HALF * n * k / (bandwidth * weights)
            continue
        fused = (rows == 1) if bnb == "0.45" else fused_4bit(card, rows, n, k)
        path = "fused" if fused else "dequantize"
        if fused and (end == "low" or bnb == "0.45"):  # 0.45's GEMV was measured; 0.50's fused kernel was not
            gpu += nf4 * n * k / (bandwidth * weights)
        else:  # write a 16-bit copy, which the matmul reads (the high end charges 0.50's fused kernel the same)
            gpu += (nf4 + HALF) * n * k / (bandwidth * dequantize) + HALF * n * k / (bandwidth * weights)
        nested = double_quant and (not fused or bnb == "0.45" or end == "high")
        host_layer += HOST_LINEAR_4BIT[path] + (HOST_LINEAR_NESTED[path] if nested else 0.0)
    gpu += 4 * rows * keys * shape.heads * shape.head_dim / (peak * compute_efficiency)  # attention
    head = HALF * shape.vocab * shape.hidden / (bandwidth * weights)  # the LM head, for the last positions' logits
    return shape.layers * gpu + head, shape.layers * host_layer * host


def kv_bytes(shape):
    """Bytes of one token's keys and values in every layer (16-bit)."""
    return 2 * shape.kv_heads * shape.head_dim * HALF * shape.layers


def decode_seconds(shape, card, batch, context, **settings):
    """Seconds of one decoding step of `batch` sequences holding `context` tokens each: a forward of one token per
    sequence with its logits, and the cache's copy and attention traffic (settings: forward_seconds')."""
    compute = DECODE_EFFICIENCY[card.architecture][2]
    gpu, host = forward_seconds(shape, card, batch, context, compute, **settings)
    cache = KV_EFFICIENCY[settings.get("end", "high")] or DECODE_EFFICIENCY[card.architecture][0]
    gpu += KV_PASSES * batch * context * kv_bytes(shape) / (card.bandwidth_gbs * 1e9 * cache)
    gpu += 2 * batch * shape.vocab * shape.hidden / (card.tflops * 1e12 * compute)
    return max(gpu, host)


def prefill_seconds(shape, card, batch, new, context, **settings):
    """Seconds of a prefill: `batch` sequences feed `new` tokens each, which attend to `context` keys (a padding mask:
    every key)."""
    return max(forward_seconds(shape, card, batch * new, context, PREFILL_EFFICIENCY, **settings))


def training_seconds(shape, card, rows, micro_batch, *, quantization="nf4", double_quant=True, lora_r=DEFAULTS[
        "lora_r"], gradient_checkpointing=True, scored=None, causal=False, end="high"):
    """Seconds of forward, recompute (gradient checkpointing) and backward of one micro-batch of `micro_batch` rows of
    `rows` tokens. A frozen base (LoRA) needs no weight gradient. Attention covers every key (a padding mask), or half
    of them (`causal`: flash-attention in a causal model). `scored` tokens go through the LM head (TRL scores the
    completion; default every token), which is not recomputed. A 4-bit base is dequantized in every pass (the
    forward's matmuls are past the fused kernel's rows, the backward always dequantizes)."""
    linear, _, lora = parameter_counts(shape, lora_r)
    attention = shape.heads * shape.head_dim
    passes = 3 if gradient_checkpointing else 2  # forward, recompute, backward: each multiplies by every weight
    # FLOPs per weight and token: 2 a pass, and 2 more for the weight gradient of what trains (LoRA: the adapters)
    trained, frozen = 2 * passes + 2, 2 * passes + (0 if lora_r else 2)
    keys = rows / 2 if causal else rows
    flops = rows * (frozen * linear + trained * lora + 4 * keys * attention * shape.layers * (passes + 1))
    flops += (rows if scored is None else scored) * 2 * shape.vocab * shape.hidden * (2 if lora_r else 3)
    seconds = micro_batch * flops / (card.tflops * 1e12 * TRAIN_EFFICIENCY[end])
    if quantization == "nf4":
        weights, dequantize, _ = DECODE_EFFICIENCY[card.architecture]
        bandwidth = card.bandwidth_gbs * 1e9
        seconds += passes * linear * ((NF4_BYTES[double_quant] + HALF) / dequantize + HALF / weights) / bandwidth
    return seconds


def episode_turns(max_completion_length, max_env_steps, reply_tokens, turn_tokens):
    """(turns, completion tokens) of an episode whose every turn is a reply of `reply_tokens` and the environment's
    `turn_tokens`, and which never ends early: rollout.play starts no turn once the completion reaches its cap."""
    per_turn = reply_tokens + turn_tokens
    turns = min(max_env_steps, -(-max_completion_length // per_turn))
    return turns, min(max_completion_length, turns * per_turn)


def estimate_time(shape, card, *, quantization="nf4", lora_r=DEFAULTS["lora_r"], double_quant=True,
                  episodes=DEFAULTS["per_device_train_batch_size"] * DEFAULTS["gradient_accumulation_steps"],
                  rollout_episodes=None, micro_batch=DEFAULTS["per_device_train_batch_size"],
                  max_completion_length=DEFAULTS["max_completion_length"], reply_tokens=DEFAULTS["max_action_tokens"],
                  max_env_steps=20, turn_tokens=TURN_TOKENS, prompt_tokens=PROMPT_TOKENS, reuse_cache=True,
                  gradient_checkpointing=True, rollouts_per_step=1.0, env_workers=8, env_reset_s=0.0,
                  env_step_s=0.0, end="high", host=None):
    """Seconds of one optimizer step on `card` (a gpu_cards.Card), by phase, at one `end` of the range (see the module
    docstring): an ESTIMATE.

    episodes: trained on per step (per process); rollout_episodes: decoded together (default: episodes).
    reply_tokens: every reply's length (max_action_tokens for the worst case). host: the host's speed against
    bitsandbytes' H100 machine (default: the card's fast or slow calibration machine, by `end`).
    """
    batch = rollout_episodes or episodes
    host = HOST_SPEED[card.hosts[ENDS.index(end)]] if host is None else host
    model = dict(quantization=quantization, double_quant=double_quant, lora_r=lora_r, end=end, host=host)
    turns, completion = episode_turns(max_completion_length, max_env_steps, reply_tokens, turn_tokens)
    t = {"prefill": 0.0, "decode": 0.0}
    waves = -(-batch // max(env_workers, 1))  # environments per worker, one after another
    t["environment"] = waves * (env_reset_s + turns * env_step_s)
    for turn in range(turns):
        context = prompt_tokens + turn * (reply_tokens + turn_tokens)  # once this turn's new tokens are in
        new = prompt_tokens if turn == 0 else turn_tokens
        t["prefill"] += prefill_seconds(shape, card, batch, new if reuse_cache else context, context, **model)
        t["decode"] += reply_tokens * decode_seconds(shape, card, batch, context + reply_tokens / 2, **model)
    t["rollout"] = t["prefill"] + t["decode"] + t["environment"]
    rows = prompt_tokens + completion  # a micro-batch row, padded to the longest
    micro = training_seconds(shape, card, rows, micro_batch, quantization=quantization, double_quant=double_quant,
                             lora_r=lora_r, gradient_checkpointing=gradient_checkpointing, scored=completion, end=end)
    t["training"] = -(-episodes // micro_batch) * micro
    t["step"] = rollouts_per_step * t["rollout"] + t["training"]
    generated = batch * turns * reply_tokens
    t.update(turns=turns, completion_tokens=completion, generated_tokens=generated,
             generated_tokens_per_s=generated / t["rollout"], train_tokens=episodes * rows)
    return t


def format_time_table(shape, cards, max_steps, **settings):
    """The time estimate on each of `cards` as a small table: a step at worst and typically, and the whole run, each
    as its low-high range."""
    lines = [f"ESTIMATE (not measured) of the time of a train_paw.py run, {max_steps} steps, as low-high ranges "
             f"(time_estimate.py); worst case: every reply at its {settings['reply_tokens']}-token cap; typical: "
             f"{TYPICAL_REPLY_TOKENS}-token replies",
             f"{'card':<16}{'step, worst':>16}{'rollout':>14}{'training':>14}{'step, typical':>16}{'run, worst':>14}"
             f"{'12 h sessions':>15}"]
    typical = {**settings, "reply_tokens": min(TYPICAL_REPLY_TOKENS, settings["reply_tokens"]),
               "turn_tokens": TYPICAL_TURN_TOKENS}
    for card in cards:
        worst = [estimate_time(shape, card, **settings, end=end) for end in ENDS]
        usual = [estimate_time(shape, card, **typical, end=end)["step"] for end in ENDS]
        hours = [max_steps * w["step"] / 3600 for w in worst]

        def span(low, high, unit=""):
            return f"{low:.0f}-{high:.0f}{unit}"

        lines.append(f"{card.name:<16}{span(*(w['step'] for w in worst), ' s'):>16}"
                     f"{span(*(w['rollout'] for w in worst), ' s'):>14}"
                     f"{span(*(w['training'] for w in worst), ' s'):>14}"
                     f"{span(*usual, ' s'):>16}{span(*hours, ' h'):>14}"
                     f"{span(*(-(-h // HOURS_PER_SESSION) for h in hours)):>15}")
    return "\n".join(lines)


def main(argv=None):
    parser = arguments(__doc__.split("\n")[0])
    flag = parser.add_argument
    flag("--gpu", help=f"this card only ({', '.join(CARDS)}; default: every card)")
    flag("--max_env_steps", type=int, default=20, help="actions per episode")
    flag("--max_steps", type=int, default=200, help="optimizer steps of the run")
    flag("--env", default="alfworld", choices=["alfworld", "webshop", "search"], help="whose step and reset times")
    flag("--env_workers", type=int, default=min(8, os.cpu_count() or 1), help="processes that run environments")
    args = parser.parse_args(argv)
    episodes = args.per_device_train_batch_size * args.gradient_accumulation_steps
    lora_r = args.lora_r if args.use_peft else None
    try:
        shape = load_shape(args.model)
        if args.load_in_4bit and not lora_r:
            raise ValueError("a 4-bit base cannot be trained without LoRA adapters (pass --use_peft)")
        cards = [find_card(args.gpu)] if args.gpu else list(CARDS.values())
        if None in cards:
            raise ValueError(f"--gpu {args.gpu}: unknown card; one of {', '.join(CARDS)}")
    except (ValueError, OSError) as error:  # an unknown model or card, an unreadable config, NF4 without LoRA
        parser.error(str(error))
    env = env_class(args.env)
    rollout_episodes = args.rollout_episodes or episodes
    print(format_time_table(
        shape, cards, args.max_steps, quantization="nf4" if args.load_in_4bit else "bf16", lora_r=lora_r,
        double_quant=args.use_bnb_nested_quant, episodes=episodes, rollout_episodes=rollout_episodes,
        micro_batch=args.per_device_train_batch_size, max_completion_length=args.max_completion_length,
        reply_tokens=args.max_action_tokens, max_env_steps=args.max_env_steps, turn_tokens=args.turn_tokens,
        prompt_tokens=args.prompt_tokens, reuse_cache=args.reuse_cache,
        rollouts_per_step=episodes / rollout_episodes, env_workers=args.env_workers,
        env_reset_s=env.reset_seconds, env_step_s=env.step_seconds))


if __name__ == "__main__":
    main()
