"""PaW: Policy and World-model co-training for language agents, on TRL's GRPOTrainer.

    python train_paw.py --env alfworld                                  # Qwen2.5-7B-Instruct, NF4 + LoRA, GRPO+PaW
    python train_paw.py --env alfworld --model_name_or_path tiny --max_steps 2 --output_dir runs/smoke   # CPU

The agent is trained with GRPO on multi-turn episodes and, in the same optimizer step and from the same forward
pass, learns to predict each next observation o_{t+1} after its action a_t (PAW_SPEC.md). Every TRL/transformers
flag works too, as does `--config file.yaml`. Lines marked `# ALGO LOGIC:` are the method; `# TRY NOT TO MODIFY:`
marks plumbing.
"""

import copy
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL 1.16
# TRL 1.16's own defaults use the name transformers 5.23 deprecated; the warning says nothing a user can act on.
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser, get_peft_config, get_quantization_config
from trl.models import unwrap_model_for_generation

from advantages import anchor_group_ids, gigpo_advantages, per_token, rloo_advantages
from alfworld_gen import LEVELS, Curriculum, game_specs, resolve
from cpu_agent import AGENT_NAME, RUN_FLAGS, agent_path
from env_workers import EnvWorkers
from envs import ALFWORLD_TASK_TYPES, ENVIRONMENTS, DataMissing, env_class, list_games, parse_options
from losses import TOKEN_LOSSES, adaptive_lambda, transition_wm_loss, wm_objective
from gpu_cards import CARDS, find_card
from plan import (HEADROOM, after_out_of_memory, as_flags, describe, describe_time, fit_run, flags_given, model_shape,
                  planned_card, run_peak)
from rollout import ChatFormat, ModelPolicy, play
from tiny_model import TINY_NAME, tiny_model_path
from wm_select import action_entropy, num_selected, per_transition_mean, select_top_alpha


