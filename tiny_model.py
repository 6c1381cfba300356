"""A tiny randomly initialised Qwen2-style model and an offline BPE tokenizer, built in about a second.

`--model_name_or_path tiny` uses it so that training, evaluation and the tests run on a CPU with no download.
It learns nothing useful; it exercises exactly the code path a real Qwen2.5 model takes.
"""

import os
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

TINY_NAME = "tiny"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A few words of ALFWorld's vocabulary, so that common words become single tokens.
OBJECTS = "apple book bowl cellphone desklamp fork knife lettuce mug pan plate pot potato spoon tomato vase"
RECEPTACLES = "bed cabinet countertop desk drawer dresser fridge garbagecan microwave shelf sinkbasin stoveburner"
SENTENCES = [
    "You are in the middle of a room. Looking quickly around you, you see a {r} 1, a {r} 2, and a {r} 3.",
    "Your task is to: put some {o} on {r}. Your task is to: clean some {o} and put it in {r}.",
    "You arrive at {r} 1. On the {r} 1, you see a {o} 1, and a {o} 2. The {r} 1 is closed. Nothing happens.",
    "You pick up the {o} 1 from the {r} 1. You move the {o} 1 to the {r} 2. You open the {r} 1.",
    "go to {r} 1, take {o} 1 from {r} 1, move {o} 1 to {r} 1, heat {o} 1 with microwave 1, cool {o} 1 with fridge 1",
    "<think>I need to find the {o} first.</think><action>go to {r} 1</action> Admissible actions: look, inventory",
]


def _corpus():
    for o in OBJECTS.split():
        for r in RECEPTACLES.split():
            for sentence in SENTENCES:
                yield sentence.format(o=o, r=r)


TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)


def build_tiny(path, seed=0, shape=TINY_SHAPE, vocab_size=None, corpus=None, tokenizer_vocab=1024):
    """Write a random Qwen2 model (tiny by default) and an offline tokenizer to `path`. Deterministic per seed.

    vocab_size: the model's, when larger than the tokenizer's (real models pad theirs; unknown ids decode to "").
    corpus: texts to train the byte-level BPE tokenizer on (default: a few ALFWorld-like sentences), to
    `tokenizer_vocab` tokens.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tokenizer_vocab, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus or _corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>", padding_side="left"
    )
    # TRL's own copy of the Qwen2.5 template: TRL recognises it and treats the tiny model as a Qwen2.5 model.
    tokenizer.chat_template = (files("trl") / "chat_templates" / "qwen2_5.jinja").read_text()

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer), max_position_embeddings=16384,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **shape,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cached(path, build):
    """The model folder `path`, written by `build(folder)` on first use. It is built beside its place and renamed
    there, so that no process ever sees half a model; a failed build, or one that lost the race, leaves no copy."""
    path = Path(path)
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=path.parent)
        try:
            build(tmp)
        except BaseException:  # an interrupted (Ctrl-C) build too
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def tiny_model_path():
    """Folder of the tiny model (built on first use). `PAW_TINY_DIR` overrides the default cache folder."""
    return cached(os.environ.get("PAW_TINY_DIR", Path.home() / ".cache" / "paw" / "tiny-v1"), build_tiny)
