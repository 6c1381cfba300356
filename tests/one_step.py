"""One PaW optimizer step on scripted rollouts, on however many processes launched this script (torchrun), with the
updated weights saved by process 0. tests/test_multiprocess.py runs it on 1 and on 2 processes and compares.

    torchrun --nproc_per_node 2 tests/one_step.py TINY_MODEL_DIR OUT_DIR paw gigpo 4   # --wm, --advantage, micro-batch

The step trains on one game's GRPO group of 8 episodes. With micro-batches of 4 (the default) each of 2 processes
holds half of the group, and 1 process runs the same two halves as 2 micro-batches (gradient accumulation); with a
micro-batch of 8, 1 process trains on the whole group at once.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import trl.trainer.grpo_trainer  # noqa: E402
from datasets import Dataset  # noqa: E402
from scripted import ScriptedEnv, scripted_policy  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from long_runs import apply_ddp_timeout, end_process  # noqa: E402
from rollout import ChatFormat, play  # noqa: E402
from train_paw import PaWArguments, PaWTrainer, episode_fields, make_invalid_action_penalty, task_reward  # noqa: E402

GROUP = 8  # episodes per step: one game's group
# The scripts the group's episodes play, by their position in the group, on any number of processes. The first half
# wins one of four, the second two: lambda_g, RLOO's baseline and GiGPO's anchor groups of the whole group differ
# from those of either half. Top-alpha: the halves have 15 and 13 transitions, so quotas counted per process would
# keep 8 + 7 where the mean divides by ceil(28 / 2) = 14; and script 3's actions have the highest entropies under
# the tiny model, so the whole group's top half by entropy would take more from the first half than its quota.
SCRIPTS = [3, 3, 3, 1, 0, 1, 2, 3]

# TRL shuffles a process's rows before it cuts them into micro-batches; kept in order, 1 process's two micro-batches
# are the two processes' halves of the group (on 2 processes, each micro-batch is a process's whole share).
trl.trainer.grpo_trainer.shuffle_sequence_dict = lambda batch: batch


def main(model_dir, out, wm, advantage, micro_batch="4"):
    chat = ChatFormat(AutoTokenizer.from_pretrained(model_dir, padding_side="left"))

    def rollout_func(prompts, trainer):
        first = trainer.accelerator.process_index * len(prompts)  # this process's first position in the group
        # GiGPO: unnumbered observations repeat across episodes, so that states are shared (anchor groups)
        envs = [ScriptedEnv(game, SCRIPTS[(first + i) % GROUP], numbered=advantage != "gigpo")
                for i, game in enumerate(prompts)]
        return episode_fields(play(envs, scripted_policy(chat), chat, max_steps=4))

    world, micro_batch = int(os.environ.get("WORLD_SIZE", 1)), int(micro_batch)
    args = GRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no", max_steps=1, logging_steps=1,
        num_generations=GROUP, per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=GROUP // (world * micro_batch), max_completion_length=1024, optim="sgd",
        learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        gradient_checkpointing=False, disable_dropout=True, seed=0, shuffle_dataset=False,
        # processes whose collectives stop matching (a bug, or a mutant) fail in a minute, not in gloo's 30
        ddp_timeout=60,
    )
    apply_ddp_timeout(args)
    trainer = PaWTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=[task_reward, make_invalid_action_penalty(0.1)], args=args,
        train_dataset=Dataset.from_dict({"prompt": ["room-a"]}), processing_class=chat.tokenizer,
        rollout_func=rollout_func, paw=PaWArguments(wm=wm, advantage=advantage),
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save(trainer.model.state_dict(), Path(out) / "weights.pt")
    # destroy the process group together: left to exit, gloo's threads may abort a process (SIGABRT)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    end_process()  # as train_paw.py ends: never tearing down the DDP model, whose teardown can deadlock


if __name__ == "__main__":
    main(*sys.argv[1:])
