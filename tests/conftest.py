import os
import shutil
import sys
from pathlib import Path

# Before torch is imported: one thread (two threads on a shared core made one tiny step take 0.04 s to 12 s).
os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TRL_EXPERIMENTAL_SILENCE="1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def tiny_path(tmp_path_factory):
    """The tiny model, built once per session in a temporary folder (subprocesses inherit PAW_TINY_DIR), a session
    folder for generated games (PAW_GENERATED_DIR), and one for the CPU agent, built by the first test that asks."""
    from tiny_model import tiny_model_path

    os.environ["PAW_TINY_DIR"] = str(tmp_path_factory.mktemp("tiny") / "tiny")
    os.environ["PAW_AGENT_DIR"] = str(tmp_path_factory.mktemp("agent") / "cpu-agent")
    os.environ["PAW_GENERATED_DIR"] = str(tmp_path_factory.mktemp("generated"))
    return tiny_model_path()


@pytest.fixture(scope="session")
def small_games(tiny_path):
    """Hermetic fixtures: six generated ALFWorld games (one per task type, level 0) played by the real engine."""
    from alfworld_gen import game_specs, resolve

    return [resolve(spec, 0) for spec in game_specs("eval_out_of_distribution", 6)]


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def chat(tokenizer):
    from rollout import ChatFormat

    return ChatFormat(tokenizer)


@pytest.fixture(scope="session")
def unseen_games():
    """The 134 valid_unseen games. Missing data is an error here, never a skip: CI must provide ALFWORLD_DATA."""
    from envs import list_games

    return list_games("alfworld", "eval_out_of_distribution")


@pytest.fixture(scope="session")
def smol_path(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per session (about 40 s) into a temporary folder removed afterwards
    (538 MB)."""
    import smollm2

    folder = tmp_path_factory.mktemp("smollm2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAW_SMOLLM2_DIR", str(folder / "model"))
        path = smollm2.smollm2_path()
    yield path
    shutil.rmtree(folder)
