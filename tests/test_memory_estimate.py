"""memory_estimate.py: each term by hand on a tiny shape, the 7B preset against published figures, the activation
terms against a measured LoRA forward/backward, the CLI."""

import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import memory_estimate as me

REPO = Path(__file__).resolve().parent.parent
TINY = me.Shape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=1000, tied=False)
SETTINGS = dict(quantization="nf4", lora_r=8, rollout_episodes=3, episode_tokens=100, micro_batch=2, train_tokens=50,
                turn_tokens=10, overhead_gib=0.5)


def test_every_term_of_a_tiny_shape_matches_a_hand_computation():
    e = me.estimate(TINY, **SETTINGS)
    linear = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)  # q, k, v, o, gate, up, down: 73,728
    lora = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))  # r * (in + out) each: 16,384
    assert e["weights"] == pytest.approx(linear * (4 + 8 / 64 + 32 / 16384) / 8 + (2 * 1000 * 64 + 5 * 64) * 2)
    assert e["trainable_state"] == lora * (4 + 4 + 4)  # fp32 adapters and two AdamW moments
    assert e["cuda_overhead"] == 2**29
    assert e["kv_cache"] == (2 + 1) * 3 * 100 * (2 * 2 * 16) * 2  # 2 layers + 1 layer during torch.cat, K and V
    assert e["attention_workspace"] == 2 * 3 * 100 * 64 * 2 + 3 * 10 * 100 * 3
    assert e["prefill_activations"] == 3 * 10 * (3 * 128 + 4 * 64) * 2
    assert e["generation_logits"] == 3 * 1000 * (2 + 16)
    assert e["gradients"] == lora * (4 + 2)
    assert e["checkpoints"] == 3 * 2 * 50 * 64 * 2
    per_token = 2 * 4 * 64 + 2 * (2 * 64 + 64) + 4 * 2 * 64 + 6 * 2 * 128  # norms, inputs, attention, MLP: 2,944
    assert e["recomputed_layer"] == 100 * per_token + 2 * 50 * 50 * 3
    assert e["lm_head"] == 100 * 32768 * 2 + 100 * 64 * (2 + 4)
    assert e["resident"] == e["weights"] + e["trainable_state"] + 2**29
    assert e["rollout"] == e["kv_cache"] + e["attention_workspace"] + e["prefill_activations"] + e["generation_logits"]
    assert e["training"] == e["gradients"] + e["checkpoints"] + e["lm_head"]  # the 100-token head beats one layer
    assert e["peak"] == e["resident"] + max(e["rollout"], e["training"])

    bf16 = me.estimate(TINY, **{**SETTINGS, "quantization": "bf16"})
    assert bf16["weights"] == (linear + 2 * 1000 * 64 + 5 * 64) * 2
    assert bf16["recomputed_layer"] - e["recomputed_layer"] == 100 * 2 * (5 * 64 + 64 + 128)  # peft's input copies
    full = me.estimate(TINY, **{**SETTINGS, "quantization": "bf16", "lora_r": None})
    params = linear + 2 * 1000 * 64 + 5 * 64
    assert (full["trainable_state"], full["gradients"]) == (params * 4, params * 2)
    assert full["lm_head"] - e["lm_head"] == 1000 * 64 * 4  # the lm_head's fp32 weight gradient
    no_reuse = me.estimate(TINY, **{**SETTINGS, "reuse_cache": False})
    assert no_reuse["kv_cache"] == 3 * 3 * 100 * 64 * 2  # one cache of 2 layers + 1 layer
    assert no_reuse["prefill_activations"] == 10 * e["prefill_activations"]  # every turn re-reads all 100 tokens


def test_qwen25_7b_nf4_matches_published_figures():
    shape = me.PRESETS["Qwen/Qwen2.5-7B-Instruct"]
    # What peft's print_trainable_parameters reports for LoRA r=16 on all linear layers.
    assert me.parameter_counts(shape, lora_r=16)[2] == 40_370_176
    # unsloth/Qwen2.5-7B-Instruct-bnb-4bit (NF4, double quantisation): model.safetensors is 5.55 GB.
    nf4 = me.estimate(shape, quantization="nf4", lora_r=16)
    assert nf4["weights"] == pytest.approx(5.55e9, rel=0.01)
    # The model card's 7.61B parameters (https://huggingface.co/Qwen/Qwen2.5-7B-Instruct) in 16 bits.
    assert me.estimate(shape, quantization="bf16", lora_r=16)["weights"] == pytest.approx(2 * 7.61e9, rel=1e-3)


def test_more_episodes_or_tokens_need_more_memory_and_nf4_less_than_bf16():
    kv = [me.estimate(TINY, **{**SETTINGS, **change})["kv_cache"]
          for change in ({}, {"rollout_episodes": 6}, {"episode_tokens": 200})]
    assert kv[0] < kv[1] and kv[0] < kv[2]
    assert me.estimate(TINY, **{**SETTINGS, "micro_batch": 4})["training"] > me.estimate(TINY, **SETTINGS)["training"]
    for shape in me.PRESETS.values():
        nf4, bf16 = (me.estimate(shape, quantization=q, lora_r=16) for q in ("nf4", "bf16"))
        assert nf4["weights"] < 0.6 * bf16["weights"] and nf4["peak"] < bf16["peak"]


