"""Generated ALFWorld games (alfworld_gen.py): they load in the real engine and their walkthroughs win, the same seed
gives the same bytes, each level builds the room its table promises, and what players see reads like official games."""

import itertools
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from alfworld.gen import constants

import alfworld_gen
from alfworld_gen import LEVELS, TASK_TYPES, Curriculum, generate_game, write_games
from envs import play_walkthrough
from envs import NOTHING_HAPPENS, alfworld_task_type

REPO = Path(__file__).resolve().parent.parent
CHECKED_LEVELS = (0, 1, 2)  # the engine check: 40 games per task type at each of these levels
GAMES = 40


def play_all(games):
    """{game: [(command, Step)]}: each game's walkthrough replayed in envs.AlfWorldEnv, one process per core (<= 8)."""
    with ProcessPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return {game: steps for game, (_, _, steps) in zip(games, pool.map(play_walkthrough, games, chunksize=10))}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """(games by (task type, level), their replays)."""
    root = tmp_path_factory.mktemp("generated")
    games = {(t, level): write_games(root, [t], level, GAMES, seed=0) for level in CHECKED_LEVELS for t in TASK_TYPES}
    return games, play_all([game for batch in games.values() for game in batch])


@pytest.fixture(scope="module")
def official(unseen_games):
    """Replays of one valid_unseen game per official task (a folder: task type, object, receptacle, scene)."""
    return play_all(list({Path(game).parent.parent: game for game in reversed(unseen_games)}.values()))


@pytest.mark.parametrize("level", CHECKED_LEVELS)
@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_every_walkthrough_is_admissible_step_by_step_and_wins_at_its_last_step(generated, task_type, level):
    games, plays = generated
    assert len(set(games[task_type, level])) == GAMES
    for game in games[task_type, level]:
        assert alfworld_task_type(game) == task_type  # the folder name says the task type, as in official data
        steps = plays[game]
        assert len(steps) > 1, game
        for (_, before), (command, after) in itertools.pairwise(steps):
            assert command in before.admissible and after.observation != NOTHING_HAPPENS, (game, command)
        assert [step.won for _, step in steps] == [False] * (len(steps) - 1) + [True], game  # not won any earlier


def facts(game, predicate):
    """The arguments of every `predicate` fact in a game's initial state."""
    init = json.loads(game)["pddl_problem"].split("(:init")[1].split("(:goal")[0]
    return [tuple(args.split()) for args in re.findall(rf"\({predicate} ([^()]*)\)", init)]


@pytest.mark.parametrize("level", range(len(LEVELS)))
def test_each_level_builds_the_room_its_table_row_describes(level):
    spec, started_hidden = LEVELS[level], []
    for task_type in TASK_TYPES:
        for seed in range(20):
            game = generate_game(task_type, level, seed)
            data = json.loads(game)
            target_type = re.search(r"\(objectType \?o1? (\w+)Type\)", data["pddl_problem"]).group(1)
            objects = dict(facts(game, "objectType"))
            targets = [o for o, t in objects.items() if t == f"{target_type}Type"]
            openable = {r for (r,) in facts(game, "openable")}
            in_receptacle = dict(facts(game, "inReceptacle"))
            opened_by_walkthrough = {c for c in data["walkthrough"] if c.startswith("open ")}
            appliance = task_type in ("Heat", "Cool")  # microwaves and fridges open, sinks do not
            assert len(facts(game, "receptacleType")) == spec.receptacles
            assert len({loc for _, loc in facts(game, "receptacleAtLocation")}) == spec.receptacles
            assert len(targets) == (2 if task_type == "Pick2" else 1)
            assert len(objects) - len(targets) - (task_type == "Look") == spec.distractors
            assert len(openable) == max(spec.closed, len(opened_by_walkthrough) + appliance)
            assert not facts(game, "opened")  # closed containers start closed, as in every official game
            started_hidden += [in_receptacle[t] in openable for t in targets]
    assert set(started_hidden) == {0.0: {False}, 0.5: {False, True}, 1.0: {True}}[spec.hidden]


