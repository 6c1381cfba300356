"""PaW: Policy and World-model co-training for language agents, on TRL's GRPOTrainer.

    python train_paw.py --env alfworld                                  # Qwen2.5-7B-Instruct, NF4 + LoRA, GRPO+PaW
    python train_paw.py --env alfworld --model_name_or_path tiny --max_steps 2 --output_dir runs/smoke   # CPU

The agent is trained with GRPO on multi-turn episodes and, in the same optimizer step and from the same forward
pass, learns to predict each next observation o_{t+1} after its action a_t (PAW_SPEC.md). Every TRL/transformers
flag works too, as does `--config file.yaml`. Lines marked `# ALGO LOGIC:` are the method; `# TRY NOT TO MODIFY:`
marks plumbing.
"""

import copy
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
from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser, get_peft_config
from trl.models import unwrap_model_for_generation

from advantages import anchor_group_ids, gigpo_advantages, per_token, rloo_advantages
from env_workers import EnvWorkers
from envs import DataMissing, EnvArguments, env_class
from episode_log import EpisodeLog, EpisodeLogArguments
from gpu_cards import CARDS, find_card
from long_runs import CURRICULUM_FILE, CurriculumCheckpoint, SkipNonFiniteSteps, checkpoint_to_resume, end_process
from losses import TOKEN_LOSSES, adaptive_lambda, transition_wm_loss, wm_objective
from models import LOCAL_RUN_FLAGS, ModelMissing, load_model, model_flags, upcast_trainable
from plan import fit_to_machine, print_plan, stop_message
from rollout import ChatFormat, ModelPolicy, episode_fields, play
from wm_select import action_entropy, per_transition_mean, select_top, selection_quotas


@dataclass
class PaWArguments(EpisodeLogArguments, EnvArguments):
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


def default_flags():
    """The design card's RL run on that model."""
    return dict(
        **model_flags(),
        learning_rate=1e-5,  # LoRA needs ~10x the full fine-tuning rate (1e-6 in GiGPO/verl-agent)
        num_generations=8, per_device_train_batch_size=4, gradient_accumulation_steps=4,  # 2 games x 8 per step
        max_completion_length=6144, max_steps=200, logging_steps=1, save_steps=25, disable_dropout=True,
        output_dir="runs/paw",
    )


# ----------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the PaW trainer. TRL's GRPO loss is untouched; the WM term is added from the same forward pass.
# ----------------------------------------------------------------------------------------------------------------


