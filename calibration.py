"""Published end-to-end measurements that the time estimate (time_estimate.py) is fitted to and checked against, each
with its source and the software it was measured with. A row goes in only if its number was read at its source.

    python calibration.py                   # every row: measured, and the estimate's low and high ends
    python calibration.py gpu_check.json    # ... and the rows of your own card

Kinds of rows (seconds, always of the whole batch):
- decode: one decoding step (optimum-benchmark's per-token latency: the time between two tokens, prefill excluded);
- generate: a whole generate call divided by its new tokens (decoding, plus the prefill's share);
- prefill: a generate call of one new token (the prompt's forward, whose last logits give that token);
- train: one optimizer step of `micro_batches` micro-batches of `batch` sequences of `prompt_tokens` tokens;
- rl_step: one train_paw.py step, as gpu_check.py measures it; `settings` holds time_estimate.estimate_time's
  arguments for it. gpu_check.json holds one such row per shape ("measurement"): `Measurement(**row)` joins it to
  MEASUREMENTS, and tests/test_time_estimate.py then checks the estimate against it like every other row.

Not here, and why: the Qwen README's Q-LoRA rows (a GPTQ base through auto-gptq, not bitsandbytes); text-generation-
inference's tables (its own model code and kernels, not transformers' generate); bitsandbytes' 0.50 kernel notes (kernel
timings, not end-to-end); the Hugging Face blog's T4 and A100 generate charts (images, no numbers to read).
"""

import json
import sys
from dataclasses import dataclass, field

from gpu_cards import CARDS, SMOKE_CPU
from memory_estimate import PRESETS, Shape, load_shape
from time_estimate import ENDS, HOST_SPEED, decode_seconds, estimate_time, prefill_seconds, training_seconds

# The models of the rows that memory_estimate.PRESETS does not hold, from their config.json on the Hugging Face Hub.
SHAPES = {
    "meta-llama/Llama-3.1-8B": Shape(32, 4096, 14336, 32, 8, 128, 128256, False),
    "meta-llama/Llama-3.1-70B": Shape(80, 8192, 28672, 64, 8, 128, 128256, False),
    "Qwen/Qwen2.5-14B-Instruct": Shape(48, 5120, 13824, 40, 8, 128, 152064, False),
    "Qwen/Qwen2.5-32B-Instruct": Shape(64, 5120, 27648, 40, 8, 128, 152064, False),
    "meta-llama/Llama-2-13b-chat-hf": Shape(40, 5120, 13824, 40, 40, 128, 32000, False),
    # Qwen (1): its fused c_attn (3 x hidden) and MLP halves (intermediate_size / 2 each) are these linears.
    "Qwen/Qwen-7B-Chat": Shape(32, 4096, 11008, 32, 32, 128, 151936, False),
    "Qwen/Qwen-1_8B-Chat": Shape(24, 2048, 5504, 16, 16, 128, 151936, False),
}


@dataclass(frozen=True)
class Measurement:
    kind: str  # decode, generate, prefill, train, rl_step (see the module docstring)
    card: str  # a gpu_cards.CARDS key ("cpu": gpu_check.py's smoke run)
    machine: str  # a time_estimate.HOST_SPEED key, or "" for a host we have no figure for (the card's range)
    model: str  # a key of SHAPES or memory_estimate.PRESETS, or a local folder
    quantization: str  # "16bit", "nf4" or "nf4-dq" (double quantisation)
    batch: int  # sequences decoded together, or a micro-batch's rows
    prompt_tokens: int  # tokens before decoding starts (train: a sequence's tokens)
    new_tokens: int  # tokens generated per sequence
    seconds: float
    software: str
    source: str
    micro_batches: int = 1
    lora_r: int | None = None
    settings: dict = field(default_factory=dict)  # rl_step: estimate_time's arguments


def _rows(kind, card, machine, model, quantization, seconds, batches, prompt, new, software, source):
    return [Measurement(kind, card, machine, model, quantization, batch, prompt, new, value, software, source)
            for batch, value in zip(batches, seconds)]


BNB = dict(software="bitsandbytes 0.45.0.dev, transformers 4.46.3, accelerate 1.1.1, torch 2.5.1 (CUDA 12.1; 12.4 on "
                    "the RTX 4090), optimum-benchmark 6e6b1036; prompt 64 and 64 new tokens, the defaults of its "
                    "inference_benchmark.py (the README does not restate them); greedy",
           source="https://github.com/bitsandbytes-foundation/bitsandbytes/blob/main/benchmarking/README.md "
                  "(\"Mean Latency (s)\" of v0.45.0.dev; throughput = batch / latency)")
