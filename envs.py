"""Text environments: the protocol they follow, their flags, prompt formatting, action parsing, and ALFWorld on its
real engine (official games, or games alfworld_gen.py generates at any room size, with its curriculum).

Every environment answers `reset()` and `step(reply)` with a `Step`. `step` takes the model's raw reply text and
parses it itself, so the episode loop (rollout.py) and the trainer know nothing about any one environment.
An environment is made from a game id (a string), which is also what a training dataset row holds.
"""

import copy
import functools
import importlib
import inspect
import json
import os
import random
import re
import shutil
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from alfworld_gen import GENERATED_PER_TYPE, LEVELS, TASK_TYPES, Curriculum, game_specs, resolve


@dataclass
class Step:
    observation: str  # the environment's own text: the world-model target
    admissible: list[str] = field(default_factory=list)  # actions the environment accepts now
    reward: float = 0.0
    done: bool = False
    won: bool = False
    action: str | None = None  # the action parsed from the reply; None when the reply held none
    valid: bool = True  # False when the reply held no parseable action or an inadmissible one


class TextEnv(Protocol):
    game: str  # the id it was made from
    system_prompt: str
    task_type: str  # for per-type results, e.g. "Pick"
    walkthrough: list[str]  # after reset: replies that solve the game (for the expert policy and tests)
    eval_max_steps: int  # actions per episode in the literature's evaluations: eval.py's default
    gigpo_std: bool  # GiGPO's default normalization here: divide by the std (verl-agent's per-environment choice)
    reset_seconds: float  # CPU time of one reset and one step, measured (bench.py): the time estimate's share for
    step_seconds: float  # the environment (memory_estimate.py)
    logged_options: tuple[str, ...]  # options the trainer logs each step as episode/<name> (a curriculum's level)

    @staticmethod
    def games(split: str, num_games: int = 0, task_types: list[str] | None = None, seed: int | None = None,
              **options) -> list[str]: ...  # game ids of a split: num_games of them (0: all), a sample if seed

    def __init__(self, game: str, **options): ...

    def reset(self) -> Step: ...

    def step(self, reply: str) -> Step: ...

    def random_reply(self, seed: int) -> str: ...  # a random legal reply now (the random-policy floor)

    def close(self) -> None: ...


def sample_games(games, num_games=0, task_types=None, seed=None, task_type=None):
    """`games` of these task types (`task_type(game)` names a game's), cut to `num_games` (0: all): a sample drawn
    with `seed`, or the first ones."""
    if task_types:
        games = [game for game in games if task_type(game) in task_types]
    if seed is not None:
        games = random.Random(seed).sample(games, len(games))
    return games[:num_games] if num_games else games


def format_admissible(actions):
    """The text shown after an observation (never a world-model target)."""
    return "\n\nAdmissible actions: " + ", ".join(actions) if actions else ""


ACTION_PATTERN = re.compile(r"<action>(.*?)</action>", re.DOTALL | re.IGNORECASE)
MAX_ACTION_CHARS = 500


def parse_action(reply):
    """The action inside the reply's single <action>...</action> pair, lowercased, whitespace collapsed.

    None for anything else: no tags, an empty action, two or more actions, or an action too long to be a command.
    """
    found = ACTION_PATTERN.findall(reply)
    if len(found) != 1:
        return None
    action = " ".join(found[0].split()).lower()
    return action if 0 < len(action) <= MAX_ACTION_CHARS else None


# ----------------------------------------------------------------------------------------------------------------
# ALFWorld
# ----------------------------------------------------------------------------------------------------------------

ALFWORLD_SYSTEM_PROMPT = (
    "You are an expert agent operating in the ALFRED embodied household environment. Each turn you see what "
    "happened and the actions you may take. Reason briefly inside <think> </think> tags, then give exactly one "
    "admissible action inside <action> </action> tags, for example: <think>The mug is likely in a cabinet."
    "</think><action>go to cabinet 1</action>"
)
# Task-type folder prefix -> the short name the literature uses.
ALFWORLD_TASK_TYPES = {
    "pick_and_place_simple": "Pick",
    "look_at_obj_in_light": "Look",
    "pick_clean_then_place_in_recep": "Clean",
    "pick_heat_then_place_in_recep": "Heat",
    "pick_cool_then_place_in_recep": "Cool",
    "pick_two_obj_and_place": "Pick2",
}
ALFWORLD_SPLITS = {"train": "train", "eval_in_distribution": "valid_seen", "eval_out_of_distribution": "valid_unseen"}
# The release asset `alfworld-download` fetches; it holds json_2.1.1/<split>/.../game.tw-pddl.
ALFWORLD_GAMES_URL = "https://github.com/alfworld/alfworld/releases/download/0.4.0/json_2.1.2_tw-pddl.zip"
NOTHING_HAPPENS = "Nothing happens."  # what ALFWorld's engine answers to any command it does not accept


