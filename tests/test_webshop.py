"""WebShop: the catalog's goals are solvable, random play scores low, WebShop's reward, pages, malformed actions,
WebShop's own file format, and a training step."""

import json
import random

import pytest

from envs import DataMissing, list_games, make_env
from rollout import expert_policy, play, random_policy, text_policy
from search_qa import BM25Index
from webshop import (INVALID_ACTION, SEARCH_ACTION, WebShopEnv, build_catalog, load_shop, load_webshop_files,
                     token_set_ratio, type_factor, webshop_reward)

MAX_STEPS = 15  # verl-agent's WebShop episode length


def act(action):
    return f"<think>...</think><action>{action}</action>"


def test_goal_splits_are_disjoint_and_the_ood_goals_are_product_types_never_trained_on():
    train, in_dist, out_dist = (set(list_games("webshop", split)) for split in
                                ("train", "eval_in_distribution", "eval_out_of_distribution"))
    assert (len(train), len(in_dist), len(out_dist)) == (650, 100, 150)
    assert not (train & in_dist) and not (train & out_dist) and not (in_dist & out_dist)
    types = lambda games: {WebShopEnv(g).goal["query"] for g in games}  # noqa: E731
    assert not types(train) & types(out_dist) and types(in_dist) <= types(train)
    assert {WebShopEnv(g).task_type for g in in_dist} == {"beauty", "food", "fashion", "furniture", "electronics"}


@pytest.mark.parametrize("split", ["eval_in_distribution", "eval_out_of_distribution"])
def test_the_walkthrough_buys_the_right_product_for_every_test_goal(chat, split):
    games = list_games("webshop", split)
    episodes = play([make_env("webshop", g) for g in games], expert_policy(chat), chat, MAX_STEPS)
    assert len(episodes) == len(games)
    for e in episodes:
        assert e.won and e.task_return == 1.0 and e.invalid_actions == 0 and e.error is None, e.turns
        assert e.turns[-1]["observation"].endswith("Your score (min 0.0, max 1.0) [SEP] 1.00")
        # The WM target of turn t is exactly the page the environment showed after action t.
        for t, turn in enumerate(e.turns):
            target = [tok for tok, index in zip(e.completion_ids, e.obs_index) if index == t]
            assert chat.tokenizer.decode(target) == turn["observation"]


def test_a_random_shopper_scores_low(chat):
    """Searches the instruction as written, then clicks uniformly among the admissible actions (the eval floor)."""
    games = list_games("webshop", "eval_in_distribution") + list_games("webshop", "eval_out_of_distribution")
    episodes = play([make_env("webshop", g) for g in games], random_policy(chat, seed=0), chat, MAX_STEPS)
    score = 100 * sum(e.task_return for e in episodes) / len(episodes)
    success = 100 * sum(e.won for e in episodes) / len(episodes)
    print(f"random shopper (seed 0) on {len(episodes)} test goals: score {score:.1f}, success {success:.1f}%")
    assert success < 10 and score < 50
    assert all(e.error is None and e.invalid_actions == 0 for e in episodes)


def test_pages_and_admissible_actions_follow_webshop():
    env = WebShopEnv(list_games("webshop", "eval_in_distribution")[0])
    first = env.reset()
    assert first.observation == f"WebShop [SEP] Instruction: [SEP] {env.goal['instruction']} [SEP] Search"
    assert first.admissible == [SEARCH_ACTION]
    results = env.step(act("search[free]"))
    assert results.observation.startswith("Back to Search [SEP] Page 1 (Total results: ")
    assert results.admissible[:2] == ["click[back to search]", "click[next >]"]
    shown = results.admissible[2:]
    assert len(shown) == 10 and all(a.startswith("click[b0") for a in shown)
    second = env.step(act("click[next >]"))
    assert "Page 2" in second.observation and "click[< prev]" in second.admissible
    assert env.step(act("click[< prev]")).admissible[2:] == shown
    item = env.step(act(shown[0]))
    product = env.product
    assert item.admissible == (["click[back to search]", "click[< prev]"]
                               + [f"click[{v}]" for values in product["options"].values() for v in values]
                               + ["click[description]", "click[features]", "click[buy now]"])
    assert f"{product['title']} [SEP] Price: {product['price_text']}" in item.observation
    value = next(iter(product["options"].values()))[0]
    assert env.step(act(f"click[{value}]")).observation.startswith(f"You have clicked {value}. [SEP] Back to Search")
    assert env.step(act("click[description]")).observation == f"Back to Search [SEP] < Prev [SEP] " \
                                                             f"{product['description']}"
    assert env.step(act("click[< prev]")).observation.startswith(f"You have clicked {value}.")
    assert env.step(act("click[back to search]")).admissible == [SEARCH_ACTION]


