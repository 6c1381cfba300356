"""The multi-turn episode loop, shared by training (train_paw.py) and evaluation (eval.py), and what an episode hands
TRL's trainer (`episode_fields`).

An episode is one token sequence, built by concatenating token ids (the history is never re-tokenised):

    prompt     = system + user(o_1 [+ admissible]) + assistant header
    completion = a_1 <eot> | user(o_2 [+ admissible]) + assistant header | a_2 <eot> | ... | a_T <eot>
                 | user(o_T+1) <eot>

Per completion token the episode records `action_index` (t on the tokens the policy generated at turn t, else -1:
the policy mask) and `obs_index` (t on the raw text of o_{t+1}, else -1: the world-model mask). All live episodes
advance in lock step: one policy call (one batched `generate`) per turn over every episode still running.
"""

import copy
import random
import re
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import DynamicCache, LogitsProcessor

from envs import Step, TextEnv, format_admissible


class ChatFormat:
    """The token pieces of a tokenizer's chat template, found by rendering a conversation with placeholders."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        marks = ["\x00o1\x00", "\x00a1\x00", "\x00o2\x00"]
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": "S"}, {"role": "user", "content": marks[0]},
             {"role": "assistant", "content": marks[1]}, {"role": "user", "content": marks[2]}],
            tokenize=False, add_generation_prompt=True,
        )
        _, _, between, after = re.split("|".join(map(re.escape, marks)), text)
        self.eot = tokenizer.eos_token  # the token that ends an assistant turn (<|im_end|> for Qwen2.5)
        if not between.startswith(self.eot):
            raise ValueError(f"unsupported chat template: an assistant turn does not end with {self.eot!r}")
        self.eot_id = tokenizer.convert_tokens_to_ids(self.eot)
        self.user_header = self.encode(between[len(self.eot):])  # e.g. "\n<|im_start|>user\n"
        self.assistant_header = self.encode(after)  # e.g. "<|im_end|>\n<|im_start|>assistant\n"

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt(self, system, user):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Episode:
    env: TextEnv
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    action_index: list[int] = field(default_factory=list)  # policy tokens of turn t -> t, else -1
    obs_index: list[int] = field(default_factory=list)  # raw text of o_{t+1} -> t, else -1
    logprobs: list[float] | None = field(default_factory=list)  # sampling log-prob of policy tokens, else 0.0;
    # None once a reply came from a policy that records none (scripted, expert, random)
    first_observation: str = ""  # o_1, shown in the prompt
    last: Step | None = None  # the latest observation, with its admissible actions
    turns: list[dict] = field(default_factory=list)  # per turn: reply, action, observation, reward, valid
    won: bool = False
    task_return: float = 0.0  # sum of the environment's rewards (ALFWorld: 1 if won)
    finished: bool = False
    truncated: bool = False  # ended by the step or token budget
    error: str | None = None  # the environment raised; the episode counts as failed

    @property
    def context_ids(self):
        return self.prompt_ids + self.completion_ids

    @property
    def invalid_actions(self):
        return sum(not turn["valid"] for turn in self.turns)

    def append(self, ids, action_index=-1, obs_index=-1, logprobs=None):
        self.completion_ids += ids
        self.action_index += [action_index] * len(ids)
        self.obs_index += [obs_index] * len(ids)
        if self.logprobs is None:
            return
        if action_index >= 0 and logprobs is None:
            self.logprobs = None
        else:
            self.logprobs += logprobs if action_index >= 0 else [0.0] * len(ids)


def call_all(envs, method, arguments=None):
    """`env.method(*args)` for every environment: the results, with an exception in place of a failed call's result.

    Environments in worker processes (env_workers.RemoteEnv) all start before the first is waited for.
    """
    calls = []
    for env, args in zip(envs, arguments or [()] * len(envs)):
        calls.append(env.submit(method, *args) if hasattr(env, "submit") else partial(getattr(env, method), *args))
    results = []
    for call in calls:
        try:
            results.append(call())
        except Exception as error:  # a broken game ends only its own episode
            results.append(error)
    return results


def start_episode(env, first, chat, show_admissible):
    """The episode's prompt from the first observation (or, if reset failed, a placeholder that is never trained)."""
    episode = Episode(env)
    if isinstance(first, Exception):
        episode.prompt_ids = chat.encode(chat.prompt(env.system_prompt, "The environment failed to start."))
        episode.append([chat.eot_id])  # TRL needs a non-empty completion; it carries no policy token
        episode.error, episode.finished = f"reset: {type(first).__name__}: {first}", True
        return episode
    episode.last, episode.first_observation = first, first.observation
    episode.prompt_ids = chat.encode(chat.prompt(env.system_prompt, first.observation + format_admissible(
        first.admissible if show_admissible else [])))
    return episode


