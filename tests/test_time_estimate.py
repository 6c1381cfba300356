"""The time estimate (time_estimate.py) and the cards it knows (gpu_cards.py): the published measurements it must
reproduce (calibration.py), bitsandbytes' kernel choice it mirrors, the arithmetic by hand for the T4 plan of the
default model, how it grows, and the plan and CLI that print it as a range."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

import memory_estimate as me
import plan
import time_estimate as te
import train_paw
from calibration import MEASUREMENTS, TRAINING_HOST_BOUND, estimated
from gpu_cards import CARDS, find_card

REPO = Path(__file__).resolve().parent.parent
SEVEN_B = me.PRESETS["Qwen/Qwen2.5-7B-Instruct"]


def test_every_card_has_its_published_peak_and_bandwidth_sms_and_hosts_and_a_source():
    for key, card in CARDS.items():
        assert card.tflops > 0 and card.bandwidth_gbs > 0 and card.memory_gib > 0 and card.sms > 0, key
        assert "TFLOPS" in card.source and "GB/s" in card.source, key
        assert card.architecture in te.DECODE_EFFICIENCY and card.bf16 == (card.compute_capability >= (8, 0)), key
        architecture = {(7, 5): "turing", (8, 0): "ampere", (8, 6): "ampere", (8, 9): "ada", (9, 0): "hopper"}
        assert card.architecture == architecture[card.compute_capability], key
        fast, slow = card.hosts
        assert te.HOST_SPEED[fast] <= te.HOST_SPEED[slow], key
    # The vendors' figures as ../shared/notes/gpu-cards.md lists them (dense, FP32 accumulation).
    assert (CARDS["t4"].tflops, CARDS["t4"].bandwidth_gbs) == (65, 320)
    assert (CARDS["rtx4090"].tflops, CARDS["a10g"].tflops, CARDS["h100"].tflops) == (165.2, 70, 989.5)
    assert (CARDS["t4"].sms, CARDS["a100-40gb"].sms, CARDS["h100"].sms, CARDS["h100-pcie"].sms) == (40, 108, 132, 114)


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
    assert layout == (4096, 2, 8) and model_args.load_in_4bit  # 7B's 16-bit weights do not fit beside training
    assert (paw.max_action_tokens, paw.max_env_steps, args.steps_per_generation) == (256, 20, 8)
    bandwidth, peak = 320e9, 65e12  # the T4 datasheet: 65 TFLOPS, 320 GB/s
    weights, dequantize, compute = te.DECODE_EFFICIENCY["turing"]  # fitted to bitsandbytes' T4 rows
    # Qwen2.5-7B per layer: q and o 3584x3584, k and v 3584x512, gate, up and down 3584x18944; 28 layers.
    shapes = [(3584, 3584), (512, 3584), (512, 3584), (3584, 3584), (18944, 3584), (18944, 3584), (3584, 18944)]
    linear = 28 * sum(n * k for n, k in shapes)
    lora = 28 * 16 * sum(n + k for n, k in shapes)
    head, kv_per_token = 152064 * 3584, 2 * 4 * 128 * 2 * 28  # the LM head; K and V of 4 heads of 128, 16-bit
    assert (linear, lora) == (6_525_288_448, 40_370_176)
    # bitsandbytes 0.50 on a T4 (40 SMs): all seven linears take its fused kernel at decoding's 16 rows; a prefill's
    # 16 x 500 rows are past its 1536 and dequantize. The high end charges the fused kernel what dequantize cost.
    assert all(te.fused_4bit(CARDS["t4"], 16, n, k) for n, k in shapes)
    assert not any(te.fused_4bit(CARDS["t4"], 16 * 500, n, k) for n, k in shapes)
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # NF4 + double quantisation, bytes per weight
    four_bit = linear * ((nf4 + 2) / (bandwidth * dequantize) + 2 / (bandwidth * weights))  # to 16 bits, then read
    adapters_and_head = (4 * lora + 2 * head) / (bandwidth * weights)  # fp32 LoRA and the 16-bit LM head, read
    # The host at the high end: Colab's, with LoRA doubling a 16-bit layer's calls, and each 4-bit linear's own.
    layer = te.HOST_LAYER_16BIT * (1 + te.HOST_LORA["high"])
    host_decode = 28 * te.HOST_SPEED["colab-t4"] * (layer + 7 * (te.HOST_LINEAR_4BIT["fused"]
                                                                 + te.HOST_LINEAR_NESTED["fused"]))
    host_prefill = 28 * te.HOST_SPEED["colab-t4"] * (layer + 7 * (te.HOST_LINEAR_4BIT["dequantize"]
                                                                  + te.HOST_LINEAR_NESTED["dequantize"]))
    # Replies of 256 tokens and 500 tokens fed per turn: 756 a turn, so 6 turns fill the 4096-token cap.
    turns, B = math.ceil(4096 / 756), 16
    prefill = decode = 0.0
    for turn in range(turns):
        context = 600 + 756 * turn  # the prompt, and 756 a turn
        rows = B * (600 if turn == 0 else 500)
        flops = rows * (2 * (linear + lora) + 4 * context * 3584 * 28)
        prefill += max(flops / (peak * te.PREFILL_EFFICIENCY) + four_bit + adapters_and_head, host_prefill)
        context += 128  # the mean over the reply's 256 decoding steps
        flops = B * (2 * (linear + lora) + 4 * context * 3584 * 28 + 2 * head)
        cache = 3 * B * context * kv_per_token / (bandwidth * te.KV_EFFICIENCY["high"])  # torch.cat, and attention
        decode += 256 * max(flops / (peak * compute) + four_bit + adapters_and_head + cache, host_decode)
    environment = (16 / 2) * (1.34 + turns * 0.025)  # 2 workers, ALFWorld's reset and step times
    rows = 600 + 4096
    per_row = rows * (6 * linear + 8 * lora + 4 * rows * 3584 * 28 * 4) + 4096 * 4 * head
    training = 8 * (2 * per_row / (peak * te.TRAIN_EFFICIENCY["high"]) + 3 * four_bit)

    t = plan.step_time(SEVEN_B, CARDS["t4"], paw, args, model_args)  # the high end
    assert t["turns"] == turns and t["generated_tokens"] == B * turns * 256
    for key, by_hand in (("prefill", prefill), ("decode", decode), ("environment", environment),
                         ("training", training), ("step", prefill + decode + environment + training)):
        assert t[key] == pytest.approx(by_hand, rel=1e-9), key
    low = plan.step_time(SEVEN_B, CARDS["t4"], paw, args, model_args, end="low")
    assert low["prefill"] <= t["prefill"] and low["decode"] < t["decode"] and low["training"] < t["training"]
    # What the plan printed: the step's range, and 200 steps of it.
    printed = capsys.readouterr().out
    assert f"{plan.duration_range(low['step'], t['step'])} a step (rollout" in printed
    assert f"200 steps: {plan.duration_range(200 * low['step'], 200 * t['step'])} at worst" in printed


def time_of(**change):
    settings = dict(quantization="nf4", lora_r=16, episodes=16, micro_batch=4, max_completion_length=4096,
                    reply_tokens=256, max_env_steps=20, env_workers=2, env_reset_s=1.34, env_step_s=0.025)
    shape = change.pop("shape", SEVEN_B)
    return te.estimate_time(shape, change.pop("card", CARDS["t4"]), **{**settings, **change})


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
    # On every card the low end is the faster (a prefill's large matmuls are the same at both ends).
    for card in CARDS.values():
        low, high = time_of(card=card, end="low"), time_of(card=card)
        assert low["prefill"] <= high["prefill"] and low["decode"] < high["decode"], card.name
        assert low["training"] < high["training"], card.name


@pytest.mark.parametrize("key", list(CARDS))
def test_a_dry_run_for_each_card_prints_memory_and_time_as_a_range_and_exits(key, capsys):
    with pytest.raises(SystemExit) as stop:
        train_paw.parse_args(["--gpu", key, "--dry_run"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    card = CARDS[key]
    assert f"plan for a GPU of {card.memory_gib:.1f} GiB ({card.name})" in printed
    assert "estimated peak" in printed and f"ESTIMATE on the {card.name}" in printed and "not measured" in printed
    assert " a step (rollout " in printed and "200 steps: " in printed and "session" in printed
    assert "low end: " in printed and "high end: " in printed


def test_the_dry_run_command_prints_the_range_and_says_which_end_is_which():
    result = subprocess.run([sys.executable, "train_paw.py", "--gpu", "t4", "--dry_run"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "(T4)" in result.stdout and "micro-batch 2 x accumulation 8" in result.stdout
    assert "the worst case" in result.stdout and "typical 70-token replies" in result.stdout
    step = result.stdout.split("not measured: ")[1].split(" a step")[0]
    low, high = (float(end) for end in step.split()[0].split("-"))
    assert 0 < low < high and step.split()[1] == "min"
    # The default 200 steps pass two sessions at the high end: the warning names flags for about one session.
    assert "warning: by the estimate's high end this run takes" in result.stderr and "--max_steps" in result.stderr


def test_a_run_over_two_sessions_at_the_high_end_is_flagged_with_flags_that_finish_in_about_one(capsys):
    paw, args, model_args = train_paw.parse_args(["--gpu", "rtx4090", "--max_steps", "300"])
    warning = capsys.readouterr().err
    assert "warning: by the estimate's high end this run takes" in warning and "over two 12-hour sessions" in warning
    fewer, smaller = warning.split("about 12 h at the high end: ")[1].strip().split(" or ")
    steps = int(fewer.split()[1])
    assert steps * plan.step_time(SEVEN_B, CARDS["rtx4090"], paw, args, model_args)["step"] == pytest.approx(
        12 * 3600, rel=0.02)
    # The smaller model, with the plan it gets on that card, does all 300 steps in 12 hours at the high end.
    name = smaller.split()[1]
    paw, args, model_args = train_paw.parse_args(["--gpu", "rtx4090", "--max_steps", "300", *smaller.split()])
    assert 300 * plan.step_time(me.PRESETS[name], CARDS["rtx4090"], paw, args, model_args)["step"] <= 12 * 3600
    assert "warning: by the estimate" not in capsys.readouterr().err
    train_paw.parse_args(["--gpu", "rtx4090", "--max_steps", "80"])  # under two sessions at the high end
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


def test_the_time_cli_prints_every_card_or_the_one_named_and_bad_flags_exit_2():
    run = [sys.executable, "time_estimate.py", "--env_workers", "2"]
    everything = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert everything.returncode == 0, everything.stderr
    assert "ESTIMATE (not measured) of the time" in everything.stdout
    assert all(f"\n{card.name:<16}" in everything.stdout for card in CARDS.values())
    t4 = subprocess.run(run + ["--gpu", "t4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    low, high = (time_of(micro_batch=4, max_completion_length=6144, end=end)["step"] for end in te.ENDS)
    assert f"\n{'T4':<16}{f'{low:.0f}-{high:.0f} s':>16}" in t4.stdout and "H100" not in t4.stdout.split("sessions")[1]
    bad = subprocess.run(run + ["--gpu", "tpu9"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--gpu tpu9: unknown card" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------------------------------------------
# Calibration: what others measured end to end, and bitsandbytes' own kernel choice
# ----------------------------------------------------------------------------------------------------------------


def test_every_calibration_row_names_its_source_and_software_and_a_card_and_host_we_know():
    assert len(MEASUREMENTS) >= 70
    for m in MEASUREMENTS:
        assert m.source.startswith("https://") and m.software and m.seconds > 0, m
        assert m.card in CARDS and (m.machine in te.HOST_SPEED or (m.kind == "train" and not m.machine)), m


def test_the_estimate_reproduces_every_published_decoding_and_prefill_row_within_25_percent():
    rows = [m for m in MEASUREMENTS if m.kind in ("decode", "generate", "prefill")]
    assert {m.card for m in rows} == {"t4", "rtx4090", "h100", "a100-80gb"} and len(rows) >= 59
    off = [f"{m.kind} {m.card} {m.model} {m.quantization} batch {m.batch}: {estimated(m) / m.seconds:.2f}"
           for m in rows if not 0.75 <= estimated(m) / m.seconds <= 1.25]
    assert not off, off


def test_the_training_rows_bound_by_flops_lie_within_the_estimates_range_and_the_shorter_ones_are_named():
    rows = [m for m in MEASUREMENTS if m.kind == "train"]
    for m in rows:
        low, high = estimated(m, "low"), estimated(m, "high")
        if m.prompt_tokens >= TRAINING_HOST_BOUND:
            assert low <= m.seconds <= high, (m.model, m.prompt_tokens, low, m.seconds, high)
    # The rows left out: 256 tokens a sequence are bound by launches, not FLOPs; the estimate undercounts them.
    assert all(m.seconds > estimated(m, "high") for m in rows if m.prompt_tokens == 256)


def test_the_fused_4bit_choice_is_read_from_the_installed_bitsandbytes():
    # the CUDA branch's limits, not ROCm's (256), which ops.py assigns in its else branch
    assert te.bitsandbytes_dispatch()[1] == 1536
    sizes = [(o, i) for i, o in me.linear_shapes(SEVEN_B)]
    for card in CARDS.values():
        assert all(te.fused_4bit(card, 4, n, k) for n, k in sizes)  # up to 4 rows: always the fused kernel
        assert not any(te.fused_4bit(card, 1537, n, k) for n, k in sizes)
    # The reading of bitsandbytes 0.50: on an H100 at 16 rows the 7B's q, o and down dequantize while k, v,
    # gate and up are fused; its large weights dequantize above 512 rows.
    assert [te.fused_4bit(CARDS["h100"], 16, n, k) for n, k in sizes] == [False, True, True, False, True, True, False]
    assert not any(te.fused_4bit(card, 513, n, k) for card in CARDS.values() for n, k in sizes if n * k >= 4 << 20)
    assert not te.fused_4bit(CARDS["t4"], 2, 4096, 4000)  # an inner dimension off the 64-weight blocks


# ----------------------------------------------------------------------------------------------------------------
# A 16-bit base where it pays
# ----------------------------------------------------------------------------------------------------------------


def test_a_16_bit_base_is_planned_where_it_fits_at_the_same_cap_and_steps_faster(capsys):
    one_five = me.PRESETS["Qwen/Qwen2.5-1.5B-Instruct"]
    paw, args, model_args = train_paw.parse_args(["--gpu", "t4", "--model_name_or_path", "Qwen/Qwen2.5-1.5B-Instruct"])
    printed = capsys.readouterr().out
    assert not model_args.load_in_4bit and model_args.use_peft and "--load_in_4bit False" in printed
    assert "base      16-bit, not NF4" in printed
    # Your flag wins: NF4 as asked, with the same episode cap; the 16-bit plan is faster at both ends here.
    nf4 = train_paw.parse_args(["--gpu", "t4", "--model_name_or_path", "Qwen/Qwen2.5-1.5B-Instruct",
                                "--load_in_4bit", "true"])
    assert nf4[2].load_in_4bit and nf4[1].max_completion_length == args.max_completion_length
    for end in te.ENDS:
        assert (plan.step_time(one_five, CARDS["t4"], paw, args, model_args, end=end)["step"]
                < plan.step_time(one_five, CARDS["t4"], *nf4, end=end)["step"])
    assert "base      16-bit" not in capsys.readouterr().out


def test_nf4_stays_where_16_bit_weights_do_not_fit_and_16_bits_are_never_slower_where_planned(capsys):
    assert train_paw.parse_args(["--gpu", "t4"])[2].load_in_4bit  # the 7B in 16 bits does not fit a T4
    assert not train_paw.parse_args(["--gpu", "h100"])[2].load_in_4bit  # it does fit an H100
    for key in ("t4", "rtx4090", "h100"):
        for name, shape in me.PRESETS.items():
            planned = train_paw.parse_args(["--gpu", key, "--model_name_or_path", name])
            nf4 = train_paw.parse_args(["--gpu", key, "--model_name_or_path", name, "--load_in_4bit", "true"])
            if not planned[2].load_in_4bit:  # the same cap, and a faster step at the high end
                assert planned[1].max_completion_length == nf4[1].max_completion_length, (key, name)
                assert (plan.step_time(shape, CARDS[key], *planned)["step"]
                        < plan.step_time(shape, CARDS[key], *nf4)["step"]), (key, name)