@dataclass
class EnvArguments:
    """Which environment and games, and how an episode becomes a token sequence: shared by RL and SFT (sft.py)."""

    env: str = field(default="alfworld", metadata={"help": f"Text environment: {', '.join(ENVIRONMENTS)}."})
    max_env_steps: int = field(default=20, metadata={"help": "Actions per episode."})
    max_observation_tokens: int = field(
        default=512, metadata={"help": "Each observation is cut to this many tokens (ALFWorld's longest: ~120)."})
    show_admissible: bool = field(default=True, metadata={"help": "List the admissible actions in each turn."})
    train_split: str = field(default="train", metadata={"help": "Split whose games are trained on."})
    num_train_games: int = field(default=0, metadata={"help": "Train on a seeded sample of this many games (0: all)."})
    task_types: list[str] | None = field(
        default=None,
        metadata={"help": "Train only on these ALFWorld task types.", "choices": list(ALFWORLD_TASK_TYPES.values())})
    games: Literal["official", "generated"] = field(
        default="official", metadata={"help": "ALFWorld games: the official files, or games alfworld_gen.py "
                                              "generates offline (any room size, no download)."})
    game_level: int = field(
        default=0, metadata={"help": "Generated games: room size, 0 (3 receptacles) to 5 (24, like official ones)."})
    env_workers: int = field(
        default=min(8, os.cpu_count() or 1),
        metadata={"help": "Processes that run environment resets and steps in parallel (0: in the main process)."})
    env_timeout: float = field(
        default=120, metadata={"help": "Seconds an environment call may take: one that hangs ends its episode as "
                                       "an environment error and its worker is replaced (needs --env_workers >= 1)."})
    env_options: list[str] | None = field(
        default=None, metadata={"help": "The environment's own settings, as key=value pairs (see the README)."})

    def __post_init__(self):
        checks = [
            # checked here, not as argparse choices, so that a script may register an environment (gpu_check.py)
            (self.env in ENVIRONMENTS, f"--env {self.env}: unknown; one of {', '.join(ENVIRONMENTS)}"),
            (self.max_env_steps >= 1, f"--max_env_steps must be >= 1, got {self.max_env_steps}"),
            (self.max_observation_tokens >= 1, "--max_observation_tokens must be >= 1"),
            (self.num_train_games >= 0, "--num_train_games must be >= 0"),
            (self.env_workers >= 0, "--env_workers must be >= 0"),
            (self.env_timeout > 0, f"--env_timeout must be > 0, got {self.env_timeout}"),
            (self.games == "official" or self.env == "alfworld", "--games generated is for --env alfworld"),
            (0 <= self.game_level < len(LEVELS), f"--game_level must be from 0 to {len(LEVELS) - 1}"),
            (not self.task_types or self.env == "alfworld", "--task_types applies to --env alfworld only"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        parse_options(self.env_options)

    @property
    def env_kwargs(self):
        return parse_options(self.env_options)

    def train_games(self, seed):
        """The game ids to train on (generated: 'Type:seed' specs, written at a level when played)."""
        if self.games == "generated":
            types = self.task_types or list(ALFWORLD_TASK_TYPES.values())
            return game_specs(self.train_split, self.num_train_games or 100 * len(types), types)
        return list_games(self.env, self.train_split, self.num_train_games, self.task_types, seed, self.env_kwargs)


@dataclass
class PaWArguments(EnvArguments):
    wm: Literal["off", "echo", "paw"] = field(
        default="paw", metadata={"help": "off: plain GRPO. echo: ECHO-style CE on all transitions. paw: PaW."})
    wm_beta: float | None = field(
        default=None, metadata={"help": "Weight beta of the WM loss (default: 1.0 for paw, 0.05 for echo)."})
    wm_alpha: float | None = field(
        default=None, metadata={"help": "Fraction of transitions, by action entropy, that get the WM loss "
                                        "(default: 0.5 for paw, 1.0 for echo)."})
    cmae_rho: float = field(default=0.9, metadata={"help": "CMAE clip: tokens with p > rho get no WM loss."})
    wm_loss: Literal["cmae", "ce"] | None = field(
        default=None, metadata={"help": "WM token loss (default: cmae for paw, ce for echo)."})
    wm_weighting: Literal["adaptive", "constant"] | None = field(
        default=None, metadata={"help": "adaptive: beta * clip(1 - group mean return, 0, 1); constant: beta "
                                        "(default: adaptive for paw, constant for echo)."})
    max_action_tokens: int = field(default=256, metadata={"help": "Token cap of one reply (think + action)."})
    reuse_cache: bool = field(
        default=True, metadata={"help": "Keep each episode's KV cache between turns (no re-reading of the history)."})
    invalid_action_penalty: float = field(
        default=0.1, metadata={"help": "Reward penalty per unparseable or inadmissible action."})
    curriculum: bool = field(
        default=False, metadata={"help": "Generated games: start at --game_level, move up a level once 80%% of the "
                                         "last 64 episodes at the current level succeed."})
    adapter: str | None = field(
        default=None, metadata={"help": "A LoRA adapter to train on (e.g. sft.py's output), on the base model "
                                        "--model_name_or_path; no new LoRA is added."})
    advantage: Literal["grpo", "gigpo", "rloo"] = field(
        default="grpo", metadata={"help": "grpo: TRL's, per episode. gigpo: plus step-level credit between episodes "
                                          "of a group that reach the same state. rloo: leave-one-out baseline. "
                                          "--scale_rewards applies to grpo only."})
    gigpo_gamma: float = field(default=0.95, metadata={"help": "GiGPO: discount of the step returns."})
    gigpo_omega: float = field(default=1.0, metadata={"help": "GiGPO: weight of the step-level advantage."})
    gigpo_std: bool | None = field(
        default=None, metadata={"help": "GiGPO: divide both terms by their group's std (default per environment, as "
                                        "verl-agent: alfworld and search yes, webshop no)."})
    gigpo_episode_stats: Literal["steps", "trajectories"] = field(
        default="steps", metadata={"help": "GiGPO episode term: statistics over all step rows of a group, so an "
                                           "episode weighs its length (verl-agent), or one entry per episode (GRPO)."})
    gigpo_penalize: Literal["format", "invalid"] = field(
        default="format", metadata={"help": "GiGPO: the steps --invalid_action_penalty hits: replies with no "
                                            "parseable action (verl-agent), or inadmissible actions too (as grpo)."})
    gpu: str | None = field(
        default=None, metadata={"help": "Plan the run, its memory and its time, for this card instead of the one "
                                        f"found (with --dry_run, for a card you do not have): {', '.join(CARDS)}."})
    gpu_memory_gib: float | None = field(
        default=None, metadata={"help": "Plan the run for a GPU of this many GiB instead of the one found (e.g. 15 "
                                        "for a T4); with --dry_run, for a card you do not have."})
    dry_run: bool = field(default=False, metadata={"help": "Print the plan (model, batches, caps, memory) and exit."})
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "An optimizer step with a NaN or inf gradient is skipped; this many in a row "
                                     "stop the run."})

    def __post_init__(self):
        for key, value in MODE_DEFAULTS[self.wm].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        super().__post_init__()
        if self.gigpo_std is None:
            self.gigpo_std = env_class(self.env).gigpo_std
        checks = [
            (0 < self.wm_alpha <= 1, f"--wm_alpha must be in (0, 1], got {self.wm_alpha}"),
            (0 < self.cmae_rho <= 1, f"--cmae_rho must be in (0, 1], got {self.cmae_rho}"),
            (self.wm_beta >= 0, f"--wm_beta must be >= 0, got {self.wm_beta}"),
            (self.max_action_tokens >= 1, f"--max_action_tokens must be >= 1, got {self.max_action_tokens}"),
            (self.invalid_action_penalty >= 0, "--invalid_action_penalty must be >= 0"),
            (not self.curriculum or self.games == "generated", "--curriculum needs --games generated"),
            (not self.adapter or (Path(self.adapter) / "adapter_config.json").is_file(),
             f"--adapter {self.adapter}: no adapter_config.json there"),
            (0 <= self.gigpo_gamma <= 1, f"--gigpo_gamma must be in [0, 1], got {self.gigpo_gamma}"),
            (self.gigpo_omega >= 0, f"--gigpo_omega must be >= 0, got {self.gigpo_omega}"),
            (self.gpu is None or find_card(self.gpu), f"--gpu {self.gpu}: unknown card; one of {', '.join(CARDS)}"),
            (self.gpu_memory_gib is None or self.gpu_memory_gib > 0, "--gpu_memory_gib must be > 0"),
            (self.max_nonfinite_steps >= 1, "--max_nonfinite_steps must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# The paper's modes (PAW_SPEC §3); an explicit flag overrides its mode's default, which is how ablations are run.
MODE_DEFAULTS = {
    "paw": dict(wm_beta=1.0, wm_alpha=0.5, wm_loss="cmae", wm_weighting="adaptive"),
    "echo": dict(wm_beta=0.05, wm_alpha=1.0, wm_loss="ce", wm_weighting="constant"),
    "off": dict(wm_beta=0.0, wm_alpha=1.0, wm_loss="ce", wm_weighting="constant"),
}


def hardware_dtype():
    """bfloat16 on GPUs that have it, float16 on older GPUs (T4), float32 on CPU."""
    if not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def model_flags():
    """The design card's model: Qwen2.5-7B-Instruct in NF4 with LoRA on all linear layers, on one GPU (sft.py too)."""
    dtype = hardware_dtype()
    return dict(
        model_name_or_path="Qwen/Qwen2.5-7B-Instruct", use_peft=True, lora_target_modules="all-linear",
        lora_dropout=0.0, load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
        bf16=dtype == "bfloat16", fp16=dtype == "float16", dtype=dtype, report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        # With no GPU, say so: under torchrun, transformers then joins the processes over gloo; without it, each
        # process would train alone.
        use_cpu=not torch.cuda.is_available(),
    )


def default_flags():
    """The design card's RL run on that model."""
    return dict(
        **model_flags(),
        learning_rate=1e-5,  # LoRA needs ~10x the full fine-tuning rate (1e-6 in GiGPO/verl-agent)
        num_generations=8, per_device_train_batch_size=4, gradient_accumulation_steps=4,  # 2 games x 8 per step
        max_completion_length=6144, max_steps=200, logging_steps=1, save_steps=25, disable_dropout=True,
        output_dir="runs/paw",
    )


# With `--model_name_or_path tiny` (a CPU smoke run), a run shrinks to a few short episodes; flags still win.
TINY_FLAGS = dict(num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_env_steps=4,
                  max_action_tokens=32, max_completion_length=2048)
LOCAL_RUN_FLAGS = {TINY_NAME: TINY_FLAGS, AGENT_NAME: RUN_FLAGS}  # our own models' run sizes


# ----------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the PaW trainer. TRL's GRPO loss is untouched; the WM term is added from the same forward pass.
# ----------------------------------------------------------------------------------------------------------------


class PaWTrainer(GRPOTrainer):
    def __init__(self, *args, paw: PaWArguments, **kwargs):
        super().__init__(*args, **kwargs)
        check_temperature(paw, self.args)
        self.paw = paw

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        # TRY NOT TO MODIFY: keep the log-probs (with their graph) and entropies of the policy-loss forward, which
        # scores every completion token, observations included. TRL asks for entropies only in that forward.
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if kwargs.get("compute_entropy") and self.paw.wm != "off":
            self._policy_forward = (logps, entropies)
        return logps, entropies, aux_loss

    def _generate_and_score_completions(self, inputs):
        # TRY NOT TO MODIFY: TRL merged the rollout's extra fields into `inputs`; carry the per-token transition
        # indices and each group's mean task return into the batch that compute_loss receives.
        output = super()._generate_and_score_completions(inputs)
        device, width = output["completion_ids"].device, output["completion_ids"].size(1)
        live = output["completion_mask"].bool()  # --mask_truncated_completions zeroes a truncated episode's tokens
        for key in ("action_index", "obs_index"):
            index = torch.tensor([row[key] + [-1] * (width - len(row[key])) for row in inputs], device=device)
            output[key] = index.where(live, -1)
        # The WM mean's denominator: how many transitions top-alpha selects in the whole generation batch, over all
        # processes. A 0-dim tensor reaches every micro-batch whole, like TRL's own num_items_in_batch.
        obs_index = output["obs_index"]
        num_targets = per_transition_mean(live.float(), obs_index, int(obs_index.max().clamp(min=0)) + 1)[1]
        eligible = self.accelerator.gather((num_targets > 0).sum()).sum()  # as compute_loss counts them
        output["wm_num_selected"] = torch.tensor(float(num_selected(int(eligible), self.paw.wm_alpha)), device=device)
        group = self.num_generations if self.model.training else self.num_generations_eval
        returns = self.accelerator.gather(torch.tensor([row["task_return"] for row in inputs], device=device))
        group_return = returns.view(-1, group).mean(dim=1).repeat_interleave(group)
        rank = self.accelerator.process_index
        output["group_return"] = group_return[rank * len(inputs):(rank + 1) * len(inputs)]
        if self.paw.advantage != "grpo":  # (B,) or (B, L): TRL's loss takes either as it is
            output["advantages"] = self._advantages(inputs, group, output["action_index"])
        self._log_episodes(inputs)
        return output

    def _advantages(self, inputs, group, action_index):
        """GiGPO's per-token or RLOO's per-episode advantages of this process's episodes (advantages.py), from the
        episodes of all processes: a group may span processes."""
        paw, mode = self.paw, "train" if self.model.training else "eval"
        keys = ("task_return", "invalid_actions", "step_rewards", "step_valid", "step_parsed", "anchors")
        rows = gather_object([{key: row[key] for key in keys} for row in inputs])
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        # ALGO LOGIC: the episode's reward is GRPO's (task return minus the invalid-action penalty)
        if paw.advantage == "rloo":
            rewards = torch.tensor([r["task_return"] - paw.invalid_action_penalty * r["invalid_actions"] for r in rows])
            return rloo_advantages(rewards, group)[local].to(action_index.device)
        width = max(int(action_index.max()) + 1, max(len(r["step_rewards"]) for r in rows), 1)

        def padded(key, dtype):
            return torch.tensor([r[key] + [0] * (width - len(r[key])) for r in rows], dtype=dtype)

        step_mask = torch.arange(width) < torch.tensor([len(r["step_rewards"]) for r in rows]).unsqueeze(1)
        penalized = ~padded("step_parsed" if paw.gigpo_penalize == "format" else "step_valid", torch.bool)
        anchors = anchor_group_ids([r["anchors"] for r in rows], group, width)
        step_advantages, step_term = gigpo_advantages(
            torch.tensor([r["task_return"] for r in rows], dtype=torch.float32), padded("step_rewards", torch.float32),
            penalized, step_mask, anchors, group, paw.gigpo_gamma, paw.gigpo_omega, paw.gigpo_std,
            paw.invalid_action_penalty, paw.gigpo_episode_stats)
        # TRY NOT TO MODIFY: logging. An anchor group of one is a state no other episode of its group reached.
        ids = anchors[step_mask]
        shared = ids.bincount()[ids] > 1
        self._metrics[mode]["gigpo/shared_state_frac"].append(shared.float().mean().item() if len(ids) else 0.0)
        self._metrics[mode]["gigpo/step_advantage_std"].append(
            step_term[step_mask][shared].std().nan_to_num().item() if shared.sum() > 1 else 0.0)
        return per_token(step_advantages[local].to(action_index.device), action_index)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # TRL's GRPO loss, unchanged
        if self.paw.wm == "off":
            return loss
        # ALGO LOGIC: L = L_RL + beta * mean over selected transitions t of lambda_g(t) * L_WM(t)
        paw = self.paw
        logps, token_entropy = self._policy_forward  # the forward that produced L_RL: no second pass
        del self._policy_forward
        action_index, obs_index = inputs["action_index"], inputs["obs_index"]
        num_transitions = int(torch.maximum(action_index.max(), obs_index.max()).clamp(min=0)) + 1
        entropy = action_entropy(token_entropy, action_index, num_transitions)  # (B, T), no gradient
        token_loss = TOKEN_LOSSES[paw.wm_loss](logps, paw.cmae_rho)  # (B, L)
        transition_loss, num_targets = transition_wm_loss(token_loss, obs_index, num_transitions)  # (B, T)
        selected = select_top_alpha(entropy, num_targets > 0, paw.wm_alpha)  # top-alpha by action entropy
        if paw.wm_weighting == "adaptive":
            weight = adaptive_lambda(inputs["group_return"])  # lambda_g = clip(1 - R_g / R_max, 0, 1)
        else:
            weight = torch.ones_like(inputs["group_return"])
        weight = weight.unsqueeze(1).to(transition_loss.dtype)
        # A mean over the selected transitions of the whole generation batch, to which each micro-batch adds its
        # share: scaled for gradient accumulation and processes the way TRL scales its own default ("dapo") loss.
        normalizer = inputs["wm_num_selected"].clamp(min=1) / self.accelerator.num_processes
        if self.model.training:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss = loss + paw.wm_beta * wm_objective(transition_loss, selected, weight, normalizer)

        # TRY NOT TO MODIFY: logging
        with torch.no_grad():
            in_selected = (obs_index >= 0) & selected.gather(1, obs_index.clamp(min=0))
            wm_loss = wm_objective(transition_loss, selected, weight, selected.sum().clamp(min=1))  # this micro-batch
            stats = {"wm/loss": wm_loss, "wm/lambda_mean": weight.float().mean(),
                     "wm/selected_frac": selected.sum() / (num_targets > 0).sum().clamp(min=1)}
            if paw.wm_loss == "cmae":
                clipped = (logps.exp() > paw.cmae_rho) & in_selected
                stats["wm/clipped_frac"] = clipped.sum() / in_selected.sum().clamp(min=1)
        mode = "train" if self.model.training else "eval"
        for name, value in stats.items():
            self._metrics[mode][name].append(self.accelerator.gather(value.detach().float()).mean().item())
        return loss

    def _log_episodes(self, inputs):
        mode = "train" if self.model.training else "eval"
        stats = {key: self.accelerator.gather(torch.tensor([float(row[key]) for row in inputs],
                                                           device=self.accelerator.device))
                 for key in ("success", "num_steps", "invalid_actions", "env_error")}
        steps, invalid = stats["num_steps"], stats["invalid_actions"]
        self._metrics[mode]["episode/success_rate"].append(stats["success"].mean().item())
        self._metrics[mode]["episode/length"].append(steps.mean().item())
        self._metrics[mode]["episode/invalid_action_rate"].append((invalid.sum() / steps.sum().clamp(min=1)).item())
        self._metrics[mode]["episode/env_error_rate"].append(stats["env_error"].mean().item())
        # Where a step's time goes: TRL's step_time holds the rollout and the training passes of all micro-batches.
        seconds = inputs[0]["rollout_seconds"]
        generated = sum(index >= 0 for row in inputs for index in row["action_index"])
        self._metrics[mode]["time/rollout_s"].append(seconds)
        self._metrics[mode]["time/generated_tokens_per_s"].append(generated / seconds)
        if "game_level" in inputs[0]:  # generated games
            self._metrics[mode]["episode/game_level"].append(float(inputs[0]["game_level"]))


# ----------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: rollouts and rewards
# ----------------------------------------------------------------------------------------------------------------


def make_rollout_func(paw: PaWArguments, chat: ChatFormat, workers: EnvWorkers, curriculum: Curriculum | None):
    def rollout_func(prompts, trainer):
        """prompts: one game id per episode; TRL has repeated each game num_generations times (the group)."""
        start = time.perf_counter()
        level = curriculum.level if curriculum else paw.game_level
        if paw.games == "generated":  # an id names a game at every level: write it at this one
            prompts = [resolve(spec, level) for spec in prompts]
        generation_config = copy.deepcopy(trainer.generation_config)
        generation_config.max_new_tokens = paw.max_action_tokens
        generation_config.use_cache = True
        options = paw.env_kwargs
        envs = [workers.make(paw.env, game, options) for game in prompts]
        with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as model:
            policy = ModelPolicy(model, chat, generation_config, paw.reuse_cache)
            episodes = play(envs, policy, chat, paw.max_env_steps, trainer.args.max_completion_length,
                            paw.show_admissible, paw.max_observation_tokens)
        fields = episode_fields(episodes)
        if paw.games == "generated":
            fields["game_level"] = [level] * len(episodes)
        if curriculum:  # every process moves on the successes of all, so that all stay at the same level
            curriculum.update(gather_object([e.won for e in episodes]))
        fields["rollout_seconds"] = [time.perf_counter() - start] * len(episodes)
        return fields

    return rollout_func


def episode_fields(episodes):
    """What TRL expects from a rollout_func, plus per-episode extra fields (passed on to rewards and the loss)."""
    return {
        "prompt_ids": [e.prompt_ids for e in episodes],
        "completion_ids": [e.completion_ids for e in episodes],
        # Sampling log-probs (0 on environment tokens): TRL uses them for its off-policy options, e.g.
        # --off_policy_mask_threshold. None when a scripted policy played.
        "logprobs": None if any(e.logprobs is None for e in episodes) else [e.logprobs for e in episodes],
        "env_mask": [[int(i >= 0) for i in e.action_index] for e in episodes],  # 1 on policy tokens
        "action_index": [e.action_index for e in episodes],
        "obs_index": [e.obs_index for e in episodes],
        "task_return": [e.task_return for e in episodes],
        "success": [float(e.won) for e in episodes],
        "invalid_actions": [e.invalid_actions for e in episodes],
        "num_steps": [len(e.turns) for e in episodes],
        "env_error": [e.error is not None for e in episodes],
        # Per step, for GiGPO: the environment's reward, whether the action was admissible / parseable at all, and
        # the state it was taken in (the observation before it: equal strings make an anchor group).
        "step_rewards": [[turn["reward"] for turn in e.turns] for e in episodes],
        "step_valid": [[turn["valid"] for turn in e.turns] for e in episodes],
        "step_parsed": [[turn["action"] is not None for turn in e.turns] for e in episodes],
        "anchors": [[e.first_observation] + [turn["observation"] for turn in e.turns[:-1]] if e.turns else []
                    for e in episodes],
    }


def task_reward(completions, task_return, **kwargs):
    """The environment's return for the task, in [0, R_max = 1] (ALFWorld: 1 if the task was completed, else 0)."""
    return task_return


def make_invalid_action_penalty(coef):
    def invalid_action_penalty(completions, invalid_actions, **kwargs):
        return [-coef * n for n in invalid_actions]

    return invalid_action_penalty


class CurriculumCheckpoint(TrainerCallback):
    """Saves the curriculum with each checkpoint, so that --resume_from_checkpoint continues at its level."""

    def __init__(self, curriculum):
        self.curriculum = curriculum

    def on_save(self, args, state, control, **kwargs):
        saved = json.dumps(self.curriculum.state_dict())
        (Path(args.output_dir) / f"checkpoint-{state.global_step}" / CURRICULUM_FILE).write_text(saved)


CURRICULUM_FILE = "curriculum.json"


class SkipNonFiniteSteps(TrainerCallback):
    """A NaN or inf gradient never reaches the weights: that optimizer step is skipped (every gradient is dropped, and
    the optimizer leaves parameters with no gradient alone). The check runs on the gradients after they are summed
    over micro-batches and processes, so every process skips the same steps. `limit` skipped steps in a row stop the
    run (`stopped`)."""

    def __init__(self, limit):
        self.limit, self.in_a_row, self.skipping, self.stopped = limit, 0, False, False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        self.skipping = bool(gradients) and not bool(torch.stack([g.isfinite().all() for g in gradients]).all())
        if self.skipping:
            for parameter in model.parameters():
                parameter.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        self.in_a_row = self.in_a_row + 1 if self.skipping else 0
        if self.skipping:
            print(f"warning: step {state.global_step}: a NaN or inf gradient; the optimizer step was skipped "
                  f"({self.in_a_row} in a row, the run stops at {self.limit})", file=sys.stderr)
        if self.in_a_row >= self.limit:
            self.stopped = control.should_training_stop = True


def model_path(name):
    """A Hub id or folder as given; `tiny` (the random test model) and `cpu-agent` are built here on first use."""
    local = {TINY_NAME: tiny_model_path, AGENT_NAME: agent_path}
    return local[name]() if name in local else name


class ModelMissing(RuntimeError):
    """A model that is neither a local folder nor reachable on the Hub: the message says how to work offline."""


def load_tokenizer(name):
    """The tokenizer of --model_name_or_path (left padding: replies are generated after the prompt)."""
    path = model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, padding_side="left")
    except OSError as error:  # no such folder, the Hub unreachable, or no such model on it
        raise ModelMissing(
            f"cannot load the model {name!r}: it is not a local model folder, and the Hugging Face Hub "
            f"could not provide it ({str(error).splitlines()[0]})\n"
            "  - a local folder: --model_name_or_path PATH (a folder with config.json, e.g. from save_pretrained)\n"
            "  - a Hub model downloaded before: set HF_HUB_OFFLINE=1 to use the local cache\n"
            "  - no download at all: --model_name_or_path cpu-agent (built here in minutes) or tiny (random)"
        ) from None


def load_model(model_args: ModelConfig, device, adapter=None):
    """The model and tokenizer, with the base in 4-bit NF4 if asked, and a LoRA adapter on it if given."""
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    path = model_path(model_args.model_name_or_path)
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=get_quantization_config(model_args),
        attn_implementation=model_args.attn_implementation, device_map={"": device},
    )
    if adapter:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    return model, tokenizer


