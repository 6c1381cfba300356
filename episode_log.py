"""What a run records about its episodes: the statistics logged every step, and every few steps the episodes
themselves, turn by turn and token by token, for view.py.

Training: PaWTrainer hands `EpisodeLog` what it computed anyway: the rollout's episodes (`rollout`), then, micro-batch
by micro-batch, the values of the forward pass that computed the loss (`micro_batch`): nothing is recomputed and no
forward pass is added. An index carried with each row through TRL's shuffle and split maps them back to their episodes.
The first step and every `--episode_log_steps`-th go to OUTPUT_DIR/episodes/step-NNNNNN.jsonl.gz, one JSON line per
episode. eval.py writes the same records to its OUTPUT.jsonl (its own scoring forward: `--episode_details`).

A record (schema SCHEMA_VERSION, which view.py checks):
  schema, source ("train" or "eval"), game, task_type, won, task_return, steps, invalid_actions, truncated, error,
  first_observation, and turns, one per action:
    admissible (the actions listed beside the observation the agent answered; None if not shown), reply, action
    (None: no parseable action), valid, reward, observation (the environment's answer, o_{t+1}), and with token values
    reply_tokens, reply_logp, reply_entropy: the reply's tokens, their log-probs and next-token entropies;
    entropy: the action entropy H_t that top-alpha ranks (the mean of reply_entropy);
    obs_tokens, obs_logp: o_{t+1} as the agent saw it (cut at --max_observation_tokens), each token's log-prob.
  Training adds step, episode (its index in the step), group, process, micro_batch (where TRL's shuffle put it), reward
  (task_return - penalty * invalid_actions), advantage (None with GiGPO, whose advantage is per turn), group_return,
  lambda (the WM weight; None with --wm off), settings; per turn advantage, with the WM term selected, wm_loss (None
  without targets) and obs_clipped (CMAE: p > rho, no loss), with GiGPO anchor and anchor_size (its state's index in
  the group, and how many of the group's steps were taken in that state).
  eval.py adds run and seed, and per turn with --imagine imagined (the model's greedy o_{t+1}) and overlap.
Log-probs (natural log) and entropies are the forward's, at the run's temperature, rounded to 5 decimals. A cut turn
(`cut`: the token budget ended the episode inside the reply) has a reply and no observation.
"""

import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import GenerationConfig

from envs import env_class, format_admissible
from view import SCHEMA_VERSION
from wm_select import action_entropy


