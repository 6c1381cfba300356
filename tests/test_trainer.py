"""PaWTrainer against TRL's GRPOTrainer and against an independent computation of the WM gradient."""

import inspect
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from scripted import ScriptedEnv, scripted_policy
from test_advantages import reference_gigpo
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

import train_paw
from losses import TOKEN_LOSSES
from rollout import play
from train_paw import PaWArguments, PaWTrainer, episode_fields, make_invalid_action_penalty, task_reward

GROUP = 4
# Serial numbers pick each episode's script: the first group wins half its episodes, the second none.
SERIALS = [0, 1, 2, 3, 3, 2, 3, 2]
LR = 0.5


def scripted_rollout(chat, serials=SERIALS, cut=None, numbered=True):
    """Scripted episodes; `cut` names one whose last token is dropped, which TRL then sees as truncated; with
    numbered=False, observations repeat across episodes and, in a fourth turn, within one (GiGPO's anchor states)."""

    def rollout_func(prompts, trainer):
        envs = [ScriptedEnv(game, serial, numbered=numbered) for game, serial in zip(prompts, serials, strict=True)]
        rollout_func.episodes = play(envs, scripted_policy(chat), chat, max_steps=3 if numbered else 4)
        fields = episode_fields(rollout_func.episodes)
        if cut is not None:
            for key in ("completion_ids", "env_mask", "action_index", "obs_index"):
                fields[key][cut] = fields[key][cut][:-1]
        return fields

    return rollout_func


def sgd_config(tmp_path, **overrides):
    """One plain SGD step with no clipping, so that an update is exactly -lr * gradient."""
    return GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no", max_steps=1,
        logging_steps=1, num_generations=GROUP, max_completion_length=1024,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        gradient_checkpointing=False, disable_dropout=True, seed=0, **{"per_device_train_batch_size": 8, **overrides},
    )


def build_trainer(tiny_path, chat, tmp_path, paw=None, peft=False, serials=SERIALS, cut=None, numbered=True,
                  **config):
    """A GRPOTrainer (paw=None) or PaWTrainer on the scripted rollouts of two games."""
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    games = Dataset.from_dict({"prompt": ["room-a", "room-b"]})
    kwargs = dict(
        model=model, reward_funcs=[task_reward, make_invalid_action_penalty(0.1)], args=sgd_config(tmp_path, **config),
        train_dataset=games, eval_dataset=games, processing_class=chat.tokenizer,
        rollout_func=scripted_rollout(chat, serials, cut, numbered),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        if peft else None,
    )
    return GRPOTrainer(**kwargs) if paw is None else PaWTrainer(paw=paw, **kwargs)


def train_once(tiny_path, chat, tmp_path, paw=None, peft=False, serials=SERIALS, cut=None, numbered=True, **config):
    """Train one step on the scripted rollouts; return (initial params, update, trainer)."""
    trainer = build_trainer(tiny_path, chat, tmp_path, paw, peft, serials, cut, numbered, **config)
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    trainer.train()
    return before, {n: params[n].detach() - before[n] for n in params}, trainer


def test_wm_off_is_bit_identical_to_plain_grpo(tiny_path, chat, tmp_path):
    _, grpo_update, grpo = train_once(tiny_path, chat, tmp_path / "grpo")
    _, off_update, off = train_once(tiny_path, chat, tmp_path / "off", PaWArguments(wm="off"))
    assert any(update.abs().sum() > 0 for update in grpo_update.values())  # the step did move the model
    assert all(torch.equal(grpo_update[n], off_update[n]) for n in grpo_update)
    assert "wm/loss" not in off.state.log_history[0]