OPTIMUM = dict(software="transformers and torch versions not stated (benchmark_gptq.py of August 2023: eager "
                        "attention), fp16, greedy; per-token latency = generate time / new tokens",
               source="https://github.com/huggingface/optimum/blob/main/tests/benchmark/README.md (GPTQ benchmark, "
                      "rows gptq=False; A100-SXM4-80GB)")
HF_BLOG = dict(software="bitsandbytes >= 0.41.1, 4-bit with bnb_4bit_compute_dtype float16 (quant type not stated: "
                        "transformers' default, FP4, takes NF4's kernels and bytes), no double quantisation; the "
                        "harness and A100 of optimum's rows (its fp16 and GPTQ rows repeat theirs)",
               source="https://huggingface.co/blog/overview-quantization-transformers (the bitsandbytes rows of its "
                      "batch 1 and 16 tables, headed \"forward pass only\" but holding the generate benchmark's rows)")
COLAB = dict(software="versions not stated (pip install torch transformers accelerate bitsandbytes); 20 prompts x 128 "
                      "max new tokens, greedy, after one warm-up; prompt lengths not stated",
             source="https://kd.iw.mk/dohu012/llm-quantization-benchmark (\"Google Colab T4\", FP16 24.4 tokens/s)")
QWEN = dict(software="transformers 4.32.0 (the repository's requirements.txt when the table was added), PyTorch 2.0, "
                     "CUDA 11.8, flash-attention 2; LoRA r=64 on every linear (finetune.py), gradient checkpointing, "
                     "bf16; batch 1, gradient accumulation 8; s/iter = an optimizer step",
            source="https://github.com/QwenLM/Qwen/blob/main/README.md#profiling-of-memory-and-speed (rows \"LoRA\", "
                   "A100-SXM4-80G; table added in commit e8e1596)")