def play(envs, policy, chat, max_steps, max_tokens=None, show_admissible=True, max_observation_tokens=None):
    """Run one episode per environment to the end; return the episodes.

    policy(episodes) -> one list of reply token ids per episode (it sees `episode.context_ids`).
    max_steps: actions per episode. max_tokens: cap on each episode's completion length, in tokens.
    max_observation_tokens: each observation is cut to this many tokens (what the agent sees is the WM target).
    Each turn: one policy call for every live episode, then every live environment steps (in parallel when the
    environments live in worker processes).
    """
    episodes = [start_episode(env, first, chat, show_admissible)
                for env, first in zip(envs, call_all(envs, "reset"))]
    budget = max_tokens if max_tokens is not None else float("inf")
    for t in range(max_steps):
        for e in episodes:
            if not e.finished and len(e.completion_ids) >= budget:
                e.finished = e.truncated = True
        live = [e for e in episodes if not e.finished]
        if not live:
            break
        replies = policy(live)
        logprobs = getattr(policy, "last_logprobs", None) or [None] * len(live)
        texts = [add_reply(e, t, reply, lp, chat, budget) for e, reply, lp in zip(live, replies, logprobs)]
        acting = [(e, text) for e, text in zip(live, texts) if text is not None]
        steps = call_all([e.env for e, _ in acting], "step", [(text,) for _, text in acting])
        for (e, text), step in zip(acting, steps):
            add_observation(e, t, text, step, chat, budget, t == max_steps - 1, show_admissible,
                            max_observation_tokens)
    for e in episodes:
        e.finished = True
    call_all(envs, "close")
    return episodes


def add_reply(e, t, reply, logprobs, chat, budget):
    """Append the policy's reply; return its text for the environment, or None if the token budget ended it."""
    closed = reply[-1:] == [chat.eot_id]
    if len(e.completion_ids) + len(reply) + (not closed) > budget:  # keep what fits, stop before acting
        room = max(0, budget - len(e.completion_ids))
        e.append(reply[:room], action_index=t, logprobs=None if logprobs is None else logprobs[:room])
        e.finished = e.truncated = True
        return None
    e.append(reply, action_index=t, logprobs=logprobs)
    if not closed:  # cut off at the per-turn token cap: close the turn, without making it a policy token
        e.append([chat.eot_id])
    return chat.tokenizer.decode(reply, skip_special_tokens=True)


def add_observation(e, t, text, step, chat, budget, last_turn, show_admissible, max_observation_tokens):
    """Record the environment's answer and append o_{t+1} (the WM target), then the next assistant header."""
    shown = e.last.admissible if show_admissible else None  # the actions listed beside the observation answered
    if isinstance(step, Exception):  # a crashing environment ends only this episode, as a failure
        e.turns.append({"reply": text, "action": None, "observation": None, "reward": 0.0, "valid": False,
                        "admissible": shown})
        e.error, e.finished = f"step {t}: {type(step).__name__}: {step}", True
        return
    e.turns.append({"reply": text, "action": step.action, "observation": step.observation,
                    "reward": step.reward, "valid": step.valid, "admissible": shown})
    e.last, e.won, e.task_return = step, e.won or step.won, e.task_return + step.reward

    def fits(n):
        return len(e.completion_ids) + n <= budget

    observation = chat.encode(step.observation)[:max_observation_tokens]
    follow = chat.encode(format_admissible(step.admissible if show_admissible else [])) + chat.assistant_header
    ending = step.done or last_turn or not fits(len(chat.user_header) + len(observation) + len(follow))
    e.finished, e.truncated = ending, ending and not step.done
    if ending and not fits(len(chat.user_header) + len(observation) + 1):
        return  # not even o_{t+1} fits: the sequence ends with the action
    e.append(chat.user_header)
    e.append(observation, obs_index=t)
    e.append([chat.eot_id] if ending else follow)


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
        "record": [episode_record(e) for e in episodes],  # what episode_log.py records of it (view.py)
    }


