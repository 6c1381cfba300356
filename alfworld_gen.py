"""Generated ALFWorld games: the real ALFWorld engine and rules, offline, any size, with a difficulty curriculum.

A generated game is a `game.tw-pddl` file like the official ones: ALFWorld's own PDDL domain and grammar (read from
the installed `alfworld` package), a PDDL problem we write (a room, its receptacles and objects, the task's goal
formula from `alfworld.gen.goal_library`), and a walkthrough that wins. The rules come from the same package:
which receptacle can hold which object, what can be heated, cooled, cleaned, sliced, which receptacles open. So
TextWorld's PDDL backend with ALFWorld's wrappers (envs.AlfWorldEnv) plays them exactly as it plays official games.

    python alfworld_gen.py --out games --level 0 --count 100 --seed 0     # 100 games per task type, level 0
    python bench.py --environments                                         # reset/step times vs official games

Files go to `<out>/json_2.1.1/<split>/<task-type>-<Object>-None-<Receptacle>-gen<level>/trial_<seed>/game.tw-pddl`,
the official layout, so `ALFWORLD_DATA=<out>` serves them like downloaded data, and the task type is the
folder-name prefix. The same (task type, level, seed) always gives the same bytes (for one alfworld version).
"""

import argparse
import functools
import json
import os
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from types import SimpleNamespace

# Short task name -> folder-name prefix and goal name in alfworld.gen.goal_library.
TASK_TYPES = {
    "Pick": "pick_and_place_simple",
    "Look": "look_at_obj_in_light",
    "Clean": "pick_clean_then_place_in_recep",
    "Heat": "pick_heat_then_place_in_recep",
    "Cool": "pick_cool_then_place_in_recep",
    "Pick2": "pick_two_obj_and_place",
}
# The receptacle each state-changing task needs, and its command verb (the domain accepts only these types).
APPLIANCES = {"Clean": ("SinkBasin", "clean"), "Heat": ("Microwave", "heat"), "Cool": ("Fridge", "cool")}
# `use` needs the lamp in a receptacle, so no floor lamps (every official Look game has a desk lamp).
LAMP, LAMP_HOLDERS = "DeskLamp", ("Desk", "SideTable", "Dresser")


@dataclass(frozen=True)
class Level:
    receptacles: int  # receptacles in the room; locations = receptacles + 1 (the agent starts in the middle)
    closed: int  # openable receptacles, all closed at the start (more when the task itself needs them)
    distractors: int  # objects of other types than the target
    hidden: float  # probability that a target starts inside a closed receptacle


# Our choice. Official games have 13-27 receptacles (median 25), about 7 openable ones, 22-72 objects.
LEVELS = [
    Level(receptacles=3, closed=0, distractors=1, hidden=0.0),
    Level(receptacles=5, closed=1, distractors=3, hidden=0.0),
    Level(receptacles=8, closed=2, distractors=6, hidden=0.5),
    Level(receptacles=12, closed=4, distractors=10, hidden=0.5),
    Level(receptacles=17, closed=6, distractors=16, hidden=1.0),
    Level(receptacles=24, closed=9, distractors=24, hidden=1.0),
]