def test_the_walkthrough_pages_to_a_product_beyond_the_first_page(chat):
    shop = load_shop()
    found = [product["asin"] for product in shop.search("free")]
    game, goal = next((f"goal-{i}", goal) for i, goal in enumerate(shop.goals) if goal["asin"] in found[10:])
    pages = found.index(goal["asin"]) // 10
    env = WebShopEnv(game)
    env.goal = dict(goal, expert_query="free")
    (episode,) = play([env], expert_policy(chat), chat, MAX_STEPS)
    assert [t["action"] for t in episode.turns][:pages + 2] == \
        ["search[free]"] + ["click[next >]"] * pages + [f"click[{goal['asin'].lower()}]"]
    assert episode.won and f"Page {pages + 1} (Total results: 50)" in episode.turns[pages]["observation"]


def test_search_is_deterministic_and_ties_keep_catalog_order():
    products, goals = build_catalog()
    assert (products, goals) == build_catalog() and len({p["asin"] for p in products}) == len(products) == 300
    shop = load_shop()
    query = shop.goals[0]["expert_query"]
    assert shop.search(query) == shop.search(query) and len(shop.search("shampoo")) == 10
    assert BM25Index(["red shoe", "blue hat", "red shoe", "red shoe"]).search("red", 3) == [0, 2, 3]
    assert shop.search("zzz unknown words") == []


MALFORMED = ["", "no tags at all", act("click[nonexistent]"), act("search[]"), act("search[   ]"),
             act("click[buy now]"), act("jump[shampoo]"), act("search[a]") + act("search[b]"), "<action>search[x"]


def test_malformed_actions_are_invalid_and_change_nothing(chat):
    envs = [make_env("webshop", "goal-0") for _ in MALFORMED]
    policy = text_policy(chat, lambda e: MALFORMED[envs.index(e.env)])
    for e in play(envs, policy, chat, max_steps=2):
        assert e.error is None and not e.won and len(e.turns) == 2 and e.invalid_actions == 2
        assert [t["observation"] for t in e.turns] == [INVALID_ACTION] * 2 and e.last.admissible == [SEARCH_ACTION]


def test_actions_from_another_page_are_invalid():
    env = WebShopEnv("goal-0")
    env.reset()
    env.step(act("search[shampoo]"))
    for action in ["search[shampoo]", "click[buy now]", "click[description]", "click[search]"]:
        step = env.step(act(action))
        assert not step.valid and step.observation == INVALID_ACTION and not step.done
    assert env.page == "results"


# ----------------------------------------------------------------------------------------------------------------
# WebShop's reward, against hand-computed cases
# ----------------------------------------------------------------------------------------------------------------

SHAMPOO = dict(asin="B0TEST0001", category="beauty", query="shampoo", title="Brisa Shampoo, Sulfate Free, Vegan",
               path="Beauty & Personal Care › Hair Care › Shampoo", price=18.99, price_text="$18.99",
               options={"scent": ["lavender", "mint"], "size": ["8 fl oz", "16 fl oz"]},
               attributes=["sulfate free", "vegan", "organic"], features=["Sulfate free.", "Gentle every day."],
               description="A gentle shampoo, paraben free and preferred by stylists.")
GOAL = dict(asin=SHAMPOO["asin"], category="beauty", query="shampoo", name=SHAMPOO["title"], path=SHAMPOO["path"],
            instruction="...", attributes=["sulfate free", "vegan"], options={"scent": "lavender", "size": "8 fl oz"},
            price_upper=30.0, expert_query="vegan shampoo")
RIGHT = {"scent": "lavender", "size": "8 fl oz"}


