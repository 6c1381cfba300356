"""sft.py: its sequences are RL's sequences, its loss is on the policy's tokens only, what it saves trains and
evaluates, bad input stops with a message."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import eval as evaluation
import sft
import train_paw
from rollout import expert_policy

ENVS = {"alfworld": ["--games", "generated"], "webshop": [], "search": []}


def game_flags(env):
    return ["--env", env, *ENVS[env], "--model_name_or_path", "tiny", "--num_train_games", "2", "--max_env_steps",
            "15", "--max_completion_length", "6144", "--env_workers", "0", "--use_cpu", "--report_to", "none"]


def rl_sequences(env, tmp_path, monkeypatch):
    """What TRL's GRPO step trains on when the policy's replies are the expert's: one (ids, policy mask) per row."""
    monkeypatch.setattr(train_paw, "ModelPolicy", lambda model, chat, *args: expert_policy(chat))
    batches = []
    real = train_paw.PaWTrainer._generate_and_score_completions

    def keep(self, inputs):
        batches.append(real(self, inputs))
        return batches[-1]

    monkeypatch.setattr(train_paw.PaWTrainer, "_generate_and_score_completions", keep)
    train_paw.main(game_flags(env) + ["--num_generations", "2", "--per_device_train_batch_size", "4",
                                      "--max_steps", "1", "--output_dir", str(tmp_path)])
    sequences = []
    for batch in batches:
        for b in range(len(batch["prompt_ids"])):
            prompt = batch["prompt_ids"][b][batch["prompt_mask"][b].bool()].tolist()
            live = batch["completion_mask"][b].bool()
            completion = batch["completion_ids"][b][live].tolist()
            policy = batch["tool_mask"][b][live].tolist()
            sequences.append((prompt + completion, [0] * len(prompt) + policy))
    return sequences


@pytest.mark.parametrize("env", ENVS)
def test_an_sft_sequence_is_the_rl_sequence_of_the_same_game_and_replies(env, tmp_path, monkeypatch):
    trainer = sft.main(game_flags(env) + ["--use_peft", "false", "--load_in_4bit", "false", "--max_steps", "1",
                                          "--output_dir", str(tmp_path / "sft")])
    examples = [(row["input_ids"], [int(label != sft.IGNORE) for label in row["labels"]])
                for row in trainer.train_dataset]
    assert len(examples) == 2  # the expert wins both games
    rl = rl_sequences(env, tmp_path / "rl", monkeypatch)
    assert len(rl) == 4 and sorted(rl) == sorted(examples * 2)  # each game twice: a GRPO group of 2

    # The loss mask is the policy's replies and their end-of-turn token, and nothing else.
    tokenizer = trainer.processing_class
    for ids, mask in examples:
        replies = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        expected = "".join(reply + tokenizer.eos_token for reply in expert_replies(tokenizer.decode(ids)))
        assert replies == expected


def expert_replies(text):
    """The assistant turns of a rendered episode (the chat template's markup around each)."""
    return [turn.split("<|im_end|>")[0] for turn in text.split("<|im_start|>assistant\n")[1:]]


def test_the_sft_loss_is_the_mean_nll_of_the_policy_tokens(tmp_path):
    trainer = sft.main(game_flags("alfworld") + ["--use_peft", "false", "--load_in_4bit", "false", "--max_steps",
                                                 "1", "--learning_rate", "0", "--output_dir", str(tmp_path)])
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
        nll, count = 0.0, 0
        for row in trainer.train_dataset:  # one sequence at a time, no padding: an independent computation
            ids = torch.tensor([row["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            targets = torch.tensor(row["input_ids"][1:])
            scored = torch.tensor([label != sft.IGNORE for label in row["labels"][1:]])
            nll -= logp[torch.arange(len(targets)), targets][scored].sum().item()
            count += scored.sum().item()
    assert count > 0 and loss == pytest.approx(nll / count, rel=1e-4)


@pytest.mark.parametrize("setup", ["full", "lora", "4bit-lora"])
def test_what_sft_saves_trains_with_train_paw_and_plays_with_eval(tiny_path, tmp_path, setup):
    model_flags = {"full": ["--use_peft", "false", "--load_in_4bit", "false", "--learning_rate", "1e-3"],
                   "lora": ["--use_peft", "true", "--load_in_4bit", "false"],
                   "4bit-lora": ["--use_peft", "true", "--load_in_4bit", "true"]}[setup]
    out = tmp_path / "sft"
    sft.main(game_flags("alfworld") + model_flags + ["--max_steps", "2", "--output_dir", str(out)])
    if setup == "full":
        load = ["--model_name_or_path", str(out)]
        initial = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
        trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert any(not torch.equal(trained[name], initial[name]) for name in initial)
    else:
        load = ["--model_name_or_path", "tiny", "--adapter", str(out)]
        assert any(t.abs().sum() > 0 for n, t in load_file(out / "adapter_model.safetensors").items() if "lora_B" in n)

    flags = [*load, "--load_in_4bit", str(setup == "4bit-lora").lower()]
    rl_out = tmp_path / "rl"
    trainer = train_paw.main([*flags, "--games", "generated", "--num_generations", "2", "--per_device_train_batch_size",
                              "2", "--max_env_steps", "2", "--max_action_tokens", "8", "--use_cpu", "--max_steps", "1",
                              "--output_dir", str(rl_out)])
    assert trainer.state.global_step == 1
    if setup != "full":  # RL trains the SFT adapter itself: no second adapter was added
        trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
        saved = load_file(out / "adapter_model.safetensors")
        assert len(trained) == len(saved) and all(p.dtype == torch.float32 for p in trained.values())
    quantized = ["--load_in_4bit"] if setup == "4bit-lora" else []
    summary = evaluation.main([*load, *quantized, "--games", "generated", "--num_games", "2", "--max_env_steps", "2",
                               "--env_workers", "0", "--output", str(tmp_path / "eval" / "result")])
    assert summary["num_games"] == 2 and summary["model"] == load[1]


@pytest.mark.parametrize("args,message", [
    (["--env", "webshop", "--games", "generated"], "--games generated is for --env alfworld"),
    (["--games", "generated", "--max_env_steps", "1"], "the expert won none of the 2 games"),
    (["--games", "generated", "--game_level", "7"], "--game_level must be from 0 to 5"),
])
def test_bad_input_stops_with_a_clear_message(args, message, capsys):
    # In this process (a new Python costs 10-20 s): any exception other than the exit fails the test, as a traceback
    # would. The script's own exit path: test_train_cli's offline-model test runs sft.py.
    with pytest.raises(SystemExit) as stop:
        sft.main(["--model_name_or_path", "tiny", "--num_train_games", "2", "--use_cpu", *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
