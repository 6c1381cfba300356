"""An ESTIMATE (not a measurement) of the GPU memory a train_paw.py run needs, before you rent or pick a card.

    python memory_estimate.py                              # train_paw.py's defaults: Qwen2.5-7B, NF4, LoRA r=16
    python memory_estimate.py --model Qwen/Qwen2.5-1.5B-Instruct --max_completion_length 3072
    python memory_estimate.py --model path/to/model_folder # any local folder or config.json

Its time on each card: time_estimate.py.

A run alternates two phases that never overlap in time:
- rollout: every episode of a generation batch decodes together (rollout.ModelPolicy): weights + KV cache + logits;
- training: one micro-batch forward/backward at a time: weights + gradients + activations.
Some memory stays for the whole run: the weights, the LoRA adapters and their AdamW moments, the CUDA context. So

    peak = resident + max(rollout, training)

Every term below counts the tensors that the code paths of TRL 1.16, transformers 5.23, peft 0.21 and bitsandbytes
0.50 allocate on a CUDA GPU at the worst moment, with every episode at its token cap. The activation terms were
checked against the live tensors of a real LoRA forward/backward on CPU (tests/test_memory_estimate.py). Not
modelled: TRL's extra no-grad forward with --num_iterations > 1, --gradient_checkpointing false, vLLM, allocator
fragmentation beyond the fixed overhead.

Checked against published figures (see the tests):
- NF4 with double quantisation stores 4 + 8/64 + 32/(64*256) = 4.127 bits per weight (Dettmers et al., QLoRA,
  arXiv:2305.14314, section 3, "Double Quantization"); embeddings, lm_head and norms stay 16-bit.
- Qwen2.5-7B-Instruct in NF4 + double quantisation: the bitsandbytes checkpoint unsloth/Qwen2.5-7B-Instruct-bnb-4bit
  is 5.55 GB (model.safetensors in
  https://huggingface.co/unsloth/Qwen2.5-7B-Instruct-bnb-4bit/tree/0f4e59d102377a568fc4c0495c128a3947bb132f);
  this module computes 5.546 GB.
- Every preset gives the parameter count on its model card, e.g. Qwen2.5-7B-Instruct 7.61B
  (https://huggingface.co/Qwen/Qwen2.5-7B-Instruct), and LoRA r=16 on its linears 40,370,176 trainable (peft's count).
"""

import argparse
import os
from dataclasses import dataclass

GIB = 2**30
HALF = 2  # bytes of a bf16/fp16 value: compute dtype, 16-bit weights, KV cache, activations
FP32 = 4
# Bytes per NF4 weight: a 4-bit code, plus one absmax per block of 64 weights, itself fp32 or, with double
# quantisation, 8-bit with one fp32 constant per 256 blocks (QLoRA, section 3).
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
# TRL 1.16's fused LM head projects tiles of TOKEN_CHUNK tokens x VOCAB_CHUNK vocabulary entries into one buffer
# (trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE, trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE).
LOGPROB_VOCAB_CHUNK = 32768
LOGPROB_TOKEN_CHUNK = 4096

# train_paw.py's defaults (default_flags() and PaWArguments; tests/test_memory_estimate.py keeps them in sync).
DEFAULTS = dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, max_completion_length=6144,
                max_action_tokens=256, lora_r=16)
PROMPT_TOKENS = 600  # ALFWorld: system prompt + task and first room (~180) + admissible list (up to ~350)
TURN_TOKENS = 500  # tokens fed at the start of a turn: observation (<= 117) + admissible list (<= 349) + chat headers
# (shared/notes/alfworld-token-budget.md; the batch is padded to the longest, so the maxima count)


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that memory depends on (q/k/v biases and rotary tables are ignored)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix

    @classmethod
    def from_config(cls, config):
        """From a transformers config of a Llama/Qwen-style model (gated MLP, grouped-query attention)."""
        config = config.get_text_config()
        try:
            heads = config.num_attention_heads
            return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
                       getattr(config, "num_key_value_heads", None) or heads,
                       getattr(config, "head_dim", None) or config.hidden_size // heads,
                       config.vocab_size, bool(config.tie_word_embeddings))
        except AttributeError as error:  # e.g. GPT-2's n_inner: not the architecture these formulas describe
            raise ValueError(f"{type(config).__name__} is not a Llama/Qwen-style decoder: {error}") from None