# Room types (AI2-THOR's), the receptacles each may hold (how many of each at most) and the objects found in it.
# Our choice, after the official scenes; what fits where is ALFWorld's table (constants.VAL_RECEPTACLE_OBJECTS).
ROOMS = {
    "Kitchen": (
        {"Cabinet": 10, "Drawer": 6, "CounterTop": 3, "StoveBurner": 4, "Shelf": 3, "Fridge": 1, "Microwave": 1,
         "SinkBasin": 1, "GarbageCan": 1, "DiningTable": 1, "CoffeeMachine": 1, "Toaster": 1},
        ["Apple", "Bowl", "Bread", "ButterKnife", "Cup", "DishSponge", "Egg", "Fork", "Glassbottle", "Kettle", "Knife",
         "Ladle", "Lettuce", "Mug", "Pan", "PepperShaker", "Plate", "Pot", "Potato", "SaltShaker", "SoapBottle",
         "Spatula", "Spoon", "Tomato", "WineBottle"],
    ),
    "LivingRoom": (
        {"Sofa": 1, "ArmChair": 2, "CoffeeTable": 1, "SideTable": 2, "DiningTable": 1, "TVStand": 1, "Drawer": 6,
         "Cabinet": 4, "Dresser": 1, "Shelf": 4, "GarbageCan": 1, "Ottoman": 1, "Safe": 1},
        ["Book", "Bowl", "Box", "Candle", "CellPhone", "CreditCard", "KeyChain", "Laptop", "Newspaper", "Pen",
         "Pencil", "Pillow", "Plate", "RemoteControl", "Statue", "TissueBox", "Vase", "Watch", "WateringCan"],
    ),
    "Bedroom": (
        {"Bed": 1, "Desk": 2, "Drawer": 10, "Dresser": 1, "Shelf": 6, "SideTable": 2, "GarbageCan": 1,
         "LaundryHamper": 1, "Safe": 1, "ArmChair": 1},
        ["AlarmClock", "BaseballBat", "BasketBall", "Book", "Bowl", "Box", "CD", "CellPhone", "Cloth", "CreditCard",
         "KeyChain", "Laptop", "Mug", "Pen", "Pencil", "Pillow", "Statue", "TennisRacket", "TissueBox", "Vase",
         "Watch"],
    ),
    "Bathroom": (
        {"Toilet": 1, "SinkBasin": 2, "BathtubBasin": 1, "Cabinet": 6, "CounterTop": 1, "Drawer": 6, "Shelf": 5,
         "GarbageCan": 1, "TowelHolder": 1, "HandTowelHolder": 1, "ToiletPaperHanger": 1, "Cart": 1},
        ["Candle", "Cloth", "DishSponge", "HandTowel", "Plunger", "SoapBar", "SoapBottle", "SprayBottle", "TissueBox",
         "ToiletPaper", "Towel"],
    ),
}


@functools.cache
def _rules():
    """ALFWorld's own tables (sets sorted, so every draw from them is reproducible), the domain and the grammar."""
    # Imported here, not at the top: importing alfworld.info creates the $ALFWORLD_DATA folder.
    from alfworld import info
    from alfworld.gen import constants
    from alfworld.gen import goal_library as goals

    return SimpleNamespace(
        holds={cls: sorted(objects) for cls, objects in constants.VAL_RECEPTACLE_OBJECTS.items()},
        can={kind: sorted(objects) for kind, objects in constants.VAL_ACTION_OBJECTS.items()},  # "Heatable": [...]
        openable=set(constants.OPENABLE_CLASS_LIST),
        containers=constants.MOVABLE_RECEPTACLES_SET,  # objects that hold objects (isReceptacleObject)
        rooms=constants.GOALS_VALID,  # task -> room types where ALFRED poses it
        goals=goals.gdict,  # task -> goal formula and task sentences
        domain=Path(info.ALFRED_PDDL_PATH).read_text(),
        grammar=Path(info.ALFRED_TWL2_PATH).read_text(),
    )