def episode_record(e):
    """The episode as its record (episode_log.py) begins, before any token values; eval.py writes one per game."""
    return {"game": e.env.game, "task_type": e.env.task_type, "won": e.won, "task_return": e.task_return,
            "steps": len(e.turns), "invalid_actions": e.invalid_actions, "truncated": e.truncated, "error": e.error,
            "first_observation": e.first_observation, "turns": e.turns}


# ----------------------------------------------------------------------------------------------------------------
# Policies: callables that map the live episodes to reply token ids.
# ----------------------------------------------------------------------------------------------------------------


class NonFiniteLogits(RuntimeError):
    """The policy's logits held NaN or inf (in float16, an overflow): in `episodes` of `batch` episodes, at `turn`."""

    def __init__(self, episodes, batch, turn):
        super().__init__(f"the policy's logits held NaN or inf in {episodes} of {batch} episodes at turn {turn}")
        self.episodes, self.batch, self.turn = episodes, batch, turn


class RecordLogprobs(LogitsProcessor):
    """Records each sampled token's log-probability at the sampling temperature (before top-k/top-p filters: what
    TRL's training forward computes). It sees step t's scores, and at step t + 1 the token chosen from them.

    It also flags the rows whose logits held NaN or inf at any step (their log-softmax has a NaN), on the device
    with no synchronisation per step; `check` raises NonFiniteLogits, once per `generate`."""

    def __init__(self, temperature):
        self.temperature, self.scores, self.logprobs = temperature, None, []
        self.broken = torch.tensor(False)  # (B,) once a step has run

    def __call__(self, input_ids, scores):
        self._take(input_ids[:, -1])
        self.scores = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.broken = self.scores.amax(dim=-1).isnan() | self.broken
        return scores

    def check(self, episodes):
        if self.broken.any():
            raise NonFiniteLogits(int(self.broken.sum()), len(episodes), len(episodes[0].turns) + 1)

    def _take(self, tokens):
        if self.scores is not None:
            self.logprobs.append(self.scores.gather(1, tokens.unsqueeze(1)).squeeze(1))

    def finish(self, last_tokens):
        self._take(last_tokens)
        return torch.stack(self.logprobs, dim=1).tolist()


