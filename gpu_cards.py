"""The GPUs our users have, with their vendors' published figures: what the time estimate (memory_estimate.py) knows
about a card. `--gpu NAME` names one (train_paw.py, memory_estimate.py); on a GPU it is recognised from its name.

Figures are dense (no 2:4 sparsity) 16-bit tensor-core rates with FP32 accumulation, the rate PyTorch's fp16/bf16
matmuls get, and memory bandwidth. Where the vendor printed a rate "with sparsity" it is halved. memory_gib is what
nvidia-smi reports as total. The sources and their caveats are collected in ../shared/notes/gpu-cards.md; each row
names its own. The speed of our code on a card is another matter: time_estimate.py's efficiency constants, fitted
to published end-to-end measurements (calibration.py).

sms (streaming multiprocessors: CUDA cores / cores per SM in the same whitepapers and datasheets; 64 per SM on Turing
and the A100, 128 on GA10x, Ada and Hopper) and compute_capability (https://developer.nvidia.com/cuda-gpus) decide
which kernel bitsandbytes runs for a 4-bit layer. hosts names the two calibration machines (time_estimate.HOST_SPEED)
whose CPUs bound how fast the host drives this card: a T4 on Colab or Kaggle, a data-center card in a cloud server,
a GeForce card in a desktop or a rented server.
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float  # as nvidia-smi reports it
    bandwidth_gbs: float  # GB/s (10^9 bytes)
    tflops: float  # dense fp16/bf16 tensor-core TFLOPS, FP32 accumulation
    bf16: bool  # compute capability >= 8.0; else training runs in fp16
    architecture: str  # turing, ampere, ada, hopper: how fast bitsandbytes' 4-bit kernels decode (memory_estimate.py)
    device_name: str  # a pattern matching torch.cuda.get_device_name()
    source: str
    sms: int = 0
    compute_capability: tuple = (0, 0)
    hosts: tuple = ("bnb-h100", "bnb-h100")  # (fast, slow) calibration machines: see the module docstring


COLAB, CLOUD, DESKTOP = ("bnb-t4", "colab-t4"), ("bnb-h100", "bnb-t4"), ("bnb-4090", "bnb-h100")


CARDS = {
    "t4": Card("T4", 15.0, 320, 65, False, "turing", r"\bT4\b",
               "NVIDIA T4 datasheet (65 TFLOPS mixed precision) and product page (320+ GB/s)", 40, (7, 5), COLAB),
    "l4": Card("L4", 22.5, 300, 121, True, "ada", r"\bL4\b",
               "NVIDIA L4 datasheet (242 TFLOPS with sparsity, 300 GB/s)", 58, (8, 9), CLOUD),
    "a10g": Card("A10G", 22.5, 600, 70, True, "ampere", r"\bA10G\b",
                 "NVIDIA/AWS A10G datasheet (140 TFLOPS with sparsity, 600 GB/s)", 80, (8, 6), CLOUD),
    "a10": Card("A10", 22.5, 600, 125, True, "ampere", r"\bA10\b",
                "NVIDIA A10 datasheet (250 TFLOPS with sparsity, 600 GB/s)", 72, (8, 6), CLOUD),
    "rtx3090": Card("RTX 3090", 24.0, 936, 71, True, "ampere", r"RTX 3090(?! Ti)",
                    "NVIDIA GA102 whitepaper (71 TFLOPS with FP32 accumulation, 936 GB/s)", 82, (8, 6), DESKTOP),
    "rtx4090": Card("RTX 4090", 24.0, 1008, 165.2, True, "ada", r"RTX 4090(?! D)",
                    "NVIDIA Ada whitepaper, appendix A (165.2 TFLOPS with FP32 accumulation, 1008 GB/s)", 128, (8, 9),
                    DESKTOP),
    "a6000": Card("RTX A6000", 48.0, 768, 154.8, True, "ampere", r"RTX A6000",
                  "NVIDIA RTX A6000 datasheet (309.7 TFLOPS with sparsity, 768 GB/s)", 84, (8, 6), CLOUD),
    "l40s": Card("L40S", 45.0, 864, 362, True, "ada", r"\bL40S\b",
                 "NVIDIA L40S datasheet (733 TFLOPS with sparsity, 864 GB/s)", 142, (8, 9), CLOUD),
    "a100-40gb": Card("A100 40GB", 40.0, 1555, 312, True, "ampere", r"A100.*40GB",
                      "NVIDIA A100 datasheet (312 TFLOPS, 1,555 GB/s for both the PCIe and SXM4 40 GB)", 108, (8, 0),
                      CLOUD),
    "a100-80gb": Card("A100 80GB SXM", 80.0, 2039, 312, True, "ampere", r"A100-SXM4?-80GB",
                      "NVIDIA A100 datasheet (312 TFLOPS, 2,039 GB/s)", 108, (8, 0), CLOUD),
    "a100-80gb-pcie": Card("A100 80GB PCIe", 80.0, 1935, 312, True, "ampere", r"A100 80GB PCIe|A100-PCIE-80GB",
                           "NVIDIA A100 datasheet (312 TFLOPS, 1,935 GB/s)", 108, (8, 0), CLOUD),
    "h100": Card("H100 SXM", 79.6, 3350, 989.5, True, "hopper", r"H100.*(HBM3|SXM)",
                 "NVIDIA H100 datasheet (1,979 TFLOPS with sparsity, 3,350 GB/s)", 132, (9, 0), CLOUD),
    "h100-pcie": Card("H100 PCIe", 79.6, 2000, 756.5, True, "hopper", r"H100 PCIe",
                      "NVIDIA H100 datasheet (1,513 TFLOPS with sparsity, 2,000 GB/s)", 114, (9, 0), CLOUD),
    "h200": Card("H200", 139.0, 4800, 989.5, True, "hopper", r"\bH200\b",
                 "NVIDIA H200 product page (1,979 TFLOPS with sparsity, 4,800 GB/s; 141 GB as sold, of which "
                 "our device tool's H200 machines report about 139 GiB)", 132, (9, 0), CLOUD),
}

# With no GPU, gpu_check.py's smoke run needs a "card" for the time estimate: one core of our CI machine (bench.py's
# training step runs at about 50 GFLOP/s) and a memory bandwidth we assume. It only shows that both sides are computed.
SMOKE_CPU = Card("CPU (smoke size)", 0, 10, 0.05, False, "cpu", "", "bench.py on our 2-core CPU; bandwidth assumed")
# FP32 peak TFLOPS (no tensor cores; PyTorch's fp32 matmuls use none unless TF32 is on, and a card without bf16 has no
# TF32) of the cards that train in fp16: where fp16 overflows, float32 is what is left (plan.overflow_remedies).
FP32_TFLOPS = {"T4": 8.1}  # NVIDIA T4 datasheet: "Single-Precision 8.1 TFLOPS"


def find_card(name):
    """The card named by `--gpu` (a key of CARDS, any case) or by torch.cuda.get_device_name(); None if unknown."""
    key = name.strip().lower().replace(" ", "").replace("_", "-")
    if key in CARDS:
        return CARDS[key]
    return next((card for card in CARDS.values() if re.search(card.device_name, name, re.IGNORECASE)), None)