def upcast_trainable(model):
    """TRL stores LoRA weights of a 4-bit model in bf16, which rounds small updates away: train them in fp32."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def check_temperature(paw: PaWArguments, args: GRPOConfig):
    if paw.wm != "off" and args.temperature != 1.0:
        raise ValueError("--wm echo/paw needs --temperature 1.0: the WM loss and the action entropy are defined at "
                         "temperature 1, and they share the policy forward, whose log-probs TRL computes at "
                         "--temperature")


def last_complete_checkpoint(output_dir, needs=()):
    """The newest checkpoint-N folder whose save finished, or None. transformers writes trainer_state.json after the
    weights, optimizer, scheduler and RNG states, and our callbacks write theirs (`needs`) after it: a run killed
    during a save leaves a newer folder without them, which is passed over."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.removeprefix("checkpoint-")), reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            if all((folder / name).is_file() for name in needs):
                return str(folder)
        except (OSError, ValueError):  # missing, or cut off mid-write
            pass
        print(f"{folder} is incomplete (its save was interrupted): passed over", file=sys.stderr)
    return None


def planned_shape(model_name, card_gib):
    """The model's shape for the memory plan; None with no GPU, and for our own small models, which fit any card."""
    return model_shape(model_name) if card_gib and model_name not in (TINY_NAME, AGENT_NAME) else None


