"""The time estimate (memory_estimate.estimate_time) and the cards it knows (gpu_cards.py): the arithmetic by hand for
the T4 plan of the default model, how it grows, and the plan and CLI that print it."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

import memory_estimate as me
import plan
import train_paw
from gpu_cards import CARDS, find_card

REPO = Path(__file__).resolve().parent.parent
SEVEN_B = me.PRESETS["Qwen/Qwen2.5-7B-Instruct"]


def test_every_card_has_its_published_peak_and_bandwidth_and_a_source():
    for key, card in CARDS.items():
        assert card.tflops > 0 and card.bandwidth_gbs > 0 and card.memory_gib > 0, key
        assert "TFLOPS" in card.source and "GB/s" in card.source, key
        assert card.architecture in me.NF4_DECODE_SPEEDUP and card.bf16 == (card.architecture != "turing"), key
    # The vendors' figures as ../shared/notes/gpu-cards.md lists them (dense, FP32 accumulation).
    assert (CARDS["t4"].tflops, CARDS["t4"].bandwidth_gbs) == (65, 320)
    assert (CARDS["rtx4090"].tflops, CARDS["a10g"].tflops, CARDS["h100"].tflops) == (165.2, 70, 989.5)


@pytest.mark.parametrize("device,key", [
    ("Tesla T4", "t4"), ("NVIDIA L4", "l4"), ("NVIDIA L40S", "l40s"), ("NVIDIA A10G", "a10g"), ("NVIDIA A10", "a10"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"),
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA GeForce RTX 3090", "rtx3090"), ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA RTX A6000", "a6000"),
    ("T4", "t4"), ("A100-80GB", "a100-80gb"), ("H100", "h100"),
])
def test_cards_are_recognised_by_their_device_name_or_their_key(device, key):
    assert find_card(device) is CARDS[key]


@pytest.mark.parametrize("device", ["NVIDIA GeForce RTX 3090 Ti", "NVIDIA H100 NVL", "AMD Instinct MI300X", "cpu"])
def test_a_card_we_have_no_figures_for_is_not_mistaken_for_another(device):
    assert find_card(device) is None


def t4_plan():
    return train_paw.parse_args(["--gpu", "t4", "--env_workers", "2"])


def test_the_default_run_on_a_t4_computed_by_hand(capsys):
    paw, args, model_args = t4_plan()
    # The T4 plan of Qwen2.5-7B-Instruct (NF4, LoRA r=16): 16 episodes, micro-batch 2 x 8, 4096-token episodes.
    layout = (args.max_completion_length, args.per_device_train_batch_size, args.gradient_accumulation_steps)
    assert layout == (4096, 2, 8)
    assert (paw.max_action_tokens, paw.max_env_steps, args.steps_per_generation) == (256, 20, 8)
    peak, bandwidth = 65e12, 320e9 * me.MEMORY_EFFICIENCY  # the T4 datasheet: 65 TFLOPS, 320 GB/s
    # Qwen2.5-7B per layer: q and o 3584x3584, k and v 3584x512, gate, up and down 3584x18944; 28 layers.
    linear = 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944)
    lora = 28 * 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    head, kv_per_token = 152064 * 3584, 2 * 4 * 128 * 2 * 28  # the LM head; K and V of 4 heads of 128, 16-bit
    assert (linear, lora) == (6_525_288_448, 40_370_176)
    # Replies of 256 tokens and 500 tokens fed per turn: 756 a turn, so 6 turns fill the 4096-token cap.
    turns, B = math.ceil(4096 / 756), 16
    host_forward = 28 * me.HOST_SECONDS_PER_LAYER  # Python and kernel launches of the 28 layers
    host_decode = host_forward + me.HOST_SECONDS_PER_DECODE_STEP
    dequantize = linear * (0.5 + 1 / 64 + 4 / (64 * 256) + 2 * 2) / bandwidth  # NF4 + double quant, to 16 bits
    prefill = decode = 0.0
    for turn in range(turns):
        start = 600 + 756 * turn  # tokens before the turn's new ones: the prompt, and 756 a turn
        new = 600 if turn == 0 else 500
        flops = B * new * (2 * (linear + lora) + 4 * start * 3584 * 28) + B * 2 * head
        prefill += max(flops / (peak * me.PREFILL_EFFICIENCY) + dequantize, host_forward)
        context = start + 128  # the mean over the reply's 256 decoding steps
        read = (linear * 2 / me.NF4_DECODE_SPEEDUP["turing"] + head * 2 + lora * 4) / bandwidth
        compute = B * (2 * (linear + lora) + 4 * context * 3584 * 28 + 2 * head) / (peak * me.PREFILL_EFFICIENCY)
        decode += 256 * max(compute, read + B * context * kv_per_token / bandwidth, host_decode)
    environment = (16 / 2) * (1.34 + turns * 0.025)  # 2 workers, ALFWorld's reset and step times
    rows = 600 + 4096
    per_row = rows * (6 * linear + 8 * lora + 4 * rows * 3584 * 28 * 4) + 4096 * 4 * head
    training = 8 * (2 * per_row / (peak * me.TRAIN_EFFICIENCY) + 3 * dequantize)

    t = plan.step_time(SEVEN_B, CARDS["t4"], paw, args, model_args)
    assert t["turns"] == turns and t["generated_tokens"] == B * turns * 256
    for key, by_hand in (("prefill", prefill), ("decode", decode), ("environment", environment),
                         ("training", training), ("step", prefill + decode + environment + training)):
        assert t[key] == pytest.approx(by_hand, rel=1e-9), key
    # What the plan printed: the same step, and 200 steps of it.
    printed = capsys.readouterr().out
    assert f"{plan.duration(t['step'])} a step (rollout {plan.duration(t['rollout'])}" in printed
    assert f"200 steps: {plan.duration(200 * t['step'])} at worst" in printed


def time_of(**change):
    settings = dict(quantization="nf4", lora_r=16, episodes=16, micro_batch=4, max_completion_length=4096,
                    reply_tokens=256, max_env_steps=20, env_workers=2, env_reset_s=1.34, env_step_s=0.025)
    shape = change.pop("shape", SEVEN_B)
    return me.estimate_time(shape, change.pop("card", CARDS["t4"]), **{**settings, **change})


def test_the_estimate_grows_with_episodes_tokens_and_model_size_as_the_arithmetic_says():
    base = time_of()
    double = time_of(episodes=32)
    assert double["training"] == pytest.approx(2 * base["training"])  # twice the micro-batches of the same rows
    assert double["rollout"] > base["rollout"]
    assert time_of(max_completion_length=6144)["step"] > base["step"]
    assert time_of(reply_tokens=128)["decode"] < base["decode"]
    fewer_turns = time_of(max_env_steps=3)
    assert fewer_turns["turns"] == 3 and fewer_turns["step"] < base["step"]
    sizes = [time_of(shape=me.PRESETS[f"Qwen/Qwen2.5-{size}-Instruct"])["step"] for size in ("0.5B", "1.5B", "3B")]
    assert sizes == sorted(sizes) and sizes[-1] < base["step"]
    # A faster card is faster; full fine-tuning of a 16-bit base trains more FLOPs than LoRA on it.
    assert time_of(card=CARDS["h100"])["step"] < time_of(card=CARDS["a100-40gb"])["step"] < base["step"]
    assert time_of(quantization="bf16", lora_r=None)["training"] > time_of(quantization="bf16")["training"]
    # Without cache reuse every turn prefills the whole history again.
    assert time_of(reuse_cache=False)["prefill"] > 2 * base["prefill"]


@pytest.mark.parametrize("key", list(CARDS))
def test_a_dry_run_for_each_card_prints_memory_and_time_and_exits(key, capsys):
    with pytest.raises(SystemExit) as stop:
        train_paw.parse_args(["--gpu", key, "--dry_run"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    card = CARDS[key]
    assert f"plan for a GPU of {card.memory_gib:.1f} GiB ({card.name})" in printed
    assert "estimated peak" in printed and f"ESTIMATE on the {card.name}" in printed and "not measured" in printed
    assert "a step (rollout" in printed and "200 steps:" in printed and "session" in printed


def test_the_dry_run_command_names_the_card():
    result = subprocess.run([sys.executable, "train_paw.py", "--gpu", "t4", "--dry_run"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "(T4)" in result.stdout and "micro-batch 2 x accumulation 8" in result.stdout
    assert "the worst case" in result.stdout and "typical 70-token replies" in result.stdout


def test_a_run_over_two_sessions_is_flagged_with_flags_that_finish_in_about_one(capsys):
    paw, args, model_args = train_paw.parse_args(["--gpu", "t4", "--max_steps", "400"])
    warning = capsys.readouterr().err
    assert "warning: by the estimate this run takes" in warning and "over two 12-hour sessions" in warning
    fewer, smaller = warning.split("about 12 h: ")[1].strip().split(" or ")
    steps = int(fewer.split()[1])
    assert steps * plan.step_time(SEVEN_B, CARDS["t4"], paw, args, model_args)["step"] == pytest.approx(12 * 3600,
                                                                                                       rel=0.02)
    # The smaller model, with the plan it gets on a T4, does all 400 steps in 12 hours by the estimate.
    name = smaller.split()[1]
    paw, args, model_args = train_paw.parse_args(["--gpu", "t4", "--max_steps", "400", *smaller.split()])
    assert 400 * plan.step_time(me.PRESETS[name], CARDS["t4"], paw, args, model_args)["step"] <= 12 * 3600
    assert "warning: by the estimate" not in capsys.readouterr().err
    train_paw.parse_args(["--gpu", "t4"])  # the default 200 steps: under two sessions
    assert "warning" not in capsys.readouterr().err


def test_an_unknown_gpu_gets_the_memory_plan_and_a_note(monkeypatch, capsys):
    monkeypatch.setattr(plan, "gpu_name", lambda: "NVIDIA H100 NVL")
    monkeypatch.setattr(plan, "gpu_memory_gib", lambda: 93.0)
    train_paw.parse_args([])
    printed = capsys.readouterr().out
    assert "plan for a GPU of 93.0 GiB (NVIDIA H100 NVL)" in printed and "estimated peak" in printed
    assert "time      no estimate: gpu_cards.py does not know the NVIDIA H100 NVL; --gpu names a card" in printed
    monkeypatch.setattr(plan, "gpu_name", lambda: "Tesla T4")  # a card it knows, found by its name
    monkeypatch.setattr(plan, "gpu_memory_gib", lambda: 15.0)
    train_paw.parse_args([])
    assert "ESTIMATE on the T4" in capsys.readouterr().out


def test_memory_estimates_cli_prints_the_time_on_every_card_or_the_one_named():
    run = [sys.executable, "memory_estimate.py", "--env_workers", "2"]
    everything = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert everything.returncode == 0, everything.stderr
    assert "ESTIMATE (not measured) of the time" in everything.stdout
    assert all(f"\n{card.name:<16}" in everything.stdout for card in CARDS.values())
    t4 = subprocess.run(run + ["--gpu", "t4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    step = time_of(micro_batch=4, max_completion_length=6144, env_workers=2)["step"]  # the CLI's defaults
    assert f"\n{'T4':<16}{step:>11.0f}s" in t4.stdout and "H100" not in t4.stdout.split("of the time")[1]