class DataMissing(RuntimeError):
    """Game files are absent and could not be fetched; the message says how to get them."""


def alfworld_data_dir():
    return Path(os.environ.get("ALFWORLD_DATA", Path.home() / ".cache" / "alfworld")).expanduser()


def download_alfworld_games(data_dir, url=ALFWORLD_GAMES_URL, timeout=30):
    """Fetch and unpack the official game files into `data_dir` (what `alfworld-download` does, without extras)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "games.zip"
        with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        with zipfile.ZipFile(archive) as z:
            z.extractall(data_dir)


def alfworld_games(split):
    """Game files of a split, sorted. Movable-receptacle and sliced-object tasks are skipped, as upstream does."""
    if split not in ALFWORLD_SPLITS:
        raise ValueError(f"unknown ALFWorld split {split!r}; choose one of {', '.join(ALFWORLD_SPLITS)}")
    data_dir = alfworld_data_dir()
    split_dir = data_dir / "json_2.1.1" / ALFWORLD_SPLITS[split]
    if not split_dir.is_dir():
        try:
            download_alfworld_games(data_dir)
        except Exception as error:  # no network, a proxy, a full disk: all end in the same advice
            raise DataMissing(
                f"ALFWorld game files are missing: {split_dir} does not exist, and downloading them failed "
                f"({type(error).__name__}: {error}).\nTo get them, on a machine with internet run\n"
                f"    pip install alfworld==0.4.2 && alfworld-download\n"
                f"then copy ~/.cache/alfworld (about 350 MB) here and set ALFWORLD_DATA to it, or set ALFWORLD_DATA "
                f"to any folder that holds json_2.1.1/{ALFWORLD_SPLITS[split]}/.\nOr use games generated offline "
                f"by the real engine, no download needed: --games generated (see the README)."
            ) from None
    games = [
        path for path in split_dir.glob("*/*/game.tw-pddl")
        if "movable" not in path.parent.parent.name and "Sliced" not in path.parent.parent.name
    ]
    if not games:
        raise DataMissing(f"no game.tw-pddl files under {split_dir}; is ALFWORLD_DATA pointing at the right folder?")
    return sorted(str(path) for path in games)


def alfworld_task_type(game_file):
    folder = Path(game_file).parent.parent.name
    return next((short for prefix, short in ALFWORLD_TASK_TYPES.items() if folder.startswith(prefix)), "Other")


# Every TextWorld PDDL game loads its own copy of fast-downward's 34 MB library from a temporary file, and nothing
# unloads it: a deleted file that keeps its disk space while the process lives. A worker that plays thousands of
# games would fill the disk, so a closed game's copy goes here and the next game in this process takes it (a copy
# serves one game at a time, as TextWorld's own PddlEnv.load reuses its copy for the next game).
_FREE_DOWNWARD_LIBRARIES = []


def _reuse_downward_libraries():
    import fast_downward

    if getattr(fast_downward.load_lib, "reuses", False):
        return
    load_copy = fast_downward.load_lib

    def load_lib():
        return _FREE_DOWNWARD_LIBRARIES.pop() if _FREE_DOWNWARD_LIBRARIES else load_copy()

    load_lib.reuses = True
    fast_downward.load_lib = load_lib


def _parse_templates_once():
    """TextWorld parses its text-grammar templates (tatsu) again at every step and every game load: half the time of
    a step. A template's parse never changes, so each is parsed once per process (bounded: a game adds its task
    sentence), and every caller gets its own copy, since TextWorld sets the parsed symbols' context in place."""
    from textworld.envs.pddl import textgen

    if getattr(textgen._parse_and_convert, "parses_once", False):
        return
    parse = functools.lru_cache(maxsize=4096)(textgen._parse_and_convert)

    def parse_once(text, **options):
        return copy.deepcopy(parse(text, **options))

    parse_once.parses_once, parse_once.__wrapped__ = True, parse.__wrapped__
    textgen._parse_and_convert = parse_once