Q3, L8, Q14, Q32, L70, L13 = ("Qwen/Qwen2.5-3B-Instruct", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-14B-Instruct",
                              "Qwen/Qwen2.5-32B-Instruct", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-2-13b-chat-hf")
ONE_8_32, LENGTHS = (1, 8, 32), (256, 512, 1024, 2048, 4096, 8192)
MEASUREMENTS = [
    *_rows("decode", "t4", "bnb-t4", Q3, "16bit", (0.0390, 0.0422, 0.0601), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "t4", "bnb-t4", Q3, "nf4", (0.0608, 0.0960, 0.1150), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "t4", "bnb-t4", Q3, "nf4-dq", (0.0736, 0.1042, 0.1215), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "rtx4090", "bnb-4090", L8, "16bit", (0.0211, 0.0239, 0.0304), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "rtx4090", "bnb-4090", L8, "nf4", (0.0148, 0.0425, 0.0461), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "rtx4090", "bnb-4090", L8, "nf4-dq", (0.0175, 0.0443, 0.0471), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "rtx4090", "bnb-4090", Q14, "nf4", (0.0214, 0.0696), (1, 8), 64, 64, **BNB),
    *_rows("decode", "rtx4090", "bnb-4090", Q14, "nf4-dq", (0.0256, 0.0719), (1, 8), 64, 64, **BNB),
    *_rows("decode", "h100", "bnb-h100", L8, "16bit", (0.0244, 0.0255, 0.0261), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "h100", "bnb-h100", L8, "nf4", (0.0331, 0.0476, 0.0486), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "h100", "bnb-h100", L8, "nf4-dq", (0.0411, 0.0566, 0.0577), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "h100", "bnb-h100", Q32, "16bit", (0.0508, 0.0525, 0.0547), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "h100", "bnb-h100", Q32, "nf4", (0.0707, 0.1154, 0.1246), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "h100", "bnb-h100", Q32, "nf4-dq", (0.0860, 0.1209, 0.1298), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "h100", "bnb-h100", L70, "nf4", (0.0833, 0.2348, 0.2491), ONE_8_32, 64, 64, **BNB),
    *_rows("decode", "h100", "bnb-h100", L70, "nf4-dq", (0.1052, 0.2423, 0.2580), ONE_8_32, 64, 64, **BNB),
    *_rows("generate", "a100-80gb", "optimum-a100", L13, "16bit", (0.036958, 0.03735, 0.03789, 0.04737, 0.06994),
           (1, 2, 4, 8, 16), 512, 512, **OPTIMUM),
    *_rows("prefill", "a100-80gb", "optimum-a100", L13, "16bit", (0.09638, 0.16995, 0.30599, 0.60047, 1.20907),
           (1, 2, 4, 8, 16), 512, 1, **OPTIMUM),
    *_rows("generate", "a100-80gb", "optimum-a100", L13, "nf4", (0.05200, 0.11398), (1, 16), 512, 512, **HF_BLOG),
    *_rows("generate", "t4", "colab-t4", "Qwen/Qwen2.5-0.5B-Instruct", "16bit", (1 / 24.4,), (1,), 0, 128, **COLAB),
    *[Measurement("train", "a100-80gb", "", "Qwen/Qwen-7B-Chat", "16bit", 1, length, 0, seconds, micro_batches=8,
                  lora_r=64, **QWEN) for length, seconds in zip(LENGTHS, (1.2, 1.5, 2.8, 5.2, 10.1, 21.3))],
    *[Measurement("train", "a100-80gb", "", "Qwen/Qwen-1_8B-Chat", "16bit", 1, length, 0, seconds, micro_batches=8,
                  lora_r=64, **QWEN) for length, seconds in zip(LENGTHS, (1.0, 1.0, 1.1, 1.7, 3.3, 6.8))],
]
# Rows the estimate does not model, and why (the test checks every other row; the README says which these are).
TRAINING_HOST_BOUND = 4096  # train rows shorter than this are bound by launches and the optimizer, not by FLOPs:
# the estimate has no host floor for training, whose micro-batches in train_paw.py hold thousands of tokens


def shape_of(model):
    return SHAPES.get(model) or PRESETS.get(model) or load_shape(model)


def estimated(m, end="high"):
    """The time estimate's seconds for the row `m`, at one end of its range. A row measured on a machine we know gets
    that machine's host speed; every decoding row was measured with bitsandbytes 0.45 or older."""
    shape, card = shape_of(m.model), CARDS[m.card] if m.card != "cpu" else SMOKE_CPU
    host = HOST_SPEED[m.machine] if m.machine else HOST_SPEED[card.hosts[ENDS.index(end)]]
    quantization = "nf4" if m.quantization.startswith("nf4") else "bf16"
    model = dict(quantization=quantization, double_quant=m.quantization == "nf4-dq", lora_r=m.lora_r, end=end,
                 host=host, bnb="0.45")
    if m.kind == "train":
        return m.micro_batches * training_seconds(shape, card, m.prompt_tokens, m.batch, quantization=quantization,
                                                  lora_r=m.lora_r, causal=True, end=end)
    if m.kind == "rl_step":
        return estimate_time(shape, card, **m.settings, end=end, host=host if m.machine else None)["step"]
    prompt = max(m.prompt_tokens, 1)
    decode = decode_seconds(shape, card, m.batch, prompt + m.new_tokens / 2, **model)
    if m.kind == "decode":
        return decode
    prefill = prefill_seconds(shape, card, m.batch, prompt, prompt, **model)
    return prefill if m.kind == "prefill" else decode + prefill / m.new_tokens


def table(rows):
    lines = ["| kind | card | model | 4-bit | batch | tokens | measured s | estimate s (low-high) | measured / high |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in rows:
        low, high = (estimated(m, end) for end in ENDS)
        tokens = f"{m.prompt_tokens}+{m.new_tokens}" if m.kind != "train" else f"{m.prompt_tokens} x {m.micro_batches}"
        lines.append(f"| {m.kind} | {m.card} | {m.model.split('/')[-1]} | {m.quantization} | {m.batch} | {tokens} | "
                     f"{m.seconds:.4g} | {low:.4g}-{high:.4g} | {m.seconds / high:.2f} |")
    return "\n".join(lines)


def main(paths):
    rows = list(MEASUREMENTS)
    for path in paths:  # gpu_check.py's JSON: one measurement per shape it ran
        rows += [Measurement(**shape["measurement"]) for shape in json.loads(open(path).read())["shapes"]
                 if shape.get("measurement")]  # a card gpu_cards.py does not know has no time estimate
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