# From each model's config.json on the Hugging Face Hub (base and Instruct models share shapes).
PRESETS = {
    "Qwen/Qwen2.5-0.5B-Instruct": Shape(24, 896, 4864, 14, 2, 64, 151936, True),
    "Qwen/Qwen2.5-1.5B-Instruct": Shape(28, 1536, 8960, 12, 2, 128, 151936, True),
    "Qwen/Qwen2.5-3B-Instruct": Shape(36, 2048, 11008, 16, 2, 128, 151936, True),
    "Qwen/Qwen2.5-7B-Instruct": Shape(28, 3584, 18944, 28, 4, 128, 152064, False),
    "meta-llama/Llama-3.2-1B-Instruct": Shape(16, 2048, 8192, 32, 8, 64, 128256, True),
    "meta-llama/Llama-3.2-3B-Instruct": Shape(28, 3072, 8192, 24, 8, 128, 128256, True),
}


def load_shape(model):
    """A preset name, or a local model folder or config.json (read offline; there is no Hub lookup)."""
    if model in PRESETS:
        return PRESETS[model]
    if not os.path.exists(model):
        raise ValueError(f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) and not a local folder "
                         "or config.json")
    from transformers import AutoConfig  # only here: the presets need no torch/transformers import

    return Shape.from_config(AutoConfig.from_pretrained(model))


def linear_shapes(s):
    """(in, out) of every linear layer of one decoder block: q, k, v, o, gate, up, down."""
    attention, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return [(s.hidden, attention), (s.hidden, kv), (s.hidden, kv), (attention, s.hidden),
            (s.hidden, s.intermediate), (s.hidden, s.intermediate), (s.intermediate, s.hidden)]


def parameter_counts(s, lora_r=None):
    """(block linear weights, embedding + lm_head + norms, LoRA adapter) parameter counts; LoRA on all block linears."""
    linear = s.layers * sum(i * o for i, o in linear_shapes(s))
    other = s.vocab * s.hidden * (1 if s.tied else 2) + (2 * s.layers + 1) * s.hidden
    lora = s.layers * sum(lora_r * (i + o) for i, o in linear_shapes(s)) if lora_r else 0
    return linear, other, lora