class AlfWorldEnv:
    """One ALFWorld game on the real text engine (TextWorld's PDDL backend with ALFWorld's wrappers).

    Only `won`, `admissible_commands` and the stored `walkthrough` are requested from the engine: never the planner
    (`policy_commands`), which can take tens of seconds per step.
    """

    system_prompt = ALFWORLD_SYSTEM_PROMPT
    eval_max_steps = 50
    gigpo_std = True  # verl-agent's ALFWorld setting for GiGPO (mean_std_norm)
    # Official games, by bench.py on our 2-core CPU (2026-12-04); generated level-0 rooms cost 0.07 s and 0.005 s.
    reset_seconds, step_seconds = 1.34, 0.025
    logged_options = ("game_level",)

    @staticmethod
    def games(split, num_games=0, task_types=None, seed=None, games="official", game_level=0):
        """Official game files, or ids of generated games: "Type:seed" from the split's own seed range (never the
        games trained on), as many as asked (100 per task type to train, 20 to evaluate), the task types in turn;
        an id names a game at every level, written at `game_level` when it is played."""
        if games == "generated":
            types = task_types or list(TASK_TYPES)
            return game_specs(split, num_games or GENERATED_PER_TYPE[split] * len(types), types)
        return sample_games(alfworld_games(split), num_games, task_types, seed, alfworld_task_type)

    @staticmethod
    def curriculum(options):
        """Generated games grow from `game_level` as the agent wins (alfworld_gen.Curriculum)."""
        return Curriculum(int(options["game_level"]))

    def __init__(self, game, games="official", game_level=0):
        self.game = resolve(game, int(game_level)) if games == "generated" else game
        self.task_type = alfworld_task_type(self.game)
        self.walkthrough = []
        self._engine = None
        self._admissible = []

    def reset(self):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["walkthrough"])
        self.close()
        _reuse_downward_libraries()
        _parse_templates_once()
        self._engine = textworld.start(self.game, request_infos=infos, wrappers=[AlfredDemangler(), AlfredInfos])
        state = self._engine.reset()
        self.walkthrough = [f"<action>{action}</action>" for action in state.get("extra.walkthrough") or []]
        self._admissible = list(state["admissible_commands"])
        observation = state["feedback"].replace("-= Welcome to TextWorld, ALFRED! =-", "").strip()
        return Step(observation, self._admissible)

    def step(self, reply):
        action = parse_action(reply)
        if action is None:  # answered without touching the engine: it would say the same
            return Step(NOTHING_HAPPENS, self._admissible, valid=False)
        shown = self._admissible
        state, _, done = self._engine.step(action)
        self._admissible = list(state["admissible_commands"])
        won = bool(state["won"])
        return Step(state["feedback"].strip(), self._admissible, float(won), done or won, won, action, action in shown)

    def random_reply(self, seed):
        return f"<action>{random.Random(seed).choice(self._admissible)}</action>"

    def close(self):
        if self._engine is not None:
            self._engine.close()
            _FREE_DOWNWARD_LIBRARIES.append(self._engine.unwrapped.downward_lib)
            self._engine = None


def play_walkthrough(game):
    """Replay a game file's stored walkthrough in AlfWorldEnv, the engine training uses.

    Returns (reset seconds, mean seconds per step, [(command, Step)]); the first entry is the reset's (None, Step).
    """
    env = AlfWorldEnv(game)
    start = time.perf_counter()
    steps = [(None, env.reset())]
    reset_time, start = time.perf_counter() - start, time.perf_counter()
    walkthrough = json.loads(Path(game).read_text())["walkthrough"]
    steps += [(command, env.step(f"<action>{command}</action>")) for command in walkthrough]
    step_time = (time.perf_counter() - start) / len(walkthrough)
    env.close()
    return reset_time, step_time, steps


# ----------------------------------------------------------------------------------------------------------------
# Registry: `--env NAME` names an environment class, loaded on first use. A class lists its games with
# `games(split, ...)` and is built from one game id.
# ----------------------------------------------------------------------------------------------------------------

ENVIRONMENTS = {"alfworld": "envs:AlfWorldEnv", "webshop": "webshop:WebShopEnv", "search": "search_qa:SearchQAEnv"}


def env_class(env_name):
    module, name = ENVIRONMENTS[env_name].split(":")
    return getattr(importlib.import_module(module), name)


def parse_options(pairs):
    """`--env_options key=value ...` as a dict of strings."""
    malformed = [pair for pair in pairs or [] if "=" not in pair]
    if malformed:
        raise ValueError(f"--env_options takes key=value pairs, got {' '.join(malformed)}")
    return dict(pair.split("=", 1) for pair in pairs or [])


def list_games(env_name, split, num_games=0, task_types=None, seed=None, options=None):
    """Game ids of a split, optionally of some task types and cut to `num_games` (a seeded sample if seed).

    options: the environment's own keyword arguments (env_options below), given to `games` and to the constructor
    alike.
    """
    cls, options = env_class(env_name), options or {}
    for accepts in (inspect.signature(cls.games).bind, inspect.signature(cls).bind):
        try:
            accepts(split, **options)
        except TypeError:
            raise ValueError(f"--env {env_name} takes no option(s) {', '.join(options)}") from None
    return cls.games(split, num_games, task_types, seed, **options)


def env_options(pairs, games="official", game_level=0):
    """The environment's options: `--env_options key=value ...`, and for generated games their source and level."""
    options = parse_options(pairs)
    if games == "generated":
        options.update(games=games, game_level=game_level)
    return options


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
        return env_options(self.env_options, self.games, self.game_level)

    def train_games(self, seed):
        """The game ids to train on, as the environment lists them."""
        return list_games(self.env, self.train_split, self.num_train_games, self.task_types, seed, self.env_kwargs)


def make_env(env_name, game, options=None):
    return env_class(env_name)(game, **(options or {}))