class PaWTrainer(GRPOTrainer):
    def __init__(self, *args, paw: PaWArguments, **kwargs):
        super().__init__(*args, **kwargs)
        check_temperature(paw, self.args)
        self.paw, self.episode_log = paw, EpisodeLog(self)  # what a run records about its episodes: episode_log.py

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        # TRY NOT TO MODIFY: keep the log-probs (with their graph) and entropies of the policy-loss forward, which
        # scores every completion token, observations included. TRL asks for entropies only in that forward.
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if kwargs.get("compute_entropy") and (self.paw.wm != "off" or self.episode_log.recording):
            self._policy_forward = (logps, entropies)
        return logps, entropies, aux_loss

    def _generate_and_score_completions(self, inputs):
        # TRY NOT TO MODIFY: TRL merged the rollout's extra fields into `inputs`; carry the per-token transition
        # indices and each group's mean task return into the batch that compute_loss receives.
        start = time.perf_counter()
        output = super()._generate_and_score_completions(inputs)  # the rollout (our rollout_func), then TRL's scoring
        rollout_seconds = time.perf_counter() - start
        device, width = output["completion_ids"].device, output["completion_ids"].size(1)
        live = output["completion_mask"].bool()  # --mask_truncated_completions zeroes a truncated episode's tokens
        for key in ("action_index", "obs_index"):
            index = torch.tensor([row[key] + [-1] * (width - len(row[key])) for row in inputs], device=device)
            output[key] = index.where(live, -1)
        # this process's rows of the gathered batch
        local = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        # Top-alpha selection runs per micro-batch (compute_loss), after TRL shuffles and splits the batch: each
        # episode's quota (B,) goes with it, and a micro-batch keeps as many transitions as its quotas add up to. The
        # quotas of all processes' episodes add up to the WM mean's denominator, which a 0-dim tensor carries to every
        # micro-batch whole, like TRL's own num_items_in_batch.
        obs_index = output["obs_index"]
        num_targets = per_transition_mean(live.float(), obs_index, int(obs_index.max().clamp(min=0)) + 1)[1]
        eligible = self.accelerator.gather((num_targets > 0).sum(dim=1))  # per episode, as compute_loss counts them
        quotas = selection_quotas(eligible.tolist(), self.paw.wm_alpha)
        output["wm_quota"] = torch.tensor(quotas[local], device=device)
        output["wm_num_selected"] = torch.tensor(float(sum(quotas)), device=device)
        group = self.num_generations if self.model.training else self.num_generations_eval
        returns = self.accelerator.gather(torch.tensor([row["task_return"] for row in inputs], device=device))
        output["group_return"] = returns.view(-1, group).mean(dim=1).repeat_interleave(group)[local]
        if self.paw.advantage != "grpo":  # (B,) or (B, L): TRL's loss takes either as it is
            output["advantages"] = self._advantages(inputs, group, output["action_index"], local)
        self.episode_log.rollout(inputs, output, rollout_seconds)  # statistics; a logged step's episodes
        return output

    def _advantages(self, inputs, group, action_index, local):
        """GiGPO's per-token or RLOO's per-episode advantages of this process's episodes (`local` rows), from the
        episodes of all processes (advantages.py): a group may span processes."""
        paw, mode = self.paw, "train" if self.model.training else "eval"
        keys = ("task_return", "invalid_actions", "step_rewards", "step_valid", "step_parsed", "anchors")
        rows = gather_object([{key: row[key] for key in keys} for row in inputs])
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
        logps, token_entropy = self.__dict__.pop("_policy_forward", (None, None))  # L_RL's forward: no second pass
        if self.paw.wm == "off":
            self.episode_log.micro_batch(inputs, logps, token_entropy)  # on a logged step, what the forward computed
            return loss
        # ALGO LOGIC: L = L_RL + beta * mean over selected transitions t of lambda_g(t) * L_WM(t)
        paw = self.paw
        action_index, obs_index = inputs["action_index"], inputs["obs_index"]
        num_transitions = int(torch.maximum(action_index.max(), obs_index.max()).clamp(min=0)) + 1
        entropy = action_entropy(token_entropy, action_index, num_transitions)  # (B, T), no gradient
        token_loss = TOKEN_LOSSES[paw.wm_loss](logps, paw.cmae_rho)  # (B, L)
        transition_loss, num_targets = transition_wm_loss(token_loss, obs_index, num_transitions)  # (B, T)
        # top-alpha by action entropy: this micro-batch's share of the batch's ceil(alpha * eligible) transitions
        selected = select_top(entropy, num_targets > 0, int(inputs["wm_quota"].sum()))
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
        self.episode_log.micro_batch(inputs, logps, token_entropy, entropy, selected, transition_loss, weight)

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


# ----------------------------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: rollouts and rewards
# ----------------------------------------------------------------------------------------------------------------


def make_rollout_func(paw: PaWArguments, chat: ChatFormat, workers: EnvWorkers, curriculum=None):
    def rollout_func(prompts, trainer):
        """prompts: one game id per episode; TRL has repeated each game num_generations times (the group)."""
        generation_config = copy.deepcopy(trainer.generation_config)
        generation_config.update(max_new_tokens=paw.max_action_tokens, use_cache=True)
        options = {**paw.env_kwargs, **(curriculum.options() if curriculum else {})}  # the environment's curriculum
        envs = [workers.make(paw.env, game, options) for game in prompts]
        with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as model:
            policy = ModelPolicy(model, chat, generation_config, paw.reuse_cache)
            episodes = play(envs, policy, chat, paw.max_env_steps, trainer.args.max_completion_length,
                            paw.show_admissible, paw.max_observation_tokens)
        fields = episode_fields(episodes)
        fields.update({key: [options[key]] * len(episodes) for key in env_class(paw.env).logged_options
                       if key in options})
        if curriculum:  # every process moves on the successes of all, so that all stay at the same level
            curriculum.update(gather_object([e.won for e in episodes]))
        return fields

    return rollout_func


def task_reward(completions, task_return, **kwargs):
    """The environment's return for the task, in [0, R_max = 1] (ALFWorld: 1 if the task was completed, else 0)."""
    return task_return