def test_the_same_seed_gives_the_same_bytes_in_another_process_and_other_seeds_other_games():
    keys = [(t, level, seed) for t in TASK_TYPES for level in range(len(LEVELS)) for seed in (0, 1)]
    here = [generate_game(*key) for key in keys]
    code = f"import json, alfworld_gen; print(json.dumps([alfworld_gen.generate_game(*k) for k in {keys!r}]))"
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})  # set order would differ: none is used
    assert json.loads(other.stdout) == here
    assert len(set(here)) == len(here)


def test_write_games_writes_the_official_layout_byte_identically(tmp_path):
    first = write_games(tmp_path / "a", ["Heat", "Look"], level=3, count=3, seed=7, split="valid_unseen")
    second = write_games(tmp_path / "b", ["Heat", "Look"], level=3, count=3, seed=7, split="valid_unseen")
    assert [Path(p).relative_to(tmp_path / "a") for p in first] == [Path(p).relative_to(tmp_path / "b") for p in second]
    assert [Path(p).read_bytes() for p in first] == [Path(p).read_bytes() for p in second]
    for path, (task_type, seed) in zip(first, [(t, s) for t in ("Heat", "Look") for s in (7, 8, 9)]):
        parts = Path(path).relative_to(tmp_path / "a").parts
        assert parts[:2] == ("json_2.1.1", "valid_unseen") and parts[3:] == (f"trial_{seed:06d}", "game.tw-pddl")
        assert alfworld_task_type(path) == task_type
        assert Path(path).read_text() == generate_game(task_type, 3, seed)


def test_games_use_the_installed_alfworld_domain_and_grammar_with_the_task_sentence():
    import alfworld.info

    data = json.loads(generate_game("Cool", 0, 0))
    assert data["pddl_domain"] == Path(alfworld.info.ALFRED_PDDL_PATH).read_text()
    grammar = Path(alfworld.info.ALFRED_TWL2_PATH).read_text()
    before, after = grammar.split("UNKNOWN GOAL")
    assert data["grammar"].startswith(before) and data["grammar"].endswith(after)
    assert re.fullmatch(r"(put a cool \w+ in \w+|cool some \w+ and put it in \w+)",
                        data["grammar"][len(before):-len(after)])
    assert data["solvable"] is True and data["walkthrough"]


ENTITY = re.compile(r"\b([a-z]+) (\d+)\b")
ALFRED_TYPES = {t.lower() for t in constants.OBJECTS_SET | constants.RECEPTACLES}  # 'apple', 'sinkbasin', ...
TYPE_WORD = re.compile(rf"\b({'|'.join(sorted(ALFRED_TYPES, key=len, reverse=True))})\b")


def template(observation):
    """An observation with every entity ('apple 1') replaced by {e}, every list of them by {list}, and the object
    and receptacle types of the task sentence by {t}."""
    text = ENTITY.sub("{e}", observation)
    text = re.sub(r"an? \{e\}(, an? \{e\})*(, and an? \{e\})?|\bnothing\b", "{list}", text)
    head, task, sentence = text.partition("Your task is to: ")
    return head + task + TYPE_WORD.sub("{t}", sentence)


def shown(plays):
    """The observation templates, admissible-command forms and entity names seen while replaying."""
    steps = [step for game_steps in plays.values() for _, step in game_steps]
    return ({template(s.observation) for s in steps}, {ENTITY.sub("{e}", a) for s in steps for a in s.admissible},
            {m.group(1) for s in steps for text in [s.observation, *s.admissible] for m in ENTITY.finditer(text)})