def estimate(shape_or_config, *, quantization="nf4", lora_r=DEFAULTS["lora_r"],
             rollout_episodes=DEFAULTS["per_device_train_batch_size"] * DEFAULTS["gradient_accumulation_steps"],
             episode_tokens=PROMPT_TOKENS + DEFAULTS["max_completion_length"] + DEFAULTS["max_action_tokens"],
             micro_batch=DEFAULTS["per_device_train_batch_size"],
             train_tokens=PROMPT_TOKENS + DEFAULTS["max_completion_length"],
             turn_tokens=TURN_TOKENS, reuse_cache=True, double_quant=True, overhead_gib=1.0):
    """Bytes per component, the three phase totals and the peak (an ESTIMATE, see the module docstring).

    shape_or_config: a Shape, a transformers config, or a preset name / local path. quantization: "nf4" (base in
    4-bit, LoRA required) or "bf16" (16-bit base; bf16 and fp16 take the same bytes). lora_r: LoRA rank on all
    block linears, or None for full fine-tuning. episode_tokens: the longest rollout sequence (prompt + completion
    cap + one last reply, which the cap only checks before a turn). train_tokens: a training row (prompt +
    completion cap; TRL pads a micro-batch to its longest row). turn_tokens: tokens prefilled at a turn's start.
    """
    s = shape_or_config if isinstance(shape_or_config, Shape) else (
        load_shape(shape_or_config) if isinstance(shape_or_config, str) else Shape.from_config(shape_or_config))
    if quantization not in ("nf4", "bf16"):
        raise ValueError(f"quantization must be 'nf4' or 'bf16', got {quantization!r}")
    if quantization == "nf4" and not lora_r:
        raise ValueError("a 4-bit base cannot be trained without LoRA adapters (pass lora_r)")
    h, i, attention = s.hidden, s.intermediate, s.heads * s.head_dim
    linear, other, lora = parameter_counts(s, lora_r)
    B, L, b, T = rollout_episodes, episode_tokens, micro_batch, train_tokens
    fed = turn_tokens if reuse_cache else L  # without cache reuse every turn re-reads the whole history
    scored = b * T  # tokens the LM head scores (completion tokens only; counting the prompt too overestimates a bit)
    e = {}

    # Resident for the whole run.
    e["weights"] = linear * (NF4_BYTES[double_quant] if quantization == "nf4" else HALF) + other * HALF
    # LoRA: fp32 adapters (train_paw.py recasts them) and fp32 AdamW moments. Full fine-tuning: AdamW keeps its two
    # moments in the parameters' 16-bit dtype.
    e["trainable_state"] = lora * (FP32 + 2 * FP32) if lora_r else (linear + other) * 2 * HALF
    e["cuda_overhead"] = overhead_gib * GIB  # CUDA context, cuBLAS workspaces, allocator slack: a guess

    # Rollout. KV cache: one copy (rollout.ModelPolicy frees each old layer as it re-gathers the batch), and
    # DynamicCache's torch.cat holds one layer twice as it grows.
    kv_per_layer = B * L * 2 * s.kv_heads * s.head_dim * HALF
    e["kv_cache"] = kv_per_layer * (s.layers + 1)
    # Prefill of a turn's new tokens: with a padding mask, transformers' sdpa repeats one layer's K and V for every
    # query head (repeat_kv; decode steps avoid it), and builds a (B, 1, new, L) bool mask that sdpa turns 16-bit.
    e["attention_workspace"] = (2 * B * L * attention * HALF if s.heads > s.kv_heads else 0) + B * fed * L * (1 + HALF)
    # One layer at a time in no-grad mode: act(gate), up and their product (or the product and its fp32 copy for
    # the LoRA adapter), plus residual, normed input, attention output and o_proj output.
    e["prefill_activations"] = B * fed * (3 * HALF * i + 4 * HALF * h)
    # Per step: 16-bit logits of the last position, their fp32 copy, and RecordLogprobs' log-softmax (this step's
    # and the last) with its temperature-scaled input.
    e["generation_logits"] = B * s.vocab * (HALF + 4 * FP32)

    # Training, one micro-batch (gradients accumulate over micro-batches, so all of them are counted).
    # LoRA: fp32 gradients and the 16-bit copies autocast makes of the fp32 adapters; full: 16-bit gradients.
    e["gradients"] = lora * (FP32 + HALF) if lora_r else (linear + other) * HALF
    # Gradient checkpointing keeps each layer's input (and the last hidden state) for the whole backward.
    e["checkpoints"] = (s.layers + 1) * b * T * h * HALF
    # The layer being recomputed, at its backward peak, per token: both RMSNorms save their fp32 input; the
    # normed inputs and the attention output feed the LoRA A matrices; sdpa saves q, k and v repeated to all heads
    # and its output; the MLP holds gate, act(gate), up and the gradients of their product (6 MLP-wide tensors,
    # measured).
    per_token = 2 * FP32 * h + HALF * (2 * h + attention) + 4 * HALF * attention + 6 * HALF * i
    if lora_r and quantization == "bf16":
        # peft's Linear (not the bnb one) casts each adapted input to the adapters' fp32 and autocast casts it back:
        # a 16-bit copy saved per adapter (q, k, v, gate, up read the hidden size, o the attention, down the MLP).
        per_token += HALF * (5 * h + attention + i)
    e["recomputed_layer"] = b * T * per_token + b * T * T * (1 + HALF)  # + the (b, 1, T, T) mask and its 16-bit copy
    # TRL's fused LM head: one tile buffer (in the backward too), the scored hidden states it saves, their fp32
    # gradient accumulator, and for full fine-tuning the lm_head's fp32 weight gradient.
    e["lm_head"] = (min(scored, LOGPROB_TOKEN_CHUNK) * LOGPROB_VOCAB_CHUNK * HALF + scored * h * (HALF + FP32)
                    + (0 if lora_r else s.vocab * h * FP32))

    e["resident"] = e["weights"] + e["trainable_state"] + e["cuda_overhead"]
    e["rollout"] = e["kv_cache"] + e["attention_workspace"] + e["prefill_activations"] + e["generation_logits"]
    # The LM head runs (forward and backward) before any layer is recomputed: the two never coexist.
    e["training"] = e["gradients"] + e["checkpoints"] + max(e["recomputed_layer"], e["lm_head"])
    e["peak"] = e["resident"] + max(e["rollout"], e["training"])
    return e


ROWS = [
    ("resident for the whole run", None),
    ("weights", "weights (embeddings and lm_head stay 16-bit)"),
    ("trainable_state", "{state}"),
    ("cuda_overhead", "CUDA context + allocator slack (a fixed guess)"),
    ("rollout phase: {B} episodes x {L} tokens decode together (no gradients)", None),
    ("kv_cache", "KV cache of every episode (one copy + one layer)"),
    ("attention_workspace", "prefill attention: K/V repeated per head + mask"),
    ("prefill_activations", "prefill activations of one layer ({fed} tokens/episode)"),
    ("generation_logits", "logits + sampling buffers of one decode step"),
    ("training phase: micro-batch {b} x {T} tokens, gradient checkpointing", None),
    ("gradients", "{grads}"),
    ("checkpoints", "checkpointed layer inputs"),
    ("recomputed_layer", "max of: one layer recomputed for backward"),
    ("lm_head", "        TRL's fused, chunked LM head"),
]