def make_invalid_action_penalty(coef):
    def invalid_action_penalty(completions, invalid_actions, **kwargs):
        return [-coef * n for n in invalid_actions]

    return invalid_action_penalty


def check_temperature(paw: PaWArguments, args: GRPOConfig):
    if paw.wm != "off" and args.temperature != 1.0:
        raise ValueError("--wm echo/paw needs --temperature 1.0: the WM loss and the action entropy are defined at "
                         "temperature 1, and they share the policy forward, whose log-probs TRL computes at "
                         "--temperature")


def parse_args(argv=None):
    """PaW's, TRL's and the model's flags, fitted to this machine (plan.py), its plan printed; bad flags end with a
    clear message and exit code 2 before anything heavy loads."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser((PaWArguments, GRPOConfig, ModelConfig))
    parser.set_defaults(**default_flags())
    try:
        paw, training_args, model_args, plan = fit_to_machine(parser, argv, LOCAL_RUN_FLAGS)
        check_temperature(paw, training_args)
        if training_args.use_vllm:
            raise ValueError("--use_vllm is not supported: PaW's multi-turn rollouts generate with transformers")
        if training_args.max_completion_length < paw.max_action_tokens:
            raise ValueError("--max_completion_length (the whole episode) must be >= --max_action_tokens (one reply)")
        training_args.resume_from_checkpoint = checkpoint_to_resume(  # `last`: the same command starts and resumes
            training_args.resume_from_checkpoint, training_args.output_dir, [CURRICULUM_FILE] if paw.curriculum else [])
    except ValueError as error:
        parser.error(str(error))
    if os.environ.get("RANK", "0") == "0":  # one plan per run, not one per process
        print_plan(paw, training_args, model_args, plan)
    if paw.dry_run:
        sys.exit(0)
    return paw, training_args, model_args


def main(argv=None, callbacks=()):
    """Train; `callbacks` (transformers TrainerCallbacks) are for scripts that drive a run, such as study.py."""
    paw, training_args, model_args = parse_args(argv)
    workers = EnvWorkers(paw.env_workers, paw.env_timeout)  # forked before the model loads: small
    try:
        games = paw.train_games(training_args.seed)  # the environment's: official files, or generated ids
        curriculum = env_class(paw.env).curriculum(paw.env_kwargs) if paw.curriculum else None
        model, tokenizer = load_model(model_args, training_args.device, paw.adapter)
    except (DataMissing, ModelMissing, ValueError) as error:  # missing data or model, a bad split or option
        workers.close()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    nonfinite = SkipNonFiniteSteps(paw.max_nonfinite_steps)
    trainer = PaWTrainer(
        model=model,
        reward_funcs=[task_reward, make_invalid_action_penalty(paw.invalid_action_penalty)],
        args=training_args,
        train_dataset=Dataset.from_dict({"prompt": games}),
        processing_class=tokenizer,
        peft_config=None if paw.adapter else get_peft_config(model_args),  # an adapter is the LoRA to train
        rollout_func=make_rollout_func(paw, ChatFormat(tokenizer), workers, curriculum),
        callbacks=[*callbacks, nonfinite,
                   *([CurriculumCheckpoint(curriculum, training_args.resume_from_checkpoint)] if curriculum else [])],
        paw=paw,
    )
    if model_args.use_peft or paw.adapter:
        upcast_trainable(trainer.model)
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        if nonfinite.stopped:
            print(f"error: {nonfinite.stop_message(training_args.output_dir, trainer.state.global_step)}",
                  file=sys.stderr)
            end_process(1)
        trainer.save_model(training_args.output_dir)
        trainer.save_state()  # trainer_state.json: the run's log, which curves.py plots
        trainer.accelerator.wait_for_everyone()  # under torchrun, end together: gloo's threads may abort a process
        trainer.accelerator.end_training()
    except RuntimeError as error:  # out of memory, NaN or inf logits, a process gone: what to do, never a traceback
        if (message := stop_message(error, paw, training_args, model_args, trainer.state.global_step)) is None:
            raise  # an error with no advice
        print(f"error: {message}", file=sys.stderr)
        end_process(1)
    finally:
        workers.close()
    return end_process(0, trainer)  # under torchrun the process ends here, without teardown (long_runs.py says why)


if __name__ == "__main__":
    main()