def print_plan(paw, args, model_args, card, card_gib, card_name, shape, planned, cpu_agent, given):
    """The plan, before anything loads; a warning where the user's own flags do not fit the card by the estimate, or
    would take more than two sessions."""
    if cpu_agent:
        print(f"no GPU: training the CPU agent ({AGENT_NAME}: a 1M-parameter model for small generated ALFWorld "
              "rooms, built offline on first use); --model_name_or_path picks another model")
    elif card_gib:
        print(f"plan for a GPU of {card_gib:.1f} GiB{f' ({card_name})' if card_name else ''} (--gpu or "
              "--gpu_memory_gib plans for another card; --dry_run prints this and exits):")
    else:
        print("plan (no GPU):")
    peak = run_peak(shape, paw, args, model_args) if shape else None
    print(describe(paw, args, model_args, card_gib, peak, planned))
    if shape and card:
        lines, slow = describe_time(shape, card, card_gib, paw, args, model_args, given)
        print(lines)
        if slow:
            print(slow, file=sys.stderr)
    elif shape:
        why = f"gpu_cards.py does not know the {card_name}" if card_name else (
            "memory alone does not say how fast a card is")
        print(f"  time      no estimate: {why}; --gpu names a card: {', '.join(CARDS)}")
    if shape and peak > HEADROOM * card_gib:
        fitting = fit_run(shape, paw, args, model_args, HEADROOM * card_gib)  # the user's own knobs set aside
        advice = (f"flags that fit: {as_flags(fitting)}" if fitting else
                  "nothing fits even at the smallest cap and micro-batch 1: use --load_in_4bit, LoRA, a smaller "
                  "model (e.g. Qwen/Qwen2.5-1.5B-Instruct) or fewer episodes per step")
        print(f"warning: the estimated peak, {peak:.1f} GiB, is over {HEADROOM:.0%} of this {card_gib:.1f} GiB card; "
              f"{advice}", file=sys.stderr)
    elif card_gib and shape is None and model_args.model_name_or_path not in (TINY_NAME, AGENT_NAME):
        print(f"  memory    no estimate: {model_args.model_name_or_path} is not a preset, a local folder or a "
              "Llama/Qwen-style config the Hub provides")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    given = flags_given(argv)
    parser = TrlParser((PaWArguments, GRPOConfig, ModelConfig))
    parser.set_defaults(**default_flags())
    try:
        paw, training_args, model_args = parser.parse_args_and_config(argv)
        card, card_gib, card_name = planned_card(paw.gpu, paw.gpu_memory_gib)
        cpu_agent = card_gib is None and "model_name_or_path" not in given
        if cpu_agent:  # no GPU: a 7B model would not train, the CPU agent does
            if paw.env != "alfworld":
                raise ValueError(f"no GPU, and the CPU agent plays ALFWorld only: for --env {paw.env} pass "
                                 "--model_name_or_path (e.g. tiny for a smoke run)")
            parser.set_defaults(model_name_or_path=AGENT_NAME)
            paw, training_args, model_args = parser.parse_args_and_config(argv)
        run_flags = LOCAL_RUN_FLAGS.get(model_args.model_name_or_path)
        if run_flags:  # the local models' own run sizes; flags the user passes still win
            parser.set_defaults(**run_flags)
            paw, training_args, model_args = parser.parse_args_and_config(argv)
        check_temperature(paw, training_args)
        if training_args.use_vllm:
            raise ValueError("--use_vllm is not supported: PaW's multi-turn rollouts generate with transformers")
        if training_args.max_completion_length < paw.max_action_tokens:
            raise ValueError("--max_completion_length (the whole episode) must be >= --max_action_tokens (one reply)")
        # TRY NOT TO MODIFY: the plan fitted to the GPU (plan.py). Our own small models need none.
        shape = planned_shape(model_args.model_name_or_path, card_gib)
        planned = fit_run(shape, paw, training_args, model_args, HEADROOM * card_gib, given) if shape else None
        if planned:
            parser.set_defaults(**planned)
            paw, training_args, model_args = parser.parse_args_and_config(argv)
    except ValueError as error:
        parser.error(str(error))  # a clear message and exit code 2, before anything heavy is loaded
    if os.environ.get("RANK", "0") == "0":  # one plan per run, not one per process
        print_plan(paw, training_args, model_args, card, card_gib, card_name, shape, planned, cpu_agent, given)
    if paw.dry_run:
        sys.exit(0)
    resume = training_args.resume_from_checkpoint
    if resume in ("true", "last"):  # the newest checkpoint, if any: the same command starts and resumes a run
        found = last_complete_checkpoint(training_args.output_dir, [CURRICULUM_FILE] if paw.curriculum else [])
        training_args.resume_from_checkpoint = found
        print(f"resuming from {found}" if found else f"no checkpoint in {training_args.output_dir} yet: starting from "
              "step 0", file=sys.stderr)
    elif resume and not (Path(resume) / "trainer_state.json").is_file():
        parser.error(f"--resume_from_checkpoint {resume}: no checkpoint there (a checkpoint-N folder with "
                     "trainer_state.json); `--resume_from_checkpoint last` takes the newest in --output_dir")
    return paw, training_args, model_args