def format_table(e, s, model, quantization, lora_r, double_quant, rollout_episodes, episode_tokens, micro_batch,
                 train_tokens, turn_tokens, reuse_cache):
    """The estimate of model `model` (shape `s`) as a small table in GiB, with the phase arithmetic spelled out."""
    linear, other, lora = parameter_counts(s, lora_r)
    names = dict(
        quant={"nf4": "NF4 + double quant" if double_quant else "NF4", "bf16": "16-bit"}[quantization],
        state="LoRA adapters + AdamW moments (fp32)" if lora_r else "AdamW moments (16-bit)",
        grads="LoRA fp32 gradients + 16-bit autocast copies" if lora_r else "gradients (16-bit)",
        B=rollout_episodes, L=episode_tokens, b=micro_batch, T=train_tokens,
        fed=turn_tokens if reuse_cache else episode_tokens)
    tuning = f"LoRA r={lora_r} ({lora / 1e6:.1f}M trainable)" if lora_r else "full fine-tuning"
    lines = ["ESTIMATE (not measured) of GPU memory for train_paw.py, in GiB (2^30 bytes)",
             f"{model}: {s.layers} layers, hidden {s.hidden}, {(linear + other) / 1e9:.2f}B parameters; "
             f"{names['quant']}, {tuning}"]
    for key, label in ROWS:
        if label is None:
            lines.append(key.format(**names))
        else:
            lines.append(f"  {label.format(**names):<62}{e[key] / GIB:7.2f}")
    peak = e["peak"] / GIB
    lines += [
        f"resident {e['resident'] / GIB:.2f} + max(rollout {e['rollout'] / GIB:.2f}, training "
        f"{e['training'] / GIB:.2f}) = PEAK {peak:.2f} GiB",
        "(rollout and training alternate, never overlap; weights, adapters and optimizer state stay throughout)",
        f"under a T4's 15.0 GiB: {'yes' if peak < 15 else 'no'}; "
        f"under a 24 GB card's 24.0 GiB: {'yes' if peak < 24 else 'no'}",
    ]
    return "\n".join(lines)


def boolean(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def arguments(description):
    """train_paw.py's flags that the estimates read (the same names and defaults); time_estimate.py adds its own."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    flag = parser.add_argument
    flag("--model", "--model_name_or_path", default="Qwen/Qwen2.5-7B-Instruct",
         help=f"a preset ({', '.join(PRESETS)}) or a local model folder or config.json")
    flag("--load_in_4bit", type=boolean, nargs="?", const=True, default=True, help="NF4 base (else 16-bit)")
    flag("--use_bnb_nested_quant", type=boolean, nargs="?", const=True, default=True, help="NF4 double quantisation")
    flag("--use_peft", type=boolean, nargs="?", const=True, default=True, help="LoRA (else full fine-tuning)")
    flag("--lora_r", type=int, default=DEFAULTS["lora_r"])
    flag("--per_device_train_batch_size", type=int, default=DEFAULTS["per_device_train_batch_size"])
    flag("--gradient_accumulation_steps", type=int, default=DEFAULTS["gradient_accumulation_steps"])
    flag("--rollout_episodes", type=int, help="episodes generated together (default: TRL's generation batch, "
                                              "per_device_train_batch_size x gradient_accumulation_steps)")
    flag("--max_completion_length", type=int, default=DEFAULTS["max_completion_length"])
    flag("--max_action_tokens", type=int, default=DEFAULTS["max_action_tokens"])
    flag("--prompt_tokens", type=int, default=PROMPT_TOKENS, help="tokens of an episode's prompt")
    flag("--turn_tokens", type=int, default=TURN_TOKENS, help="tokens prefilled at the start of a turn")
    flag("--reuse_cache", type=boolean, nargs="?", const=True, default=True)
    return parser


def main(argv=None):
    parser = arguments(__doc__.split("\n")[0])
    parser.add_argument("--overhead_gib", type=float, default=1.0, help="CUDA context and allocator slack")
    args = parser.parse_args(argv)
    episodes = args.per_device_train_batch_size * args.gradient_accumulation_steps
    settings = dict(
        quantization="nf4" if args.load_in_4bit else "bf16", lora_r=args.lora_r if args.use_peft else None,
        double_quant=args.use_bnb_nested_quant,
        rollout_episodes=args.rollout_episodes or episodes,
        episode_tokens=args.prompt_tokens + args.max_completion_length + args.max_action_tokens,
        micro_batch=args.per_device_train_batch_size, train_tokens=args.prompt_tokens + args.max_completion_length,
        turn_tokens=args.turn_tokens, reuse_cache=args.reuse_cache)
    try:
        shape = load_shape(args.model)
        e = estimate(shape, overhead_gib=args.overhead_gib, **settings)
    except (ValueError, OSError) as error:  # an unknown model, an unreadable config, NF4 without LoRA
        parser.error(str(error))
    print(format_table(e, shape, args.model, **settings))
    print("\n(the time of the same run on each card: python time_estimate.py with the same flags)")


if __name__ == "__main__":
    main()