def test_generated_games_show_the_same_sentences_and_command_forms_as_official_games(generated, official):
    generated_templates, generated_forms, generated_names = shown(generated[1])
    official_templates, official_forms, official_names = shown(official)
    assert generated_templates <= official_templates
    assert len(generated_templates) >= 20  # arrivals, closed and open containers, every task verb and task sentence
    assert generated_forms == official_forms
    # Entities are named as ALFWorld names them: a lowercased ALFRED type and a number, e.g. 'sinkbasin 1'.
    assert generated_names <= ALFRED_TYPES and official_names <= ALFRED_TYPES


def test_generated_games_answer_look_inventory_and_help_like_official_games(generated, unseen_games):
    from envs import AlfWorldEnv

    answers = []
    for game in [generated[0]["Pick", 0][0], unseen_games[0]]:
        env = AlfWorldEnv(game)
        env.reset()
        answers.append([template(env.step(f"<action>{c}</action>").observation) for c in ("look", "inventory", "help")])
        env.close()
    assert answers[0] == answers[1]
    assert "go to (receptacle)" in answers[0][2]


@pytest.mark.parametrize("bad", [("Slice", 0, 0), ("pick", 0, 0), ("Pick", -1, 0), ("Pick", len(LEVELS), 0),
                                 ("Pick", 1.0, 0), ("Pick", "1", 0), ("Pick", 0, -1), ("Pick", 0, "7")])
def test_bad_task_types_levels_and_seeds_raise_a_clear_value_error(bad, tmp_path):
    with pytest.raises(ValueError, match="task type|level|seed"):
        generate_game(*bad)
    with pytest.raises(ValueError, match="task type|level|seed"):
        write_games(tmp_path, [bad[0]], level=bad[1], seed=bad[2])
    assert not list(tmp_path.iterdir())  # nothing written


def test_curriculum_promotes_after_a_full_window_at_the_threshold_and_stops_at_the_top():
    curriculum = Curriculum(level=0, threshold=0.75, window=4, max_level=2)
    assert curriculum.update([True, True, True]) == 0  # the window is not full yet
    assert curriculum.update([False]) == 1  # 3 of 4 = 0.75
    assert curriculum.update([True, True, True, False, False]) == 1  # a fresh window: the last four are 2 of 4
    assert curriculum.update([True, True]) == 1 and curriculum.update([True]) == 2  # 3 of 4, then 4 of 4
    assert curriculum.update([True] * 8) == 2  # max_level
    for bad in [{"level": len(LEVELS)}, {"threshold": 0}, {"threshold": 1.5}, {"window": 0}, {"max_level": -1}]:
        with pytest.raises(ValueError):
            Curriculum(**bad)


def test_a_curriculum_restored_from_its_state_continues_where_it_was():
    curriculum = Curriculum(level=0, threshold=0.75, window=4)
    curriculum.update([True] * 4)  # promoted to level 1
    curriculum.update([True, False])
    restored = Curriculum(threshold=0.75, window=4)
    restored.load_state_dict(json.loads(json.dumps(curriculum.state_dict())))
    assert (restored.level, list(restored.recent)) == (1, [True, False])
    assert restored.update([True]) == 1 and restored.update([True]) == 2  # the outcomes before the save count


def test_cli_writes_games_and_requires_an_output_folder(tmp_path, capsys):
    alfworld_gen.main(["--out", str(tmp_path), "--level", "1", "--count", "2", "--seed", "5", "--task_types", "Pick2"])
    written = sorted(tmp_path.glob("json_2.1.1/train/*/*/game.tw-pddl"))
    assert sorted(p.read_text() for p in written) == sorted(generate_game("Pick2", 1, s) for s in (5, 6))
    assert "wrote 2 games" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        alfworld_gen.main(["--level", "1"])


def test_bench_prints_official_and_generated_rows_side_by_side(unseen_games):
    import bench

    rows = [line for line in bench.game_levels([0], per_type=1).splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| official valid_unseen", "| generated, level 0"]
    assert all(row.endswith("| 6/6 |") for row in rows[1:])
