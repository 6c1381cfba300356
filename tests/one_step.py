"""One PaW optimizer step on scripted rollouts, on however many processes launched this script (torchrun), with the
updated weights saved by process 0. tests/test_multiprocess.py runs it on 1 and on 2 processes and compares.

    torchrun --nproc_per_node 2 tests/one_step.py TINY_MODEL_DIR OUT_DIR paw gigpo   # --wm, --advantage
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from scripted import ScriptedEnv, scripted_policy  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from rollout import ChatFormat, play  # noqa: E402
from train_paw import PaWArguments, PaWTrainer, episode_fields, make_invalid_action_penalty, task_reward  # noqa: E402

EPISODES = 8  # per step, over all processes: 2 games x 4
# Each game's episodes play these scripts, by their order within the game's group: the same episodes wherever the
# group is played. room-a wins half, room-b none.
SCRIPTS = {"room-a": [0, 1, 2, 3], "room-b": [3, 2, 3, 2]}


def main(model_dir, out, wm, advantage):
    chat = ChatFormat(AutoTokenizer.from_pretrained(model_dir, padding_side="left"))

    def rollout_func(prompts, trainer):
        envs, played = [], dict.fromkeys(SCRIPTS, 0)
        for game in prompts:
            # GiGPO: unnumbered observations repeat across episodes, so that states are shared (anchor groups)
            envs.append(ScriptedEnv(game, SCRIPTS[game][played[game]], numbered=advantage != "gigpo"))
            played[game] += 1
        return episode_fields(play(envs, scripted_policy(chat), chat, max_steps=4))

    world = int(os.environ.get("WORLD_SIZE", 1))
    args = GRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no", max_steps=1, logging_steps=1,
        num_generations=4, per_device_train_batch_size=EPISODES // world, max_completion_length=1024, optim="sgd",
        learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        gradient_checkpointing=False, disable_dropout=True, seed=0, shuffle_dataset=False,
    )
    trainer = PaWTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=[task_reward, make_invalid_action_penalty(0.1)], args=args,
        train_dataset=Dataset.from_dict({"prompt": ["room-a", "room-b"]}), processing_class=chat.tokenizer,
        rollout_func=rollout_func, paw=PaWArguments(wm=wm, advantage=advantage),
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save(trainer.model.state_dict(), Path(out) / "weights.pt")
    # destroy the process group together: left to exit, gloo's threads may abort a process (SIGABRT)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