def _check(task_types=(), level=0, seed=0):
    for task_type in task_types:
        if task_type not in TASK_TYPES:
            raise ValueError(f"unknown task type {task_type!r}; choose one of {', '.join(TASK_TYPES)}")
    if not isinstance(level, int) or not 0 <= level < len(LEVELS):
        raise ValueError(f"level must be an integer from 0 to {len(LEVELS) - 1}, got {level!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


# ALFRED names a basin after its fixture ('Sink|...|SinkBasin'); AlfredDemangler relies on it to say 'sinkbasin 1'.
BASINS = {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}


def _mangle(name):
    """ALFRED's id spelling in PDDL ('Apple|+00.10' -> 'Apple_bar__plus_00_dot_10'), which AlfredDemangler reads."""
    for char, word in (("|", "_bar_"), ("+", "_plus_"), ("-", "_minus_"), (".", "_dot_")):
        name = name.replace(char, word)
    return name


class _Room:
    """A room being built: receptacles and objects with unique ALFRED ids, and one location per receptacle."""

    def __init__(self, rng, capacity):
        self.rng, self.capacity, self.used = rng, dict(capacity), set()
        self.receptacles = {}  # id -> (class, location)
        self.objects = {}  # id -> (class, receptacle id)
        self.start = self._location()  # the agent's, in the middle of the room

    def _unique(self, draw):
        while (value := draw()) in self.used:
            pass
        self.used.add(value)
        return _mangle(value)

    def _point(self, cls):
        r = self.rng
        return self._unique(lambda: f"{BASINS.get(cls, cls)}|{r.uniform(-4, 4):+06.2f}|{r.uniform(0, 2):+06.2f}|"
                                    f"{r.uniform(-4, 4):+06.2f}" + (f"|{cls}" if cls in BASINS else ""))

    def _location(self):
        r = self.rng
        return self._unique(lambda: f"loc|{r.randint(-12, 12)}|{r.randint(-12, 12)}|{r.randrange(4)}|"
                                    f"{r.choice((0, 15, 30, 45, 60))}")

    def add_receptacle(self, cls):
        self.capacity[cls] -= 1
        rid = self._point(cls)
        self.receptacles[rid] = (cls, self._location())
        return rid

    def add_object(self, cls, receptacle):
        oid = self._point(cls)
        self.objects[oid] = (cls, receptacle)
        return oid

    def of_class(self, cls):
        return [r for r, (c, _) in self.receptacles.items() if c == cls]


def _game(task_type, level, seed):
    """(folder name, game.tw-pddl JSON text) of one generated game."""
    _check([task_type], level, seed)
    rules, spec, task = _rules(), LEVELS[level], TASK_TYPES[task_type]
    rng = random.Random(f"{task_type}/{level}/{seed}")  # a str seed is hashed with sha512: the same in every process
    appliance, verb = APPLIANCES.get(task_type, (None, None))
    room_type = rng.choice(sorted(rules.rooms[task]))
    capacity, pool = ROOMS[room_type]

    def fits(obj, cls):
        return obj in rules.holds.get(cls, ())

    def allowed_start(cls):  # where the level lets a target start: in closed containers, in open ones, or either
        return 0 < spec.hidden < 1 or (cls in rules.openable) == (spec.hidden == 1)

    # The task: a target object type and a goal receptacle type (Look: the desk lamp's holder). Targets never start
    # on a receptacle of the goal's or the appliance's type, so no game starts half won.
    needs = {"Clean": "Cleanable", "Heat": "Heatable", "Cool": "Coolable"}.get(task_type)
    targets = [obj for obj in pool if not needs or obj in rules.can[needs]]
    if task_type == "Look":
        goals = [cls for cls in LAMP_HOLDERS if cls in capacity]
    else:  # a closed goal receptacle only from the levels that have closed containers
        goals = [cls for cls in capacity if cls != appliance and (spec.closed or cls not in rules.openable)]
    choices = [(obj, goal) for obj in targets for goal in goals if (task_type == "Look" or fits(obj, goal)) and any(
        fits(obj, cls) and allowed_start(cls) for cls in capacity if cls not in (goal, appliance))]
    target, goal = rng.choice(choices)

    room = _Room(rng, capacity)
    goal_id = room.add_receptacle(goal)
    appliance_id = appliance and room.add_receptacle(appliance)
    holders = []
    for _ in range(2 if task_type == "Pick2" else 1):
        hidden = rng.random() < spec.hidden
        kinds = [cls for cls in capacity if cls not in (goal, appliance) and fits(target, cls) and allowed_start(cls)]
        cls = rng.choice([cls for cls in kinds if (cls in rules.openable) == hidden] or kinds)
        reuse = not room.capacity[cls]  # e.g. the second target of Pick2 in the room's only safe
        holders.append(rng.choice(room.of_class(cls)) if reuse else room.add_receptacle(cls))
    while len(room.receptacles) < spec.receptacles:  # closed containers up to the level's count, then open furniture
        closed = sum(c in rules.openable for c, _ in room.receptacles.values()) < spec.closed
        kinds = [cls for cls, n in room.capacity.items() if n and (cls in rules.openable) == closed]
        room.add_receptacle(rng.choice(kinds or [cls for cls, n in room.capacity.items() if n]))
    target_ids = [room.add_object(target, holder) for holder in holders]
    lamp_id = room.add_object(LAMP, goal_id) if task_type == "Look" else None
    others = [obj for obj in pool if obj != target and any(fits(obj, c) for c, _ in room.receptacles.values())]
    for _ in range(spec.distractors):
        obj = rng.choice(others)
        room.add_object(obj, rng.choice([r for r, (c, _) in room.receptacles.items() if fits(obj, c)]))

    # The walkthrough, in the command forms of the 2.1.2 games and with the names AlfredDemangler will give.
    names = _names([*room.receptacles, *room.objects])
    walkthrough, here, opened = [], None, set()

    def go(receptacle, open_it=True):
        nonlocal here
        if receptacle != here:
            walkthrough.append(f"go to {names[receptacle]}")
            here = receptacle
        if open_it and room.receptacles[receptacle][0] in rules.openable and receptacle not in opened:
            walkthrough.append(f"open {names[receptacle]}")
            opened.add(receptacle)

    for obj, holder in zip(target_ids, holders):
        go(holder)
        walkthrough.append(f"take {names[obj]} from {names[holder]}")
        if appliance:  # heating, cooling and cleaning work with the appliance closed, as in the official walkthroughs
            go(appliance_id, open_it=False)
            walkthrough.append(f"{verb} {names[obj]} with {names[appliance_id]}")
        go(goal_id)
        walkthrough.append(f"use {names[lamp_id]}" if task_type == "Look" else f"move {names[obj]} to {names[goal_id]}")

    goal_formula = rules.goals[task]["pddl"].replace("#", "-").format(obj=target, recep=goal, toggle=LAMP)
    sentence = rng.choice(rules.goals[task]["templates"]).format(obj=target.lower(), recep=goal.lower(),
                                                                 toggle=LAMP.lower())
    game = {
        "pddl_domain": rules.domain,
        "grammar": rules.grammar.replace("UNKNOWN GOAL", sentence),  # as alfworld's own add_task_to_grammar does
        "pddl_problem": _problem(f"gen_{task}_{level}_{seed}", room, rules, goal_formula),
        "solvable": True,
        "walkthrough": walkthrough,
    }
    return f"{task}-{target}-None-{LAMP if task_type == 'Look' else goal}-gen{level}", json.dumps(game)


def _names(ids):
    """The in-game names ('apple 1') that ALFWorld's own Demangler gives these ids."""
    from alfworld.agents.utils.misc import Demangler

    lower = {i: i.lower() for i in ids}  # the PDDL parser lowercases every name before the Demangler sees it
    demangler = Demangler(game_infos={low: SimpleNamespace(id=low) for low in lower.values()})
    return {i: demangler.demangle_alfred_name(low).strip() for i, low in lower.items()}


def _problem(name, room, rules, goal):
    """The PDDL problem: declarations, initial facts, then the goal formula (which also closes the `define`)."""
    receptacle_types = sorted({c for c, _ in room.receptacles.values()})
    object_types = sorted({c for c, _ in room.objects.values()})
    # The domain names a few types as constants (SinkBasinType, KnifeType, ...): they must be declared, used or not.
    otypes = sorted({*object_types, "Knife", "ButterKnife"})
    rtypes = sorted({*receptacle_types, "SinkBasin", "Microwave", "Fridge"})
    locations = [room.start] + [loc for _, loc in room.receptacles.values()]
    declarations = (["agent1 - agent"] + [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]
                    + [f"{o} - object" for o in room.objects] + [f"{r} - receptacle" for r in room.receptacles]
                    + [f"{loc} - location" for loc in locations])
    facts = [f"(canContain {r}Type {o}Type)" for r in receptacle_types for o in object_types
             if o in rules.holds.get(r, ())]
    for r, (cls, loc) in room.receptacles.items():
        facts += [f"(receptacleType {r} {cls}Type)", f"(receptacleAtLocation {r} {loc})"]
        facts += [f"(openable {r})"] * (cls in rules.openable)  # no `opened` fact: every container starts closed
    for o, (cls, r) in room.objects.items():
        facts += [f"(objectType {o} {cls}Type)", f"(inReceptacle {o} {r})",
                  f"(objectAtLocation {o} {room.receptacles[r][1]})"]
        facts += [f"(pickupable {o})"] * (cls != LAMP) + [f"(isReceptacleObject {o})"] * (cls in rules.containers)
        facts += [f"({kind.lower()} {o})" for kind in ("Cleanable", "Heatable", "Coolable", "Sliceable", "Toggleable")
                  if cls in rules.can[kind]]
    facts.append(f"(atLocation agent1 {room.start})")
    lines = "\n        ".join
    return (f"(define (problem {name})\n(:domain alfred)\n(:objects\n        {lines(declarations)}\n        )\n"
            f"(:init\n        {lines(facts)}\n        )\n{goal}")


def generate_game(task_type, level, seed):
    """The game.tw-pddl JSON text of one game; the same arguments always give the same bytes."""
    return _game(task_type, level, seed)[1]


def write_game(root, task_type, level, seed, split="train"):
    """Write one game in the official layout under `root` and return its path."""
    folder, text = _game(task_type, level, seed)
    path = Path(root) / "json_2.1.1" / split / folder / f"trial_{seed:06d}" / "game.tw-pddl"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)  # atomic: a reader in another process never sees half a file
    return str(path)


