"""The CPU agent: a 1M-parameter Qwen2-shaped model that the project builds and warm-starts itself, offline.

    python cpu_agent.py                                   # build it now (minutes on 2 CPU cores)
    python train_paw.py --model_name_or_path cpu-agent    # RL from it (built on first use, then cached)
    python eval.py --model_name_or_path cpu-agent --games generated --max_env_steps 12

A laptop cannot run RL on a 7B model, and a random model never acts validly, so GRPO would get no signal. This
agent is small enough for a CPU and starts where RL has room to improve it: it wins some held-out generated games
and loses others. Three stages on generated ALFWorld training games: copying (random sequences that repeat), the language of
the expert's episodes, then behaviour cloning with sft.py. Its tokenizer is a byte-level BPE trained on the
environment's own text, so a word of ALFWorld is about one token. Cached in `~/.cache/paw/cpu-agent-v1` (or
`$PAW_AGENT_DIR`).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

import sft
from alfworld_gen import game_specs, resolve
from env_workers import EnvWorkers
from rollout import ChatFormat, expert_policy, play
from models import AGENT_RUN_FLAGS
from tiny_model import SPECIAL_TOKENS, build_tiny, cached, tiny_model_path

GAME_LEVEL, MAX_ENV_STEPS = AGENT_RUN_FLAGS["game_level"], AGENT_RUN_FLAGS["max_env_steps"]  # the rooms it plays
# 1.0M parameters; tied input and output embeddings, as in the recipe we measured (README, "The CPU agent").
SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=True)
VOCAB_SIZE = 2048
CORPUS_GAMES = 120  # whose text trains the tokenizer
SFT_GAMES = 600  # 100 per task type
STAGE_FLAGS = dict(learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=10, per_device_train_batch_size=8,
                   num_train_epochs=2, weight_decay=0.0, logging_steps=20, save_strategy="no", report_to="none",
                   bf16=False, fp16=False, disable_tqdm=True)


def environment_text(games, workers):
    """The text of the expert's episodes, chat markup included, exactly as a model will read it."""
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model_path()))
    episodes = play([workers.make("alfworld", game) for game in games], expert_policy(chat), chat, MAX_ENV_STEPS)
    return [chat.tokenizer.decode(e.context_ids, skip_special_tokens=True) for e in episodes]


def learn_to_copy(model, first_token, seed, steps=400, batch_size=16, length=48, learning_rate=1e-3):
    """Stage 1: predict the second half of random token sequences that repeat their first half.

    A valid action names an object the observation named ("take mug 2 from shelf 1"): the model must copy. From
    scratch, 600 expert games never taught it to (README, "The CPU agent"); this dense task does in a minute.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    for step in range(steps):
        half = torch.randint(first_token, model.config.vocab_size, (batch_size, length), generator=generator)
        input_ids = torch.cat([half, half], dim=1)
        labels = input_ids.clone()
        labels[:, :length] = sft.IGNORE  # the first half is unpredictable
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"cpu-agent: copy step {step}: loss {loss.item():.3f}", file=sys.stderr)


def build_agent(path, seed=0, shape=SHAPE, vocab_size=VOCAB_SIZE, sft_games=SFT_GAMES):
    """Write the warm-started agent (model and tokenizer) to `path`: a tokenizer, then three training stages."""
    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # a one-off build: every core
    try:
        _build(path, seed, shape, vocab_size, sft_games)
    finally:
        torch.set_num_threads(threads)
    print(f"cpu-agent: built in {time.time() - start:.0f} s at {path}", file=sys.stderr)
    return path


def _build(path, seed, shape, vocab_size, sft_games):
    workers = EnvWorkers(min(8, os.cpu_count() or 1))
    try:
        corpus = environment_text([resolve(g, GAME_LEVEL) for g in game_specs("train", CORPUS_GAMES)], workers)
    finally:
        workers.close()
    with tempfile.TemporaryDirectory() as work:
        build_tiny(work, seed, shape, corpus=corpus, tokenizer_vocab=vocab_size)
        tokenizer = AutoTokenizer.from_pretrained(work)
        model = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32)
        learn_to_copy(model, len(SPECIAL_TOKENS), seed)
        episodes = sft.expert_dataset(sft.SFTArguments(games="generated", game_level=GAME_LEVEL,
                                                       max_env_steps=MAX_ENV_STEPS, num_train_games=sft_games),
                                      tokenizer, seed)
        on_cpu = not torch.cuda.is_available()
        # Stage 2: the whole text of the expert's episodes, observations included: the language of the rooms.
        text = episodes.remove_columns("labels")
        sft.train(model, tokenizer, text, SFTConfig(output_dir=work, seed=seed, use_cpu=on_cpu, packing=True,
                                                    packing_strategy="wrapped", max_length=256, **STAGE_FLAGS))
        # Stage 3: behaviour cloning, the loss on the expert's replies only (sft.py).
        sft.train(model, tokenizer, episodes, SFTConfig(output_dir=str(path), seed=seed, use_cpu=on_cpu,
                                                        max_length=None,
                                                        train_sampling_strategy="group_by_length", **STAGE_FLAGS))


def agent_path():
    """Folder of the CPU agent, built on first use (minutes) and then cached."""
    path = Path(os.environ.get("PAW_AGENT_DIR", Path.home() / ".cache" / "paw" / "cpu-agent-v1"))
    if not (path / "config.json").exists():
        print(f"cpu-agent: building it once (a few minutes on a CPU), then cached in {path}", file=sys.stderr)
    return cached(path, build_agent)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print(agent_path())


if __name__ == "__main__":
    main()
