"""The GPUs our users have, with their vendors' published figures: what the time estimate (memory_estimate.py) knows
about a card. `--gpu NAME` names one (train_paw.py, memory_estimate.py); on a GPU it is recognised from its name.

Figures are dense (no 2:4 sparsity) 16-bit tensor-core rates with FP32 accumulation, the rate PyTorch's fp16/bf16
matmuls get, and memory bandwidth. Where the vendor printed a rate "with sparsity" it is halved. memory_gib is what
nvidia-smi reports as total. The sources and their caveats are collected in ../shared/notes/gpu-cards.md; each row
names its own. The speed of our code on a card is another matter: memory_estimate.py's efficiency constants.
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


CARDS = {
    "t4": Card("T4", 15.0, 320, 65, False, "turing", r"\bT4\b",
               "NVIDIA T4 datasheet (65 TFLOPS mixed precision) and product page (320+ GB/s)"),
    "l4": Card("L4", 22.5, 300, 121, True, "ada", r"\bL4\b",
               "NVIDIA L4 datasheet (242 TFLOPS with sparsity, 300 GB/s)"),
    "a10g": Card("A10G", 22.5, 600, 70, True, "ampere", r"\bA10G\b",
                 "NVIDIA/AWS A10G datasheet (140 TFLOPS with sparsity, 600 GB/s)"),
    "a10": Card("A10", 22.5, 600, 125, True, "ampere", r"\bA10\b",
                "NVIDIA A10 datasheet (250 TFLOPS with sparsity, 600 GB/s)"),
    "rtx3090": Card("RTX 3090", 24.0, 936, 71, True, "ampere", r"RTX 3090(?! Ti)",
                    "NVIDIA GA102 whitepaper (71 TFLOPS with FP32 accumulation, 936 GB/s)"),
    "rtx4090": Card("RTX 4090", 24.0, 1008, 165.2, True, "ada", r"RTX 4090(?! D)",
                    "NVIDIA Ada whitepaper, appendix A (165.2 TFLOPS with FP32 accumulation, 1008 GB/s)"),
    "a6000": Card("RTX A6000", 48.0, 768, 154.8, True, "ampere", r"RTX A6000",
                  "NVIDIA RTX A6000 datasheet (309.7 TFLOPS with sparsity, 768 GB/s)"),
    "l40s": Card("L40S", 45.0, 864, 362, True, "ada", r"\bL40S\b",
                 "NVIDIA L40S datasheet (733 TFLOPS with sparsity, 864 GB/s)"),
    "a100-40gb": Card("A100 40GB", 40.0, 1555, 312, True, "ampere", r"A100.*40GB",
                      "NVIDIA A100 datasheet (312 TFLOPS, 1,555 GB/s for both the PCIe and SXM4 40 GB)"),
    "a100-80gb": Card("A100 80GB SXM", 80.0, 2039, 312, True, "ampere", r"A100-SXM4?-80GB",
                      "NVIDIA A100 datasheet (312 TFLOPS, 2,039 GB/s)"),
    "a100-80gb-pcie": Card("A100 80GB PCIe", 80.0, 1935, 312, True, "ampere", r"A100 80GB PCIe|A100-PCIE-80GB",
                           "NVIDIA A100 datasheet (312 TFLOPS, 1,935 GB/s)"),
    "h100": Card("H100 SXM", 79.6, 3350, 989.5, True, "hopper", r"H100.*(HBM3|SXM)",
                 "NVIDIA H100 datasheet (1,979 TFLOPS with sparsity, 3,350 GB/s)"),
    "h100-pcie": Card("H100 PCIe", 79.6, 2000, 756.5, True, "hopper", r"H100 PCIe",
                      "NVIDIA H100 datasheet (1,513 TFLOPS with sparsity, 2,000 GB/s)"),
    "h200": Card("H200", 139.0, 4800, 989.5, True, "hopper", r"\bH200\b",
                 "NVIDIA H200 product page (1,979 TFLOPS with sparsity, 4,800 GB/s; 141 GB as sold, of which "
                 "our device tool's H200 machines report about 139 GiB)"),
}

# FP32 peak TFLOPS (no tensor cores; PyTorch's fp32 matmuls use none unless TF32 is on, and a card without bf16 has no
# TF32) of the cards that train in fp16: where fp16 overflows, float32 is what is left (plan.overflow_remedies).
FP32_TFLOPS = {"T4": 8.1}  # NVIDIA T4 datasheet: "Single-Precision 8.1 TFLOPS"


def find_card(name):
    """The card named by `--gpu` (a key of CARDS, any case) or by torch.cuda.get_device_name(); None if unknown."""
    key = name.strip().lower().replace(" ", "").replace("_", "-")
    if key in CARDS:
        return CARDS[key]
    return next((card for card in CARDS.values() if re.search(card.device_name, name, re.IGNORECASE)), None)