def write_games(root, task_types=tuple(TASK_TYPES), level=0, count=1, seed=0, split="train"):
    """Write `count` games per task type, with seeds seed .. seed+count-1, and return their paths.

    Use disjoint seed ranges for training and evaluation games.
    """
    _check(task_types, level, seed)  # before writing anything
    return [write_game(root, t, level, s, split) for t in task_types for s in range(seed, seed + count)]


# ----------------------------------------------------------------------------------------------------------------
# Generated games as training and evaluation data: `--games generated` in train_paw.py and eval.py.
# ----------------------------------------------------------------------------------------------------------------

# Each split draws its seeds from its own range, so evaluation games are never trained on.
SPLIT_SEEDS = {"train": 0, "eval_in_distribution": 1_000_000, "eval_out_of_distribution": 2_000_000}
GENERATED_PER_TYPE = {"train": 100, "eval_in_distribution": 20, "eval_out_of_distribution": 20}  # by default


def game_specs(split, count, task_types=tuple(TASK_TYPES)):
    """Ids "Type:seed" of `count` generated games of a split, the task types in turn. An id names a game at every
    level: `resolve` writes it at the level wanted (so a curriculum can grow the rooms of the same dataset)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
    _check(task_types)
    return [f"{task_types[k % len(task_types)]}:{SPLIT_SEEDS[split] + k // len(task_types)}" for k in range(count)]


def generated_dir():
    """Where resolved games are written: `PAW_GENERATED_DIR`, or a cache folder."""
    return Path(os.environ.get("PAW_GENERATED_DIR", Path.home() / ".cache" / "paw" / "generated"))


def resolve(spec, level):
    """The game file of the id `spec` at `level`: written (about 1 ms, atomically) into `generated_dir()`."""
    task_type, seed = spec.split(":")
    return write_game(generated_dir(), task_type, level, int(seed), split="generated")


class Curriculum:
    """The level to generate games at: moves up one level once the success rate over the last `window` episodes
    played at the current level reaches `threshold`. It never moves down (our choice)."""

    def __init__(self, level=0, threshold=0.8, window=64, max_level=None):
        max_level = len(LEVELS) - 1 if max_level is None else max_level
        _check(level=level)
        _check(level=max_level)
        if not 0 < threshold <= 1 or window < 1:
            raise ValueError(f"need 0 < threshold <= 1 and window >= 1, got {threshold} and {window}")
        self.level, self.threshold, self.max_level = level, threshold, max_level
        self.recent = deque(maxlen=window)

    def update(self, successes):
        """Record episode outcomes (truthy = won) played at the current level; return the level to use next."""
        self.recent.extend(bool(s) for s in successes)
        full = len(self.recent) == self.recent.maxlen
        if self.level < self.max_level and full and mean(self.recent) >= self.threshold:
            self.level += 1
            self.recent.clear()  # outcomes at the old level say nothing about the new one
        return self.level

    def options(self):
        """The environment options it sets: the level of the games it generates (envs.AlfWorldEnv)."""
        return {"game_level": self.level}

    def state_dict(self):
        return {"level": self.level, "recent": list(self.recent)}

    def load_state_dict(self, state):
        self.level, self.recent = state["level"], deque(state["recent"], maxlen=self.recent.maxlen)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder to write games to (it becomes an ALFWORLD_DATA folder)")
    parser.add_argument("--level", type=int, default=0, help=f"difficulty, 0 to {len(LEVELS) - 1}")
    parser.add_argument("--count", type=int, default=10, help="games per task type")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first game")
    parser.add_argument("--split", default="train", help="split folder name (train, valid_seen, valid_unseen)")
    parser.add_argument("--task_types", nargs="+", default=list(TASK_TYPES), choices=list(TASK_TYPES))
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required to write games")
    else:
        paths = write_games(args.out, args.task_types, args.level, args.count, args.seed, args.split)
        print(f"wrote {len(paths)} games to {Path(args.out) / 'json_2.1.1' / args.split}")


if __name__ == "__main__":
    main()