def reference_transitions(model, episodes, paw, skip=None):
    """Every transition that has observation tokens, written out with plain loops over episodes, transitions and
    tokens (PAW_SPEC §1, §2): its (episode, step), action entropy, L_WM(t), its group's lambda, and how many of its
    target tokens the model predicts with p > rho. The episode numbered `skip` has no WM targets (but still counts in
    its group's return)."""
    rows = []
    for b, e in enumerate(episodes):
        if b == skip:
            continue
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        logits = model(input_ids=ids).logits[0, len(e.prompt_ids) - 1:-1].float()  # predicts each completion token
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1).detach()
        token_logp = logp[torch.arange(len(e.completion_ids)), torch.tensor(e.completion_ids)]
        group = episodes[b // GROUP * GROUP:(b // GROUP + 1) * GROUP]
        lam = min(max(1 - sum(x.task_return for x in group) / GROUP, 0.0), 1.0)
        lam = lam if paw.wm_weighting == "adaptive" else 1.0
        for t in range(len(e.turns)):
            action = [j for j, i in enumerate(e.action_index) if i == t]
            target = [j for j, i in enumerate(e.obs_index) if i == t]
            if target:
                losses = [TOKEN_LOSSES[paw.wm_loss](token_logp[j], paw.cmae_rho) for j in target]
                rows.append({"key": (b, t), "entropy": entropy[action].mean().item(), "loss": sum(losses) / len(target),
                             "lambda": lam, "clipped": sum(token_logp[j].exp().item() > paw.cmae_rho for j in target),
                             "tokens": len(target)})
    return rows


def top_alpha(rows, alpha):
    """The keys of the ceil(alpha * n) transitions of highest action entropy."""
    ranked = sorted(rows, key=lambda row: -row["entropy"])
    return {row["key"] for row in ranked[: math.ceil(alpha * len(rows))]}


def reference_wm_loss(model, episodes, paw, skip=None, selected=None):
    """beta * the mean of lambda * L_WM(t) over the selected transitions: those given by key, or by default the top
    alpha of the whole batch by action entropy."""
    rows = reference_transitions(model, episodes, paw, skip)
    selected = top_alpha(rows, paw.wm_alpha) if selected is None else selected
    kept = [row for row in rows if row["key"] in selected]
    return paw.wm_beta * sum(row["lambda"] * row["loss"] for row in kept) / len(kept)


@pytest.mark.parametrize("mode,extra,peft", [
    ("paw", {}, False), ("paw", {}, True), ("echo", {}, False),
    ("paw", {"wm_alpha": 1.0, "wm_loss": "ce", "wm_weighting": "constant", "cmae_rho": 0.5}, False),
])
def test_wm_update_is_minus_lr_times_the_wm_gradient(tiny_path, chat, tmp_path, mode, extra, peft):
    paw = PaWArguments(wm=mode, **extra)
    before, off_update, _ = train_once(tiny_path, chat, tmp_path / "off", PaWArguments(wm="off"), peft)
    _, wm_update, trainer = train_once(tiny_path, chat, tmp_path / mode, paw, peft)

    error, reference = compare_with_reference(before, off_update, wm_update, trainer, paw)
    assert error < 1e-3
    assert trainer.state.log_history[0]["wm/loss"] == pytest.approx(reference / paw.wm_beta, rel=1e-4)


def test_cmae_clips_the_observation_tokens_predicted_above_rho(tiny_path, chat, tmp_path):
    # The random tiny model predicts each observation token with p of 0.0013 to 0.0024 (about 1/669): rho = 0.002
    # clips part of them, where the default 0.9 would clip none.
    paw = PaWArguments(wm="paw", cmae_rho=0.002)
    before, off_update, _ = train_once(tiny_path, chat, tmp_path / "off", PaWArguments(wm="off"))
    _, wm_update, trainer = train_once(tiny_path, chat, tmp_path / "paw", paw)
    assert compare_with_reference(before, off_update, wm_update, trainer, paw)[0] < 1e-3
    restore(trainer.model, before)
    rows = reference_transitions(trainer.model, trainer.rollout_func.episodes, paw)
    kept = [row for row in rows if row["key"] in top_alpha(rows, paw.wm_alpha)]
    clipped = sum(row["clipped"] for row in kept) / sum(row["tokens"] for row in kept)
    assert 0.1 < clipped < 0.9
    assert trainer.state.log_history[0]["wm/clipped_frac"] == pytest.approx(clipped, rel=1e-6)


def spy_on_selection(monkeypatch):
    """Per micro-batch the trainer trains on: its rows' (prompt, completion) token lists and the (B, T) mask of the
    transitions its top-alpha selection kept."""
    micro_batches = []
    real_compute_loss, real_select_top = PaWTrainer.compute_loss, train_paw.select_top

    def compute_loss(self, model, inputs, *args, **kwargs):
        rows = [(p[pm.bool()].tolist(), c[cm.bool()].tolist()) for p, pm, c, cm in
                zip(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"])]
        micro_batches.append({"rows": rows})
        return real_compute_loss(self, model, inputs, *args, **kwargs)

    def select_top(scores, eligible, k):
        micro_batches[-1]["selected"] = real_select_top(scores, eligible, k)
        return micro_batches[-1]["selected"]

    monkeypatch.setattr(PaWTrainer, "compute_loss", compute_loss)
    monkeypatch.setattr(train_paw, "select_top", select_top)
    return micro_batches


def test_top_alpha_over_micro_batches_gives_the_mean_over_the_transitions_they_select(tiny_path, chat, tmp_path,
                                                                                       monkeypatch):
    # alpha = 0.5, 4 micro-batches of 2 episodes of 2 or 3 transitions: TRL's shuffle (seed 0) puts 5 (odd) in two of
    # them, so a ceil(alpha * n) per micro-batch would keep one more than ceil(alpha * all), the mean's denominator.
    paw, serials = PaWArguments(wm="paw", wm_alpha=0.5), [0, 1, 0, 3, 3, 2, 3, 2]
    config = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4)
    before, off_update, _ = train_once(tiny_path, chat, tmp_path / "off", PaWArguments(wm="off"), serials=serials,
                                       **config)
    micro_batches = spy_on_selection(monkeypatch)
    _, wm_update, trainer = train_once(tiny_path, chat, tmp_path / "paw", paw, serials=serials, **config)
    episodes = trainer.rollout_func.episodes
    unmatched, batches = list(range(len(episodes))), []  # per micro-batch: its episodes, the transitions it kept
    for micro_batch in micro_batches:
        rows = [next(b for b in unmatched if (episodes[b].prompt_ids, episodes[b].completion_ids) == row)
                for row in micro_batch["rows"]]
        unmatched = [b for b in unmatched if b not in rows]
        batches.append((rows, {(rows[i], t) for i, t in micro_batch["selected"].nonzero().tolist()}))
    assert len(batches) == 4 and not unmatched
    selected = set().union(*(kept for _, kept in batches))

    error, _ = gradient_error(before, {n: wm_update[n] - off_update[n] for n in before}, trainer,
                              lambda model: reference_wm_loss(model, episodes, paw, selected=selected))
    assert error < 1e-3  # the WM term is the mean over the transitions the micro-batches kept...
    restore(trainer.model, before)
    reference = {row["key"]: row for row in reference_transitions(trainer.model, episodes, paw)}
    eligible = [[key for key in reference if key[0] in rows] for rows, _ in batches]
    assert len(selected) == math.ceil(0.5 * len(reference))  # ...ceil(alpha * all eligible) of them...
    assert sum(math.ceil(0.5 * len(keys)) for keys in eligible) > len(selected)  # not a ceil per micro-batch
    quotas, total = [], 0  # ...each micro-batch its episodes' quotas, a running rounding in rollout order (README)
    for b in range(len(episodes)):
        total += sum(key[0] == b for key in reference)
        quotas.append(math.ceil(0.5 * total) - sum(quotas))
    for (rows, kept), keys in zip(batches, eligible):
        assert len(kept) == sum(quotas[b] for b in rows)
        assert min(reference[k]["entropy"] for k in kept) >= max(
            reference[k]["entropy"] for k in keys if k not in kept) - 1e-5  # its highest action entropies


def test_a_completion_trl_masks_as_truncated_gives_no_wm_targets(tiny_path, chat, tmp_path):
    paw, config = PaWArguments(wm="paw", wm_alpha=1.0), dict(mask_truncated_completions=True, cut=5)
    before, off_update, _ = train_once(tiny_path, chat, tmp_path / "off", PaWArguments(wm="off"), **config)
    _, wm_update, trainer = train_once(tiny_path, chat, tmp_path / "paw", paw, **config)
    assert compare_with_reference(before, off_update, wm_update, trainer, paw, skip=5)[0] < 1e-3


def test_evaluate_adds_beta_times_the_wm_mean_to_the_loss(tiny_path, chat, tmp_path):
    paw = PaWArguments(wm="paw")
    losses = {}
    for mode in ("off", "paw"):
        trainer = build_trainer(tiny_path, chat, tmp_path / mode, PaWArguments(wm=mode), per_device_eval_batch_size=8)
        metrics = trainer.evaluate()  # before any training step
        losses[mode] = metrics["eval_loss"]
    assert "eval_wm/loss" in metrics
    reference = reference_wm_loss(trainer.model, trainer.rollout_func.episodes, paw).item()
    assert reference > 0
    assert losses["paw"] - losses["off"] == pytest.approx(reference, rel=1e-3)


def test_the_trainer_itself_refuses_a_temperature_other_than_1(tiny_path, chat, tmp_path):
    with pytest.raises(ValueError, match="--temperature 1.0"):
        build_trainer(tiny_path, chat, tmp_path, PaWArguments(wm="paw"), temperature=0.7)


def compare_with_reference(before, off_update, wm_update, trainer, paw, skip=None):
    """The relative error || (update_wm - update_off) - (-lr * grad(beta * L_WM)) || / || lr * grad ||, with the
    gradient recomputed on the initial weights from the rollouts the trainer saw; and beta * L_WM itself."""
    difference = {n: wm_update[n] - off_update[n] for n in before}
    return gradient_error(before, difference, trainer,
                          lambda model: reference_wm_loss(model, trainer.rollout_func.episodes, paw, skip))


def restore(model, before):
    """Puts back the initial weights of the trainable parameters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in before:
                param.copy_(before[name])


def gradient_error(before, update, trainer, reference_loss):
    """|| update - (-lr * grad reference_loss) || / || lr * grad ||, the gradient taken on the initial weights; and
    the reference loss."""
    model = trainer.model
    restore(model, before)
    model.zero_grad()
    reference = reference_loss(model)
    reference.backward()
    expected = torch.cat([-LR * p.grad.flatten() for n, p in model.named_parameters() if n in before])
    got = torch.cat([update[n].flatten() for n in before])
    assert expected.norm() > 0
    return ((got - expected).norm() / expected.norm()).item(), reference.item()


def count_forwards(tiny_path, chat, tmp_path, mode):
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    calls = []
    model.model.register_forward_hook(lambda *args: calls.append(1))  # the backbone: runs once per model forward
    trainer = PaWTrainer(
        model=model, reward_funcs=[task_reward], args=sgd_config(tmp_path),
        train_dataset=Dataset.from_dict({"prompt": ["room-a", "room-b"]}), processing_class=chat.tokenizer,
        rollout_func=scripted_rollout(chat), paw=PaWArguments(wm=mode),
    )
    trainer.train()
    return len(calls)


def test_the_wm_term_costs_no_second_forward_pass(tiny_path, chat, tmp_path):
    off = count_forwards(tiny_path, chat, tmp_path / "off", "off")
    paw = count_forwards(tiny_path, chat, tmp_path / "paw", "paw")
    assert off == paw == 1  # one micro-batch, one forward; the scripted rollouts call no model


# ----------------------------------------------------------------------------------------------------------------
# --advantage gigpo / rloo: TRL's loss with per-token (GiGPO) or per-episode (RLOO) advantages of our own
# ----------------------------------------------------------------------------------------------------------------


def reference_advantages(episodes, paw):
    """Per episode, the advantage of each of its actions, from test_advantages' loop implementation (GiGPO) or the
    leave-one-out formula written out (RLOO)."""
    if paw.advantage == "rloo":
        rewards = [e.task_return - 0.1 * e.invalid_actions for e in episodes]
        out = []
        for b, e in enumerate(episodes):
            others = [rewards[j] for j in range(b // GROUP * GROUP, (b // GROUP + 1) * GROUP) if j != b]
            out.append([rewards[b] - sum(others) / len(others)] * len(e.turns))
        return out
    steps = [[(state, turn["reward"], turn["action"] is None)
              for state, turn in zip([e.first_observation] + [t["observation"] for t in e.turns], e.turns)]
             for e in episodes]
    by_episode = reference_gigpo(steps, GROUP, paw.gigpo_gamma, paw.gigpo_omega, paw.gigpo_std, 0.1,
                                 paw.gigpo_episode_stats)
    return [by_episode[b] for b in range(len(episodes))]


def reference_policy_loss(model, episodes, paw):
    """TRL's default ("dapo") loss with one optimizer step and no clipping, written out: -sum over policy tokens of
    A_token * log p(token) / (number of policy tokens in the batch)."""
    advantages = reference_advantages(episodes, paw)
    total, count = 0.0, 0
    for e, per_step in zip(episodes, advantages, strict=True):
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(e.prompt_ids) - 1:-1].float(), dim=-1)
        token_logp = logp[torch.arange(len(e.completion_ids)), torch.tensor(e.completion_ids)]
        for j, t in enumerate(e.action_index):
            if t >= 0:
                total, count = total - per_step[t] * token_logp[j], count + 1
    return total / count


@pytest.mark.parametrize("advantage,wm,config", [
    ("gigpo", "off", {}),
    ("gigpo", "paw", {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}),
    ("rloo", "off", {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}),
    ("rloo", "paw", {}),
])
def test_gigpo_and_rloo_updates_are_minus_lr_times_the_gradient_of_their_loss(tiny_path, chat, tmp_path, advantage,
                                                                                wm, config):
    paw = PaWArguments(wm=wm, advantage=advantage, wm_alpha=1.0)  # alpha 1: the WM mean ignores TRL's shuffle
    before, update, trainer = train_once(tiny_path, chat, tmp_path, paw, numbered=False, **config)
    episodes = trainer.rollout_func.episodes
    states = [[e.first_observation] + [t["observation"] for t in e.turns[:-1]] for e in episodes]
    assert any(states[0][0] == s[0] for s in states[1:GROUP])  # anchors repeat across episodes...
    assert any(len(set(s)) < len(s) for s in states)  # ...and within one

    def reference_loss(model):
        loss = reference_policy_loss(model, episodes, paw)
        return loss + reference_wm_loss(model, episodes, paw) if wm != "off" else loss

    assert gradient_error(before, update, trainer, reference_loss)[0] < 1e-3
    if advantage == "gigpo":
        shared = [sum(states[g][t] == states[h][u] for h in range(b0, b0 + GROUP) for u in range(len(states[h]))) > 1
                  for b0 in (0, GROUP) for g in range(b0, b0 + GROUP) for t in range(len(states[g]))]
        assert trainer.state.log_history[0]["gigpo/shared_state_frac"] == pytest.approx(sum(shared) / len(shared))


def test_gigpo_changes_the_update_and_omega_0_with_one_entry_per_episode_is_grpos(tiny_path, chat, tmp_path):
    _, grpo, _ = train_once(tiny_path, chat, tmp_path / "grpo", PaWArguments(wm="off"), numbered=False)
    _, gigpo, _ = train_once(tiny_path, chat, tmp_path / "gigpo", PaWArguments(wm="off", advantage="gigpo"),
                             numbered=False)
    same = PaWArguments(wm="off", advantage="gigpo", gigpo_omega=0.0, gigpo_episode_stats="trajectories",
                        gigpo_penalize="invalid")
    _, reduced, _ = train_once(tiny_path, chat, tmp_path / "reduced", same, numbered=False)
    size = torch.cat([u.flatten() for u in grpo.values()]).norm()
    assert torch.cat([(gigpo[n] - grpo[n]).flatten() for n in grpo]).norm() > 0.1 * size
    # equal but for the std's epsilon (ours 1e-6, TRL's 1e-4): 1.5e-3 here
    assert torch.cat([(reduced[n] - grpo[n]).flatten() for n in grpo]).norm() < 1e-2 * size


def test_trls_hook_for_per_token_advantages_is_still_there():
    # GiGPO hands TRL (B, L) advantages; _compute_loss uses them as they are only while it unsqueezes 1-D ones alone.
    assert "if advantages.dim() == 1" in inspect.getsource(GRPOTrainer._compute_loss)