@pytest.mark.parametrize("goal_change,chosen,expected", [
    ({}, RIGHT, 1.0),  # 2 attributes + 2 options + price, of 5
    ({"attributes": ["sulfate free", "cruelty free"]}, RIGHT, 4 / 5),  # partial attribute match
    ({"attributes": ["sulfate free", "paraben free"]}, RIGHT, 1.0),  # found in the description, as WebShop does
    ({}, {"scent": "mint", "size": "8 fl oz"}, 4 / 5),  # wrong option
    ({}, {"scent": "lavender", "size": "16 fl oz"}, 4 / 5),  # wrong size: sizes must match exactly
    ({}, {"scent": "lavender"}, 4 / 5),  # an option left unchosen
    ({}, {}, 3 / 5),
    ({"price_upper": 10.0}, RIGHT, 4 / 5),  # over budget
    ({"attributes": ["cruelty free"], "price_upper": 10.0}, {"scent": "mint"}, 0.0),
    ({"options": ["lavender", "8 fl oz"]}, RIGHT, 1.0),  # WebShop's human goals list option values without names
    ({"options": {"scent": "lavender"}}, {"scent": "red"}, 3 / 4),  # 'red' is not in 'preferred': whole words
    ({"price_upper": None}, RIGHT, 1.0),  # no budget in the instruction
])
def test_reward_matches_hand_computed_cases(goal_change, chosen, expected):
    assert webshop_reward(SHAMPOO, chosen, {**GOAL, **goal_change}) == pytest.approx(expected)


def test_reward_type_factor_follows_webshop():
    webcam = dict(SHAMPOO, query="webcam", title="Kestrel Webcam, Portable",
                  path="Electronics › Computer Accessories › Webcam")
    assert type_factor(webcam, GOAL) == 0.0 and webshop_reward(webcam, RIGHT, GOAL) == 0.0  # no title word shared
    brisa_webcam = dict(webcam, title="Brisa Webcam, Portable")  # 1 of the goal title's 5 words: not above 0.2
    assert type_factor(brisa_webcam, GOAL) == 0.5
    assert webshop_reward(brisa_webcam, RIGHT, GOAL) == pytest.approx(0.5)
    conditioner = dict(SHAMPOO, query="conditioner", title="Lumina Conditioner, Organic",
                       path="Beauty & Personal Care › Hair Care › Conditioner")
    assert type_factor(conditioner, GOAL) == 0.0  # shares two category levels, but no title word
    conditioner["title"] = "Lumina Vegan Conditioner"
    assert type_factor(conditioner, GOAL) == 1.0  # two category levels and a title word
    long_name = dict(GOAL, name="Brisa " + " ".join(f"word{i}" for i in "abcdefghijk"))  # 1 shared word of 12
    assert type_factor(dict(SHAMPOO, title="Brisa Webcam"), long_name) == 0.1


@pytest.mark.parametrize("a,b,expected", [
    ("easy to clean", "easy clean", 100), ("Long-Lasting", "long lasting", 100),  # one word set within the other
    ("hand wash", "hand washed", 90),  # 'hand wash' vs 'hand washed': 2 * 9 matching characters / 20
    ("vegan", "vegetarian", 67),  # 'veg' and 'an' match: 2 * 5 / 15
    ("", "vegan", 0),
])
def test_token_set_ratio(a, b, expected):
    assert token_set_ratio(a, b) == expected


# ----------------------------------------------------------------------------------------------------------------
# WebShop's own files
# ----------------------------------------------------------------------------------------------------------------


