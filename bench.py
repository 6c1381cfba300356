"""Where time goes, measured side by side in one run on this machine (CPU).

    python bench.py                 # prints a table

1. Training step time with `--wm paw` vs `--wm off` on identical rollouts (the WM term reuses the policy forward).
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TrainerCallback
from trl import GRPOConfig

from envs import list_games, make_env
from rollout import ChatFormat, ModelPolicy, play
from tiny_model import tiny_model_path
from train_paw import PaWArguments, PaWTrainer, episode_fields, make_invalid_action_penalty, task_reward


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def record_rollouts(model, chat, games, group, max_env_steps, max_action_tokens):
    """Episodes of the model on real ALFWorld games, recorded once so that every trainer trains on the same ones."""
    config = GenerationConfig(do_sample=True, max_new_tokens=max_action_tokens, eos_token_id=chat.eot_id,
                              pad_token_id=chat.tokenizer.pad_token_id)
    envs = [make_env("alfworld", game) for game in games for _ in range(group)]
    return episode_fields(play(envs, ModelPolicy(model, chat, config), chat, max_env_steps))


def step_times(path, chat, fields, games, group, mode, steps, out):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    timer = StepTimer()
    args = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                      max_steps=steps, logging_steps=1, num_generations=group,
                      per_device_train_batch_size=len(fields["prompt_ids"]), max_completion_length=100_000,
                      disable_tqdm=True, seed=0)
    trainer = PaWTrainer(
        model=model, reward_funcs=[task_reward, make_invalid_action_penalty(0.1)], args=args,
        train_dataset=Dataset.from_dict({"prompt": games * steps}), processing_class=chat.tokenizer,
        rollout_func=lambda prompts, trainer: fields, callbacks=[timer], paw=PaWArguments(wm=mode),
    )
    trainer.train()
    return timer.times[1:]  # the first step pays one-off costs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="off/paw alternations (interleaved against drift)")
    parser.add_argument("--out", default="/tmp/paw-bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    path = tiny_model_path()
    chat = ChatFormat(AutoTokenizer.from_pretrained(path))
    games, group = list_games("alfworld", "eval_out_of_distribution", num_games=2, seed=0), 4
    fields = record_rollouts(AutoModelForCausalLM.from_pretrained(path), chat, games, group, 8, 48)
    tokens = sum(len(p) + len(c) for p, c in zip(fields["prompt_ids"], fields["completion_ids"]))

    times = {"off": [], "paw": []}
    for _ in range(args.rounds):
        for mode in times:
            times[mode] += step_times(path, chat, fields, games, group, mode, args.steps, args.out)

    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, 1 thread")
    print(f"1. training step, tiny model, {len(fields['prompt_ids'])} episodes, {tokens} tokens, identical rollouts")
    print("| mode | median s/step | steps |\n|---|---|---|")
    for mode, values in times.items():
        print(f"| {mode} | {statistics.median(values):.3f} | {len(values)} |")
    ratio = statistics.median(times["paw"]) / statistics.median(times["off"])
    print(f"paw / off = {ratio:.3f}")


if __name__ == "__main__":
    main()
