"""Episode records (episode_log.py) from training and from eval.py: the values of the forward that computed the loss,
mapped back to their episodes through TRL's shuffle; the logged WM loss recomputed from them; view.py's bad input."""

import gzip
import json
import math
from types import SimpleNamespace

import pytest
import torch
from test_rollout import assert_logprobs_match_a_fresh_forward
from test_trainer import GROUP, build_trainer, reference_advantages, restore, train_once

import eval as evaluation
import train_paw
import view
from env_workers import EnvWorkers
from episode_log import SCHEMA_VERSION, token_overlap
from train_paw import PaWArguments

MICRO_BATCHES = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4)  # TRL shuffles 8 rows into 4


def read(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def fresh_forward(model, e):
    """Per completion token: the log-prob of the token and the entropy of the distribution it was drawn from."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([e.context_ids])).logits[0].float(), dim=-1)
    logp = logp[len(e.prompt_ids) - 1:-1]
    return logp[torch.arange(len(e.completion_ids)), e.completion_ids], -(logp.exp() * logp).sum(-1)


def logged_wm_loss(records, paw):
    """wm/loss as TRL logs it, from the records alone: compute_loss appends one value per micro-batch (the mean of
    lambda * L_WM over the transitions that micro-batch selected; 0 if none) and TRL's `log` averages a step's values.
    L_WM(t) is recomputed from the tokens: CMAE's 1 - p, 0 where clipped, or CE's -log p, over o_{t+1}'s tokens."""
    per_micro_batch = {}
    for r in records:
        terms = per_micro_batch.setdefault(r["micro_batch"], [])
        for turn in r["turns"]:
            if turn.get("selected"):
                if paw.wm_loss == "cmae":
                    losses = [0.0 if c else 1 - math.exp(lp) for lp, c in zip(turn["obs_logp"], turn["obs_clipped"])]
                else:
                    losses = [-lp for lp in turn["obs_logp"]]
                assert sum(losses) / len(losses) == pytest.approx(turn["wm_loss"], abs=2e-5)
                terms.append(r["lambda"] * sum(losses) / len(losses))
    return sum(sum(t) / max(len(t), 1) for t in per_micro_batch.values()) / len(per_micro_batch), per_micro_batch


@pytest.mark.parametrize("flags,numbered", [
    (dict(wm="paw", wm_alpha=0.5), True),
    (dict(wm="paw", advantage="gigpo", cmae_rho=0.002), False),  # rho 0.002 clips some of the tiny model's tokens
    (dict(wm="off"), True),
])
def test_training_records_hold_the_loss_forward_values_and_recompute_the_logged_wm_loss(tiny_path, chat, tmp_path,
                                                                                        flags, numbered):
    paw = PaWArguments(episode_log_steps=1, **flags)
    before, update, trainer = train_once(tiny_path, chat, tmp_path, paw, numbered=numbered, **MICRO_BATCHES)
    episodes = trainer.rollout_func.episodes
    records = read(tmp_path / "episodes" / "step-000001.jsonl.gz")
    assert [r["episode"] for r in records] == list(range(len(episodes)))  # every episode, back in rollout order
    assert {r["micro_batch"] for r in records} == {0, 1, 2, 3}
    assert all(r["schema"] == SCHEMA_VERSION and r["group"] == r["episode"] // GROUP for r in records)
    restore(trainer.model, before)  # the records hold the forward of the step's loss, on the weights before it
    replayed = []
    for e, r in zip(episodes, records, strict=True):
        assert (r["game"], r["won"], len(r["turns"])) == (e.env.game, e.won, len(e.turns))
        assert [t["reply"] for t in r["turns"]] == [t["reply"] for t in e.turns]
        recorded = iter(lp for t in r["turns"] for lp in t["reply_logp"])
        replayed.append(SimpleNamespace(prompt_ids=e.prompt_ids, completion_ids=e.completion_ids,
                                        context_ids=e.context_ids, action_index=e.action_index,
                                        logprobs=[next(recorded) if t >= 0 else 0.0 for t in e.action_index]))
        token_logp, entropy = fresh_forward(trainer.model, e)
        observation = [j for j, t in enumerate(e.obs_index) if t >= 0]  # recorded even with --wm off: free
        assert [lp for t in r["turns"] for lp in t["obs_logp"]] == pytest.approx(token_logp[observation].tolist(),
                                                                                abs=1e-4)
        policy = [j for j, t in enumerate(e.action_index) if t >= 0]
        assert [h for t in r["turns"] for h in t["reply_entropy"]] == pytest.approx(entropy[policy].tolist(), abs=1e-4)
        assert "".join(tok for t in r["turns"] for tok in t["obs_tokens"]) == chat.tokenizer.decode(
            [e.completion_ids[j] for j in observation])
    assert_logprobs_match_a_fresh_forward(trainer.model, replayed)  # the suite's helper, on the recorded values

    if paw.wm == "off":
        assert all("selected" not in t and "obs_clipped" not in t for r in records for t in r["turns"])
        assert all(r["lambda"] is None for r in records)
        return
    logged, per_micro_batch = logged_wm_loss(records, paw)
    assert trainer.state.log_history[0]["wm/loss"] == pytest.approx(logged, rel=1e-5)
    pooled = [term for terms in per_micro_batch.values() for term in terms]  # one mean over the step: not what is
    assert sum(pooled) / len(pooled) != pytest.approx(logged, rel=1e-3)  # logged (micro-batches select unequally)
    eligible = sum(bool(t["obs_tokens"]) for r in records for t in r["turns"])
    assert sum(map(len, per_micro_batch.values())) == math.ceil(paw.wm_alpha * eligible)
    if paw.advantage == "gigpo":
        expected = reference_advantages(episodes, paw)
        assert [[t["advantage"] for t in r["turns"]] for r in records] == [pytest.approx(a, abs=1e-4)
                                                                           for a in expected]
        assert any(t["anchor_size"] > 1 for r in records for t in r["turns"])
        clipped = [c for r in records for t in r["turns"] if t["selected"] for c in t["obs_clipped"]]
        assert 0 < sum(clipped) < len(clipped)
    else:
        # logging changes nothing: the same update as a run that records nothing
        _, silent, _ = train_once(tiny_path, chat, tmp_path / "silent", PaWArguments(episode_log_steps=0, **flags),
                                  **MICRO_BATCHES)
        assert all(torch.equal(update[n], silent[n]) for n in update)
        assert not (tmp_path / "silent" / "episodes").exists()


def test_only_the_first_k_groups_and_every_nth_step_are_recorded(tiny_path, chat, tmp_path):
    paw = PaWArguments(wm="paw", episode_log_steps=2, episode_log_groups=1)
    trainer = build_trainer(tiny_path, chat, tmp_path, paw)
    trainer.args.max_steps = 3
    trainer.train()
    assert sorted(p.name for p in (tmp_path / "episodes").iterdir()) == ["step-000001.jsonl.gz", "step-000002.jsonl.gz"]
    assert [r["group"] for r in read(tmp_path / "episodes" / "step-000002.jsonl.gz")] == [0] * GROUP


def test_eval_records_token_values_and_the_models_imagined_observations(tiny_path, chat):
    args = evaluation.parse_args(["--model_name_or_path", "tiny", "--games", "generated", "--num_games", "2",
                                  "--max_env_steps", "3", "--max_action_tokens", "8", "--max_observation_tokens", "12",
                                  "--episode_details", "--imagine"])
    _, model = evaluation.load(args)
    workers = EnvWorkers(0)
    summary, (episodes,) = evaluation.play_and_summarize(args, chat, model, workers)
    workers.close()
    stops, overlaps = {chat.eot_id, model.generation_config.eos_token_id}, []
    for e in episodes:
        token_logp, entropy = fresh_forward(model, e)  # --episode_details: the values of a forward pass
        policy = [j for j, t in enumerate(e.action_index) if t >= 0]
        observation = [j for j, t in enumerate(e.obs_index) if t >= 0]
        assert [lp for t in e.turns for lp in t["reply_logp"]] == pytest.approx(token_logp[policy].tolist(), abs=1e-4)
        assert [h for t in e.turns for h in t["reply_entropy"]] == pytest.approx(entropy[policy].tolist(), abs=1e-4)
        assert [lp for t in e.turns for lp in t["obs_logp"]] == pytest.approx(token_logp[observation].tolist(),
                                                                              abs=1e-4)
        for t, turn in enumerate(e.turns):
            real = [e.completion_ids[j] for j, o in enumerate(e.obs_index) if o == t]
            ids = e.prompt_ids + e.completion_ids[:e.obs_index.index(t)]  # what the WM loss scores o_{t+1} after
            predicted = []  # --imagine: the model's greedy o_{t+1}, token by token with full forward passes
            with torch.no_grad():
                while len(predicted) < 12:
                    token = model(input_ids=torch.tensor([ids + predicted])).logits[0, -1].argmax().item()
                    if token in stops:
                        break
                    predicted.append(token)
            imagined = chat.tokenizer.decode(predicted, skip_special_tokens=True).split("\n\nAdmissible actions:")[0]
            assert turn["imagined"] == imagined
            assert turn["overlap"] == pytest.approx(token_overlap(chat.encode(imagined)[:12], real), abs=1e-5)
            overlaps.append(turn["overlap"])
    record = evaluation.trajectory(episodes[0], 0, 0)  # what eval.py writes per game
    assert record["schema"] == SCHEMA_VERSION and record["turns"][0]["imagined"] == episodes[0].turns[0]["imagined"]
    assert summary["imagine"]["turns"] == len(overlaps) == 6
    assert summary["imagine"]["overlap"] == pytest.approx(sum(overlaps) / len(overlaps))


def test_token_overlap_is_the_f1_of_the_token_multisets():
    assert token_overlap([1, 2, 3], [3, 2, 1]) == 1.0
    assert token_overlap([1, 1, 2], [1, 2, 2, 2]) == pytest.approx(2 * 2 / 7)
    assert token_overlap([], [1]) == 0.0 and token_overlap([5], [6]) == 0.0


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.mark.parametrize("case,message", [
    ("empty", "no episode records"), ("truncated", "damaged or truncated"), ("schema", "schema version 2"),
    ("old", "no schema version"), ("incomplete", "without source, task_type"),
])
def test_view_refuses_bad_input_with_a_message_and_writes_nothing(tmp_path, capsys, case, message):
    run = tmp_path / "run"
    record = {"schema": SCHEMA_VERSION, "source": "train", "game": "g", "task_type": "Pick", "won": False,
              "task_return": 0.0, "steps": 0, "invalid_actions": 0, "error": None, "first_observation": "", "turns": []}
    (run / "episodes").mkdir(parents=True)
    if case == "truncated":
        write(run / "episodes" / "step-000001.jsonl.gz", [{**record, "game": f"game {k}"} for k in range(5000)])
        data = (run / "episodes" / "step-000001.jsonl.gz").read_bytes()
        (run / "episodes" / "step-000001.jsonl.gz").write_bytes(data[: len(data) // 2])
    elif case in ("schema", "old"):
        other = {**record, "schema": 2 if case == "schema" else None}
        write(run / "episodes" / "step-000001.jsonl.gz", [record, other])
    elif case == "incomplete":
        write(run / "episodes" / "step-000001.jsonl.gz", [{"schema": SCHEMA_VERSION, "game": "g", "turns": []}])
    with pytest.raises(SystemExit) as stop:
        view.main([str(run), "--output", str(tmp_path / "page.html")])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "page.html").exists()


def test_a_negative_episode_log_flag_exits_2_with_a_message(capsys):
    with pytest.raises(SystemExit) as stop:
        train_paw.parse_args(["--model_name_or_path", "tiny", "--episode_log_steps", "-1"])
    assert stop.value.code == 2 and "--episode_log_steps must be >= 0" in capsys.readouterr().err


def test_view_writes_only_the_newest_steps_with_last_steps(tmp_path):
    record = {"schema": SCHEMA_VERSION, "source": "train", "game": "g", "task_type": "Pick", "won": True,
              "task_return": 1.0, "steps": 0, "invalid_actions": 0, "error": None, "first_observation": "", "turns": []}
    for step in (1, 11, 21):
        write(tmp_path / "run" / "episodes" / f"step-{step:06d}.jsonl.gz", [{**record, "step": step}] * 2)
    page = view.main([str(tmp_path / "run"), "--last_steps", "2"]).read_text()
    data = json.loads(page.split('<script id="paw-data" type="application/json">')[1].split("</script>")[0])
    assert [e["step"] for e in data["episodes"]] == [11, 11, 21, 21]
    assert [o["step"] for o in data["sources"][0]["overview"]] == [11, 21]