def out_of_memory_message(paw, args, model_args, steps_done):
    card_gib = planned_card(paw.gpu, paw.gpu_memory_gib)[1]
    shape = planned_shape(model_args.model_name_or_path, card_gib)
    retry = after_out_of_memory(shape, paw, args, model_args, card_gib)
    last = last_complete_checkpoint(args.output_dir)
    return "\n".join([
        f"the GPU ran out of memory in step {steps_done + 1}.",
        f"  flags that fit{' by the estimate, aiming 15% lower' if shape else ''}: {as_flags(retry)}" if retry else
        "  nothing fits this card by the estimate: use a smaller model, or NF4 (--load_in_4bit) with LoRA",
        f"  {last} is intact: run again with these flags and --resume_from_checkpoint last" if last else
        "  no checkpoint was saved yet: run again with these flags",
    ])


def main(argv=None, callbacks=()):
    """Train; `callbacks` (transformers TrainerCallbacks) are for scripts that drive a run, such as study.py."""
    paw, training_args, model_args = parse_args(argv)
    try:
        games = paw.train_games(training_args.seed)
    except (DataMissing, ValueError) as error:  # missing data, an unknown split or environment option
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    curriculum = Curriculum(paw.game_level) if paw.curriculum else None
    saved = training_args.resume_from_checkpoint and Path(training_args.resume_from_checkpoint) / CURRICULUM_FILE
    if curriculum and saved and saved.exists():
        curriculum.load_state_dict(json.loads(saved.read_text()))
    workers = EnvWorkers(paw.env_workers, paw.env_timeout)  # forked before the model loads: small
    try:
        model, tokenizer = load_model(model_args, training_args.device, paw.adapter)
    except ModelMissing as error:
        workers.close()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    chat = ChatFormat(tokenizer)
    nonfinite = SkipNonFiniteSteps(paw.max_nonfinite_steps)
    trainer = PaWTrainer(
        model=model,
        reward_funcs=[task_reward, make_invalid_action_penalty(paw.invalid_action_penalty)],
        args=training_args,
        train_dataset=Dataset.from_dict({"prompt": games}),
        processing_class=tokenizer,
        peft_config=None if paw.adapter else get_peft_config(model_args),  # an adapter is the LoRA to train
        rollout_func=make_rollout_func(paw, chat, workers, curriculum),
        callbacks=[*callbacks, nonfinite, *([CurriculumCheckpoint(curriculum)] if curriculum else [])],
        paw=paw,
    )
    if model_args.use_peft or paw.adapter:
        upcast_trainable(trainer.model)
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except torch.OutOfMemoryError:  # in a rollout or a training step: say what fits, never a traceback
        print(f"error: {out_of_memory_message(paw, training_args, model_args, trainer.state.global_step)}",
              file=sys.stderr)
        sys.exit(1)
    finally:
        workers.close()
    if nonfinite.stopped:
        last = last_complete_checkpoint(training_args.output_dir)
        print(f"error: {nonfinite.limit} optimizer steps in a row had a NaN or inf gradient, so the run stopped at "
              f"step {trainer.state.global_step} (none of them changed the weights). Try a lower --learning_rate or "
              f"--max_grad_norm; " + (f"{last} is intact." if last else "no checkpoint was saved."), file=sys.stderr)
        sys.exit(1)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the run's log, which curves.py plots
    # Under torchrun: destroy the process group together; left to exit, gloo's threads may abort a process (SIGABRT)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return trainer


if __name__ == "__main__":
    main()