class ModelPolicy:
    """Samples one reply per live episode with a single batched `generate` call, and records its log-probs.

    With `reuse_cache`, each episode's attention (KV) cache is kept from one turn to the next: a turn prefills only
    the tokens added since (the environment's answer), not the whole history, which would cost O(T^2) over T turns.
    Each turn the kept caches of the live episodes are gathered into one left-padded batch, so finished episodes
    leave it; a row reads [padding | cached tokens | padding | new tokens], and positions come from the attention
    mask, so every token keeps the position (and RoPE rotation) it would have in a fresh forward pass.
    """

    def __init__(self, model, chat, generation_config, reuse_cache=True):
        self.model, self.chat, self.reuse_cache = model, chat, reuse_cache
        self.generation_config = copy.deepcopy(generation_config)
        self.generation_config.return_dict_in_generate = True  # to get the cache back
        stops = generation_config.eos_token_id
        self.stop_ids = {chat.eot_id, *([stops] if isinstance(stops, int) else stops or [])}
        self.generation_config.eos_token_id = sorted(self.stop_ids)  # a reply also ends with the end of its turn
        self.cache, self.kept = None, {}  # id(episode) -> (row in self.cache, cache positions, their token ids)
        self.prefilled = 0  # tokens run through the model before generating (prompt or history), for bench.py
        self.last_logprobs = []

    def _reusable(self, episode):
        row, positions, ids = self.kept.get(id(episode), (None, [], []))
        return (row, positions) if episode.context_ids[: len(ids)] == ids else (None, [])

    @torch.no_grad()
    def __call__(self, episodes):
        contexts = [e.context_ids for e in episodes]
        kept = [self._reusable(e) for e in episodes]
        cached = [len(positions) for _, positions in kept]
        width, extra = max(cached), max(len(c) - k for c, k in zip(contexts, cached))
        pad = self.chat.tokenizer.pad_token_id
        rows = [[pad] * (width - k) + c[:k] + [pad] * (extra - len(c) + k) + c[k:] for c, k in zip(contexts, cached)]
        mask = [[0] * (width - k) + [1] * k + [0] * (extra - len(c) + k) + [1] * (len(c) - k)
                for c, k in zip(contexts, cached)]
        device = self.model.device
        recorder = RecordLogprobs(self.generation_config.temperature or 1.0)
        try:
            output = self.model.generate(
                input_ids=torch.tensor(rows, device=device), attention_mask=torch.tensor(mask, device=device),
                past_key_values=self._gather(kept, width) if width else None,
                generation_config=self.generation_config, logits_processor=[recorder],
            )
        except RuntimeError:  # sampling refuses NaN probabilities ("probability tensor contains ... nan"): say why
            recorder.check(episodes)
            raise
        recorder.check(episodes)  # greedy decoding took NaN's argmax: that reply is never played
        self.prefilled += sum(len(c) - k for c, k in zip(contexts, cached))
        new_tokens = output.sequences[:, width + extra:]
        logprobs = recorder.finish(new_tokens[:, -1])
        replies, self.last_logprobs, self.kept = [], [], {}
        for b, (row, e, context, k) in enumerate(zip(new_tokens.tolist(), episodes, contexts, cached)):
            end = next((i for i, token in enumerate(row) if token in self.stop_ids), len(row) - 1)
            replies.append(row[: end + 1])
            self.last_logprobs.append(logprobs[b][: end + 1])
            if self.reuse_cache:  # every token but the last generated one has its keys and values in the cache
                fed = min(end + 1, len(row) - 1)
                new = len(context) - k
                positions = (list(range(width - k, width)) + list(range(width + extra - new, width + extra))
                             + list(range(width + extra, width + extra + fed)))
                self.kept[id(e)] = (b, positions, context + row[:fed])
        self.cache = output.past_key_values if self.reuse_cache else None
        return replies

    def _gather(self, kept, width):
        """The kept caches of this turn's episodes as one batch, each left-padded to `width` positions.

        Layer by layer, each old layer freed once copied: the cache never exists twice (it is the rollout's largest
        memory cost on a GPU, see memory_estimate.py).
        """
        rows = torch.tensor([0 if row is None else row for row, _ in kept], device=self.model.device)[:, None]
        index = torch.tensor([[0] * (width - len(p)) + p for _, p in kept], device=self.model.device)
        layers = []
        for layer in self.cache.layers:
            layers.append((layer.keys[rows, :, index].transpose(1, 2), layer.values[rows, :, index].transpose(1, 2)))
            layer.keys = layer.values = None
        self.cache = None
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)


def text_policy(chat, choose):
    """A policy from a function episode -> reply text (scripted, expert or random agents)."""
    return lambda episodes: [chat.encode(choose(e)) + [chat.eot_id] for e in episodes]


def expert_policy(chat):
    """Replays each game's walkthrough: the replies that solve it (ALFWorld: its stored expert solution)."""
    return text_policy(chat, lambda e: e.env.walkthrough[len(e.turns)])


def random_policy(chat, seed):
    """Each environment's own random legal reply (ALFWorld: a uniformly random admissible action): the floor any
    learning agent must beat. Seeded per reply, so the result does not depend on where the environments run."""
    rng = random.Random(seed)

    def policy(episodes):
        texts = call_all([e.env for e in episodes], "random_reply", [(rng.randrange(2**32),) for _ in episodes])
        for text in texts:
            if isinstance(text, Exception):
                raise text
        return [chat.encode(text) + [chat.eot_id] for text in texts]

    return policy