@dataclass
class EpisodeLogArguments:
    episode_log_steps: int = field(
        default=10, metadata={"help": "Record the episodes of the first step and of every N-th, turn by turn with "
                                      "their per-token values, to OUTPUT_DIR/episodes/ (python view.py OUTPUT_DIR); "
                                      "0: never."})
    episode_log_groups: int = field(
        default=0, metadata={"help": "Record only the first K groups of a logged step (0: all)."})

    def __post_init__(self):
        for name in ("episode_log_steps", "episode_log_groups"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        super().__post_init__()  # the checks of the flags beside these (PaWArguments: EnvArguments')


def rounded(values):
    return [round(v, 5) for v in values]


class TokenTexts:
    """Each token id's text, decoded once."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, {}

    def __call__(self, ids):
        for i in ids:
            if i not in self.texts:
                self.texts[i] = self.tokenizer.decode([i])
        return [self.texts[i] for i in ids]


def token_values(texts, completion_ids, action_index, obs_index, logp, entropy, clipped=None):
    """Per transition t (one dict per t up to the highest index): its reply's tokens, log-probs and entropies, and the
    tokens and log-probs of o_{t+1} (with CMAE's clipping flags). All arguments are per completion token."""
    num = max(max(action_index, default=-1), max(obs_index, default=-1)) + 1
    reply, observation = [[] for _ in range(num)], [[] for _ in range(num)]
    for j, (a, o) in enumerate(zip(action_index, obs_index)):
        if a >= 0:
            reply[a].append(j)
        elif o >= 0:
            observation[o].append(j)
    turns = []
    for r, o in zip(reply, observation):
        turn = {"reply_tokens": texts([completion_ids[j] for j in r]), "reply_logp": rounded([logp[j] for j in r]),
                "reply_entropy": rounded([entropy[j] for j in r]),
                "obs_tokens": texts([completion_ids[j] for j in o]), "obs_logp": rounded([logp[j] for j in o])}
        if clipped is not None:
            turn["obs_clipped"] = [bool(clipped[j]) for j in o]
        turns.append(turn)
    return turns


def merge_turns(turns, values):
    """The record's turns with their token values; a transition the token budget cut inside its reply (it never
    reached the environment) becomes a turn of its own."""
    merged = [dict(turn) for turn in turns]
    for t, extra in enumerate(values):
        if t == len(merged):
            merged.append({"admissible": None, "reply": "".join(extra["reply_tokens"]), "action": None, "valid": False,
                           "reward": 0.0, "observation": None, "cut": True})
        merged[t].update(extra)
    return merged


def mark_anchors(records):
    """GiGPO's anchor states per turn: the state's index among the distinct states of its group, and how many steps
    of the group were taken in it (1: no other step shares it, so its step advantage is 0)."""
    by_group = {}
    for record in records:
        by_group.setdefault(record["group"], []).append(record)
    for group in by_group.values():
        states = [[r["first_observation"]] + [t["observation"] for t in r["turns"]] for r in group]
        ids, counts = {}, Counter()
        for r, episode_states in zip(group, states):
            for turn, state in zip(r["turns"], episode_states):
                if not turn.get("cut"):
                    turn["anchor"] = ids.setdefault(state, len(ids))
                    counts[state] += 1
        for r, episode_states in zip(group, states):
            for turn, state in zip(r["turns"], episode_states):
                if not turn.get("cut"):
                    turn["anchor_size"] = counts[state]


def write_records(path, records):
    """One gzip-compressed JSON line per record, written to a temporary file first: a killed run never leaves a
    truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with gzip.open(partial, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(partial, path)


class EpisodeLog:
    """The trainer's episode log (see the module's docstring)."""

    def __init__(self, trainer):
        self.trainer, self.texts = trainer, None
        self.pending, self.micro_batches, self.step = None, 0, None  # local row -> record, while a step is logged

    @property
    def recording(self):
        return self.pending is not None

    def rollout(self, inputs, output, rollout_seconds):
        """Every step, the statistics; on a logged step (training only), the records' episode-level fields, and the
        row index (B,) that TRL's shuffle and split carry to compute_loss with the rows."""
        trainer = self.trainer
        log_statistics(trainer, inputs, rollout_seconds)
        paw, step, group = trainer.paw, trainer.state.global_step + 1, trainer.num_generations
        if not trainer.model.training or not paw.episode_log_steps or (step > 1 and step % paw.episode_log_steps):
            return
        self.texts = self.texts or TokenTexts(trainer.processing_class)
        settings = {key: getattr(paw, key) for key in ("wm", "wm_beta", "wm_alpha", "wm_loss", "wm_weighting",
                                                       "cmae_rho", "advantage", "invalid_action_penalty")}
        settings.update(num_generations=group, temperature=trainer.args.temperature)
        first = trainer.accelerator.process_index * len(inputs)
        self.pending, self.micro_batches, self.step = {}, 0, step
        for row, x in enumerate(inputs):
            episode = first + row
            if paw.episode_log_groups and episode // group >= paw.episode_log_groups:
                continue
            self.pending[row] = {
                "schema": SCHEMA_VERSION, "source": "train", "step": step, "episode": episode,
                "group": episode // group, "process": trainer.accelerator.process_index, **x["record"],
                "reward": x["task_return"] - paw.invalid_action_penalty * x["invalid_actions"], "settings": settings}
        output["episode_row"] = torch.arange(len(inputs), device=output["completion_ids"].device)

    @torch.no_grad()
    def micro_batch(self, inputs, logps, token_entropy, entropy=None, selected=None, wm_loss=None, weight=None):
        """The values one micro-batch's loss was computed from: per token (B, L) log-probs and entropies of the
        policy forward; with the WM term, per transition (B, T) action entropies, top-alpha's selection and L_WM, and
        the (B, 1) weights lambda. The step's records are written once its last micro-batch is in."""
        trainer = self.trainer
        if self.pending is None or "episode_row" not in inputs or not trainer.model.training:
            return
        paw = trainer.paw
        rows = [(r, self.pending[i]) for r, i in enumerate(inputs["episode_row"].tolist()) if i in self.pending]
        if rows:
            self._fill(inputs, [r for r, _ in rows], [record for _, record in rows], logps, token_entropy, entropy,
                       selected, wm_loss, weight, paw)
        self.micro_batches += 1
        if self.micro_batches == trainer.args.steps_per_generation:
            records = sorted(gather_object(list(self.pending.values())), key=lambda r: r["episode"])
            self.pending = None
            if trainer.accelerator.is_main_process:
                if paw.advantage == "gigpo":
                    mark_anchors(records)
                write_records(Path(trainer.args.output_dir) / "episodes" / f"step-{self.step:06d}.jsonl.gz", records)

    def _fill(self, inputs, rows, records, logps, token_entropy, entropy, selected, wm_loss, weight, paw):
        action_index, obs_index = inputs["action_index"][rows], inputs["obs_index"][rows]
        if entropy is None:
            num = int(torch.maximum(action_index.max(), obs_index.max()).clamp(min=0)) + 1
            entropy = action_entropy(token_entropy[rows], action_index, num)
        else:
            entropy = entropy[rows]
        logp = logps[rows].detach().float()
        clipped = (logp.exp() > paw.cmae_rho).tolist() if wm_loss is not None and paw.wm_loss == "cmae" else None
        advantages = inputs["advantages"][rows].tolist()
        columns = [inputs["completion_ids"][rows].tolist(), action_index.tolist(), obs_index.tolist(), logp.tolist(),
                   token_entropy[rows].float().tolist()]
        per_transition = [entropy.tolist()] + [None if x is None else x[rows].tolist() for x in (selected, wm_loss)]
        for k, record in enumerate(records):
            ids, actions, observations, row_logp, row_entropy = (column[k] for column in columns)
            values = token_values(self.texts, ids, actions, observations, row_logp, row_entropy,
                                  None if clipped is None else clipped[k])
            for t, turn in enumerate(values):
                turn["entropy"] = round(per_transition[0][k][t], 5) if turn["reply_tokens"] else None
                if selected is not None:
                    turn["selected"] = bool(per_transition[1][k][t])
                    turn["wm_loss"] = round(per_transition[2][k][t], 5) if turn["obs_tokens"] else None
                if isinstance(advantages[k], list):  # GiGPO: its step's advantage, on each of its reply tokens
                    turn["advantage"] = (round(advantages[k][actions.index(t)], 5) if t in actions else None)
                else:
                    turn["advantage"] = round(advantages[k], 5)
            record.update(
                turns=merge_turns(record["turns"], values), micro_batch=self.micro_batches,
                advantage=None if isinstance(advantages[k], list) else round(advantages[k], 5),
                group_return=round(inputs["group_return"][rows[k]].item(), 5),
                **{"lambda": None if weight is None else round(weight[rows[k], 0].item(), 5)})


def log_statistics(trainer, inputs, rollout_seconds):
    """The step's episodes, over all processes: success rate, length, invalid actions, environment errors, rollout
    time and speed, and the options an environment logs (e.g. the level a curriculum has reached)."""
    mode = "train" if trainer.model.training else "eval"
    metrics, device = trainer._metrics[mode], trainer.accelerator.device
    stats = {key: trainer.accelerator.gather(torch.tensor([float(row[key]) for row in inputs], device=device))
             for key in ("success", "num_steps", "invalid_actions", "env_error")}
    steps, invalid = stats["num_steps"], stats["invalid_actions"]
    metrics["episode/success_rate"].append(stats["success"].mean().item())
    metrics["episode/length"].append(steps.mean().item())
    metrics["episode/invalid_action_rate"].append((invalid.sum() / steps.sum().clamp(min=1)).item())
    metrics["episode/env_error_rate"].append(stats["env_error"].mean().item())
    generated = sum(index >= 0 for row in inputs for index in row["action_index"])
    metrics["time/rollout_s"].append(rollout_seconds)
    metrics["time/generated_tokens_per_s"].append(generated / rollout_seconds)
    for option in env_class(trainer.paw.env).logged_options:  # e.g. the level a curriculum has reached
        if option in inputs[0]:
            metrics[f"episode/{option}"].append(float(inputs[0][option]))


# ----------------------------------------------------------------------------------------------------------------
# eval.py's records: its own scoring forward (--episode_details) and the model's predicted observations (--imagine)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_completion(model, e, chunk=1024):
    """Per completion token of episode e, the model's log-prob of it and the entropy of the distribution it was drawn
    from (temperature 1): one forward pass, whose logits are computed `chunk` positions at a time (never the whole
    (L, vocab) matrix)."""
    ids = torch.tensor([e.context_ids], device=model.device)
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, len(e.prompt_ids) - 1:-1]
    targets, head = ids[0, len(e.prompt_ids):], model.get_output_embeddings()
    logps, entropies = [], []
    for start in range(0, len(targets), chunk):
        logp = torch.log_softmax(head(hidden[start:start + chunk]).float(), dim=-1)
        logps.append(logp.gather(1, targets[start:start + chunk, None])[:, 0])
        entropies.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(logps).tolist(), torch.cat(entropies).tolist()


