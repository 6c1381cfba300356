"""Warm-start an agent before RL: behaviour cloning on expert episodes with TRL's SFTTrainer.

    python sft.py --env alfworld --games generated --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --output_dir runs/sft
    python train_paw.py --env alfworld --games generated --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
        --adapter runs/sft                      # RL from the warm start (a full model: --model_name_or_path runs/sft)

Small models never write a valid action on their own, so every episode of a GRPO group fails alike and RL gets no
signal. The expert (ALFWorld: each game's stored walkthrough; WebShop and search: the environment's expert replies)
plays every training game through RL's own episode loop (rollout.play), so an SFT sequence is token for token what
an RL rollout with the same replies is: prompt, chat pieces, admissible lists, observation caps. The loss is on the
policy's tokens only (each reply and its end-of-turn token: the mask RL gives TRL as env_mask). Episodes the expert
does not win within --max_env_steps and --max_completion_length are left out. Every TRL SFTConfig flag and
`--config file.yaml` work; model flags and their defaults are train_paw.py's.
"""

import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from env_workers import EnvWorkers
from envs import DataMissing, EnvArguments
from models import ModelMissing, load_model, load_tokenizer, model_flags, upcast_trainable
from rollout import ChatFormat, expert_policy, play

IGNORE = -100  # the label of a token that has no loss (transformers' convention)


@dataclass
class SFTArguments(EnvArguments):
    max_completion_length: int = field(
        default=6144, metadata={"help": "Token cap of an episode after the prompt, as in train_paw.py."})
    episodes_per_batch: int = field(
        default=64, metadata={"help": "Expert episodes played at once (resets and steps run in --env_workers)."})


def expert_episodes(args: SFTArguments, chat, games, workers):
    """The expert's episodes on `games`, played exactly as RL plays them; only the won ones."""
    episodes = []
    for start in range(0, len(games), args.episodes_per_batch):
        batch = games[start:start + args.episodes_per_batch]
        envs = [workers.make(args.env, game, args.env_kwargs) for game in batch]
        episodes += play(envs, expert_policy(chat), chat, args.max_env_steps, args.max_completion_length,
                         args.show_admissible, args.max_observation_tokens)
    return [e for e in episodes if e.won]


def sft_example(episode):
    """One training sequence: prompt + completion, labelled on the policy's tokens only (-100 elsewhere)."""
    labels = [token if turn >= 0 else IGNORE for token, turn in zip(episode.completion_ids, episode.action_index)]
    return {"input_ids": episode.context_ids, "labels": [IGNORE] * len(episode.prompt_ids) + labels}


def parse_args(argv=None):
    parser = TrlParser((SFTArguments, SFTConfig, ModelConfig))
    parser.set_defaults(**model_flags(), learning_rate=1e-4,  # LoRA; full fine-tuning wants about 1e-5
                        max_length=None,  # TRL would cut at 1024; episodes are capped by --max_completion_length
                        gradient_checkpointing=False, logging_steps=10, save_strategy="no", output_dir="runs/sft")
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:
        parser.error(str(error))  # a clear message and exit code 2, before anything heavy is loaded


def expert_dataset(args: SFTArguments, tokenizer, seed):
    """The training games' expert episodes as SFT rows (input_ids, labels); DataMissing or ValueError on bad input."""
    games = args.train_games(seed)
    workers = EnvWorkers(args.env_workers, args.env_timeout)
    try:
        episodes = expert_episodes(args, ChatFormat(tokenizer), games, workers)
    finally:
        workers.close()
    if not episodes:
        raise ValueError(f"the expert won none of the {len(games)} games within --max_env_steps "
                         f"{args.max_env_steps} and --max_completion_length {args.max_completion_length}: raise them")
    print(f"sft: the expert won {len(episodes)} of {len(games)} games, {sum(len(e.context_ids) for e in episodes)} "
          f"tokens")
    return Dataset.from_list([sft_example(e) for e in episodes])


def train(model, tokenizer, dataset, training_args: SFTConfig, peft_config=None):
    """Behaviour cloning with TRL's SFTTrainer; saves the model (or LoRA adapter) and tokenizer to output_dir."""
    trainer = SFTTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=dataset,
                         peft_config=peft_config)
    if peft_config:
        upcast_trainable(trainer.model)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    return trainer


def main(argv=None):
    args, training_args, model_args = parse_args(argv)
    try:
        tokenizer = load_tokenizer(model_args.model_name_or_path)
        dataset = expert_dataset(args, tokenizer, training_args.seed)  # its workers fork before the model loads
        model, tokenizer = load_model(model_args, training_args.device)
    except (DataMissing, ModelMissing, ValueError) as error:  # missing data or model, a bad split, no expert episode
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    return train(model, tokenizer, dataset, training_args, get_peft_config(model_args))


if __name__ == "__main__":
    main()