def test_a_4bit_base_needs_lora():
    with pytest.raises(ValueError, match="without LoRA"):
        me.estimate(TINY, quantization="nf4", lora_r=None)


def test_defaults_and_constants_follow_train_paw_and_trl():
    import trl.kernels.chunked_logprob
    import trl.trainer.utils
    from trl import ModelConfig

    import train_paw

    flags, paw = train_paw.default_flags(), train_paw.PaWArguments()
    assert me.DEFAULTS == dict(
        per_device_train_batch_size=flags["per_device_train_batch_size"],
        gradient_accumulation_steps=flags["gradient_accumulation_steps"],
        max_completion_length=flags["max_completion_length"], max_action_tokens=paw.max_action_tokens,
        lora_r=ModelConfig(model_name_or_path="x").lora_r)
    assert flags["load_in_4bit"] and flags["use_bnb_nested_quant"] and flags["model_name_or_path"] in me.PRESETS
    assert me.LOGPROB_VOCAB_CHUNK == trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
    assert me.LOGPROB_TOKEN_CHUNK == trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE


def test_a_local_model_folder_gives_its_shape(tiny_path):
    from tiny_model import TINY_SHAPE

    shape = me.load_shape(tiny_path)
    assert (shape.layers, shape.hidden, shape.kv_heads) == (TINY_SHAPE["num_hidden_layers"], TINY_SHAPE["hidden_size"],
                                                            TINY_SHAPE["num_key_value_heads"])
    assert me.load_shape(str(Path(tiny_path) / "config.json")) == shape


class LiveTensorPeak(TorchDispatchMode):
    """The peak bytes of live tensor storages created inside the mode (storages that existed before are skipped)."""

    def __init__(self, *existing):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in existing}
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and storage.nbytes() and key not in self.live and key not in self.skip:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def test_training_terms_match_a_measured_lora_forward_backward(monkeypatch):
    """Real TRL fused head, peft LoRA (fp32 adapters) on a bf16 Qwen2, checkpointing, autocast: the same code path
    as on a GPU for a 16-bit base. The vocabulary tile is shrunk so that, as on a GPU at real sizes, the layer
    recompute (not the head's tile buffer) sets the peak; two micro-batches, so that all gradients exist."""
    import trl.trainer.utils
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    monkeypatch.setattr(trl.trainer.utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 128)
    monkeypatch.setattr(me, "LOGPROB_VOCAB_CHUNK", 128)
    config = Qwen2Config(hidden_size=256, intermediate_size=1344, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", lora_dropout=0.0))
    model.enable_input_require_grads()
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    rows, tokens = 2, 384
    ids = torch.randint(0, 512, (rows, tokens))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding, so a 4-D attention mask is built as in a real batch
    labels = ids.masked_fill(mask == 0, -100)
    tracker = LiveTensorPeak(*model.parameters(), *model.buffers(), ids, mask, labels)
    with tracker:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
            (out.log_probs.sum() + out.entropy.sum()).backward()
            del out
    estimate = me.estimate(me.Shape.from_config(config), quantization="bf16", lora_r=16, micro_batch=rows,
                           train_tokens=tokens)
    assert estimate["recomputed_layer"] > estimate["lm_head"]
    assert tracker.peak == pytest.approx(estimate["training"], rel=0.05)


def run(*args):
    return subprocess.run([sys.executable, "memory_estimate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_the_cli_prints_a_labelled_estimate_with_the_peak_arithmetic():
    result = run("--model", "Qwen/Qwen2.5-7B-Instruct", "--load_in_4bit", "--lora_r", "16", "--rollout_episodes", "16",
                 "--max_completion_length", "6144", "--per_device_train_batch_size", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ESTIMATE (not measured)")
    e = me.estimate("Qwen/Qwen2.5-7B-Instruct")  # the defaults are the same run
    assert f"= PEAK {e['peak'] / me.GIB:.2f} GiB" in result.stdout
    assert "max(rollout" in result.stdout and "never overlap" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--model", "Qwen/Qwen9-1T"], "unknown model 'Qwen/Qwen9-1T': not a preset"),
    (["--use_peft", "false"], "cannot be trained without LoRA"),
    (["--load_in_4bit", "maybe"], "expected true or false"),
])
def test_bad_flags_exit_2_with_a_message_and_no_traceback(args, message):
    result = run(*args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and not result.stdout


@pytest.mark.parametrize("name,billions", [
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.49), ("Qwen/Qwen2.5-1.5B-Instruct", 1.54), ("Qwen/Qwen2.5-3B-Instruct", 3.09),
    ("Qwen/Qwen2.5-7B-Instruct", 7.61), ("meta-llama/Llama-3.2-1B-Instruct", 1.23),
    ("meta-llama/Llama-3.2-3B-Instruct", 3.21),
])
def test_preset_shapes_give_the_parameter_counts_of_the_model_cards(name, billions):
    """'Number of Parameters' on each model's Hugging Face card (rounded to 10M there)."""
    linear, other, _ = me.parameter_counts(me.PRESETS[name])
    assert (linear + other) / 1e9 == pytest.approx(billions, rel=0.01)