def write_webshop_files(folder):
    """A three-product shop in the schema of WebShop's items_shuffle_1000 / items_ins_v2_1000 / items_human_ins."""
    def item(asin, name, pricing, options, query, category_path):
        return {"asin": asin, "name": name, "category": "fashion", "query": query, "product_category": category_path,
                "pricing": pricing, "customization_options": options, "small_description": ["Soft cotton."],
                "full_description": f"{name}. Machine wash cold.", "images": ["https://example.invalid/1.jpg"]}

    color = lambda *values: [{"value": v, "image": None} for v in values]  # noqa: E731
    items = [
        item("B0SHIRT001", "Men's Crew T-Shirt", "$12.99", {"Color": color("Navy Blue", "Black/White"),
                                                             "Size": color("Small", "Large")},
             "men's t-shirts", "Clothing, Shoes & Jewelry › Men › Clothing › Shirts"),
        item("B0SHIRT001", "A duplicate asin WebShop skips", "$1.00", {}, "x", "x"),
        item("nan", "A broken row WebShop skips", "$1.00", {}, "x", "x"),
        item("B0HOODIE02", "Zip Hoodie", "$25.00 to $32.50", None, "hoodies",
             "Clothing, Shoes & Jewelry › Men › Clothing › Hoodies"),
        item("B0SOCKS003", "Wool Socks", "", {}, "socks", "Clothing, Shoes & Jewelry › Men › Socks"),
    ]
    ins = {"B0SHIRT001": {"attributes": ["machine wash", "cotton"], "instruction": "x"},
           "B0HOODIE02": {"attributes": ["zipper closure"], "instruction": "x"}}
    human = {
        "B0SHIRT001": [{"asin": "B0SHIRT001", "instruction": "i want a machine wash cotton t-shirt in navy blue.",
                        "instruction_attributes": ["machine wash", "cotton"],
                        "instruction_options": ["navy blue", "large"]},
                       {"asin": "B0SHIRT001", "instruction": "no attributes: WebShop skips this goal",
                        "instruction_attributes": [], "instruction_options": []}],
        "B0HOODIE02": [{"asin": "B0HOODIE02", "instruction": "a hoodie with a zipper closure",
                        "instruction_attributes": ["zipper closure"], "instruction_options": []}],
        "B0SOCKS003": [{"asin": "B0SOCKS003", "instruction": "wool socks", "instruction_attributes": ["wool"],
                        "instruction_options": []}],
    }
    for name, data in [("items_shuffle_1000.json", items), ("items_ins_v2_1000.json", ins),
                       ("items_human_ins.json", human)]:
        (folder / name).write_text(json.dumps(data))


def test_webshop_files_load_as_webshop_reads_them(tmp_path, chat):
    write_webshop_files(tmp_path)
    products, goals = load_webshop_files(tmp_path)
    assert [p["asin"] for p in products] == ["B0SHIRT001", "B0HOODIE02", "B0SOCKS003"]
    shirt, hoodie, socks = products
    assert shirt["options"] == {"color": ["navy blue", "black | white"], "size": ["small", "large"]}
    assert (shirt["price"], hoodie["price"], hoodie["price_text"], socks["price"]) == (12.99, 25.0, "$25.0 to $32.5",
                                                                                       100.0)
    assert hoodie["options"] == {} and socks["attributes"] == [] and shirt["attributes"] == ["machine wash", "cotton"]
    unshuffled = ["B0SHIRT001", "B0HOODIE02", "B0SOCKS003"]
    random.Random(233).shuffle(unshuffled)  # WebShop's goal order
    assert [g["asin"] for g in goals] == unshuffled
    shirt_goal = next(g for g in goals if g["asin"] == "B0SHIRT001")
    assert shirt_goal["price_upper"] in (20.0, 30.0, 40.0, 50.0)
    assert shirt_goal["instruction"] == ("i want a machine wash cotton t-shirt in navy blue, and price lower than "
                                         f"{shirt_goal['price_upper']:.2f} dollars")

    options = {"data_dir": str(tmp_path)}
    test_goals = list_games("webshop", "eval_in_distribution", options=options)
    assert test_goals == list_games("webshop", "eval_out_of_distribution", options=options) == \
        ["goal-0", "goal-1", "goal-2"]
    assert list_games("webshop", "train", options=options) == []  # WebShop trains on goals 1500 and later
    envs = [make_env("webshop", g, options) for g in test_goals]
    assert {env.task_type for env in envs} == {"fashion"}
    episodes = play(envs, expert_policy(chat), chat, MAX_STEPS)
    assert all(e.won for e in episodes), [e.turns for e in episodes]
    shirt_item_page = next(e for e in episodes if e.env.goal["asin"] == "B0SHIRT001").turns[1]["observation"]
    assert "color [SEP] navy blue [SEP] black | white [SEP] size [SEP] small [SEP] large" in shirt_item_page


def test_missing_webshop_files_say_which(tmp_path):
    (tmp_path / "items_shuffle_1000.json").write_text("[]")
    with pytest.raises(DataMissing, match="items_ins_v2_1000.json, items_human_ins.json"):
        list_games("webshop", "train", options={"data_dir": str(tmp_path)})


def test_unknown_split_and_option_are_errors():
    with pytest.raises(ValueError, match="unknown webshop split 'valid_seen'"):
        list_games("webshop", "valid_seen")
    with pytest.raises(ValueError, match="takes no option"):
        list_games("webshop", "train", options={"max_turns": "3"})