def add_token_values(model, tokenizer, episodes):
    """eval.py --episode_details: each turn of each episode gets its token values (one scoring forward per
    episode)."""
    texts = TokenTexts(tokenizer)
    for e in episodes:
        logp, entropy = score_completion(model, e)
        values = token_values(texts, e.completion_ids, e.action_index, e.obs_index, logp, entropy)
        action = action_entropy(torch.tensor([entropy]), torch.tensor([e.action_index]), max(len(values), 1))[0]
        for turn, h in zip(values, action.tolist()):
            turn["entropy"] = round(h, 5) if turn["reply_tokens"] else None
        e.turns[:] = merge_turns(e.turns, values)


def token_overlap(predicted, real):
    """F1 of the two token multisets: 1 for the same tokens (in any order), 0 for none in common."""
    if not predicted or not real:
        return float(predicted == real)
    return 2 * sum((Counter(predicted) & Counter(real)).values()) / (len(predicted) + len(real))


@torch.no_grad()
def imagine(model, chat, episodes, cap, batch_size):
    """eval.py --imagine: after each action, the model's greedy prediction of o_{t+1} from the context the WM loss
    scores it in (everything before its first token), at most `cap` tokens, cut where the admissible actions would
    begin; recorded per turn beside the real one (`imagined`, `overlap`: token F1 against o_{t+1} as the agent saw it).
    Returns every turn's (overlap, whether the prediction is exactly o_{t+1}'s tokens)."""
    jobs = []  # (episode, t, context, the real observation's tokens)
    for e in episodes:
        for t in range(len(e.turns)):
            positions = [j for j, o in enumerate(e.obs_index) if o == t]
            if positions:
                jobs.append((e, t, e.prompt_ids + e.completion_ids[:positions[0]],
                             [e.completion_ids[j] for j in positions]))
    eos = model.generation_config.eos_token_id
    stops = sorted({chat.eot_id, *([eos] if isinstance(eos, int) else eos or [])})
    pad, marker, overlaps = chat.tokenizer.pad_token_id, format_admissible(["x"])[:-1], []
    greedy = GenerationConfig(do_sample=False, max_new_tokens=cap, eos_token_id=stops, pad_token_id=pad)
    jobs.sort(key=lambda job: len(job[2]))  # similar lengths batched together: little padding
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        width = max(len(context) for _, _, context, _ in batch)
        ids = torch.tensor([[pad] * (width - len(c)) + c for _, _, c, _ in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for _, _, c, _ in batch], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy)[:, width:].tolist()
        for (e, t, _, real), generated in zip(batch, out):
            end = next((i for i, token in enumerate(generated) if token in stops), len(generated))
            text = chat.tokenizer.decode(generated[:end], skip_special_tokens=True).split(marker)[0]
            predicted = chat.encode(text)[:cap]
            e.turns[t].update(imagined=text, overlap=round(token_overlap(predicted, real), 5))
            overlaps.append((e.turns[t]["overlap"], predicted == real))
    return overlaps
