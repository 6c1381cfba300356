"""A policy whose logits hold NaN or inf (what a float16 overflow does) stops training and evaluation with a message,
exit code 1 and no traceback, its checkpoint intact; float16 runs sum their matmuls in float32."""

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from trl import ModelConfig

import eval as evaluation
import plan
import train_paw
from long_runs import last_complete_checkpoint
from models import load_model, model_flags
from rollout import NonFiniteLogits


def overflow(model):
    """A forward hook on the final norm that puts an inf in its output, as a float16 overflow would."""
    norm = next(module for name, module in model.named_modules() if name.endswith("model.norm"))
    return norm.register_forward_hook(lambda module, args, output: output.index_fill(-1, torch.tensor([0]), torch.inf))


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


class OverflowInStep2(TrainerCallback):
    """From step 2 on the model overflows; the files of checkpoint-1 as they were then."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.saved = digest(Path(args.output_dir) / "checkpoint-1")
            overflow(model)


def test_nan_logits_in_a_rollout_stop_the_run_with_a_message_and_the_checkpoint_intact(tmp_path, capsys):
    out = tmp_path / "run"
    callback = OverflowInStep2()
    with pytest.raises(SystemExit) as stop:
        train_paw.main(["--model_name_or_path", "tiny", "--games", "generated", "--env_workers", "0", "--max_steps",
                        "2", "--save_steps", "1", "--output_dir", str(out)], callbacks=[callback])
    err = capsys.readouterr().err
    assert stop.value.code == 1
    assert "error: step 2, in its rollout: the policy's logits held NaN or inf in 4 of 4 episodes at turn 1" in err
    assert "the run computes in float32, where an overflow is unlikely" in err  # the tiny model on a CPU: not fp16
    assert f"{out / 'checkpoint-1'} is intact" in err and "Traceback" not in err
    assert last_complete_checkpoint(out) == str(out / "checkpoint-1") and not (out / "checkpoint-2").exists()
    assert digest(out / "checkpoint-1") == callback.saved


def test_nan_logits_in_a_greedy_evaluation_stop_it_with_a_message_and_nothing_written(tmp_path, tiny_path, capsys,
                                                                                    monkeypatch):
    loaded = evaluation.load

    def load_overflowing(args):
        chat, model = loaded(args)
        overflow(model)
        return chat, model

    monkeypatch.setattr(evaluation, "load", load_overflowing)
    before = digest(tiny_path)
    with pytest.raises(SystemExit) as stop:
        evaluation.main(["--model_name_or_path", str(tiny_path), "--games", "generated", "--num_games", "2",
                         "--max_env_steps", "2", "--max_action_tokens", "8", "--env_workers", "0", "--output",
                         str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert stop.value.code == 1  # not a score of 0% with 100% invalid actions
    assert "error: the policy's logits held NaN or inf in 2 of 2 episodes at turn 1" in err
    assert "nothing was scored or written" in err and "Traceback" not in err
    assert not list(tmp_path.glob("eval*")) and digest(tiny_path) == before


def test_the_message_of_a_t4_run_names_its_cause_and_flags_that_avoid_it_with_their_time():
    paw, args, model_args = train_paw.parse_args(["--gpu", "t4", "--output_dir", "/nonexistent"])
    model_args.dtype, args.fp16 = "float16", True  # what a T4 gets (models.hardware_dtype)
    message = plan.stop_message(NonFiniteLogits(3, 16, 2), paw, args, model_args, 4)
    assert message.startswith("step 5, in its rollout: the policy's logits held NaN or inf in 3 of 16 episodes")
    assert "float16 overflowed" in message and "without bfloat16 such as a T4" in message
    shape, t4 = plan.planned_shape(model_args.model_name_or_path, 15), plan.find_card("t4")
    step, fp32 = ([plan.step_time(shape, card, paw, args, model_args, end=end)["step"] for end in plan.ENDS]
                  for card in (t4, plan.float32_card(t4)))
    assert f"(this run: {plan.duration_range(*step)};" in message
    assert f"--dtype float32 --fp16 false: {plan.duration_range(*fp32)} a step" in message and fp32[0] > 2 * step[1]
    assert "--model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --load_in_4bit false --dtype float32" in message
    assert "no checkpoint was saved yet" in message


def test_float16_runs_sum_their_matmuls_in_float32_and_keep_sdpa_attention(tiny_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert model_flags()["dtype"] == "float16" and model_flags()["fp16"]  # a T4's run
    monkeypatch.undo()
    matmul = torch.backends.cuda.matmul
    try:
        matmul.allow_fp16_reduced_precision_reduction = True  # PyTorch's default
        model, _ = load_model(ModelConfig(model_name_or_path=str(tiny_path), dtype="float32"), "cpu")
        assert matmul.allow_fp16_reduced_precision_reduction  # only float16 runs change it
        model, _ = load_model(ModelConfig(model_name_or_path=str(tiny_path), dtype="float16"), "cpu")
        assert not matmul.allow_fp16_reduced_precision_reduction
        assert model.config._attn_implementation == "sdpa"
        model, _ = load_model(ModelConfig(model_name_or_path=str(tiny_path), dtype="float16",
                                          attn_implementation="eager"), "cpu")
        assert model.config._attn_implementation == "eager"  # a flag you pass wins
    finally:
        matmul.allow_fp16_reduced_precision_reduction = True
