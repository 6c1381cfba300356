"""WebShop (Yao et al., 2022) as a light offline environment: a project-written catalog, WebShop's pages and reward.

    python train_paw.py --env webshop                                    # the built-in catalog
    python train_paw.py --env webshop --env_options data_dir=~/webshop   # WebShop's own small-setting files

The agent reads an instruction ("i need a vegan and sulfate free shampoo, with scent: lavender, ..., and price lower
than 30.00 dollars"), searches, pages through results, opens products, picks options and buys. Pages are WebShop's
text mode ([SEP]-joined), and the admissible actions are listed as verl-agent lists them: `search[<your query>]` on
the search page, then `click[...]` for each button, product and option on the page. At `click[buy now]` the episode
ends with WebShop's reward in [0, 1]; success means reward 1.

The built-in catalog (300 products in WebShop's 5 categories, 3 instructions each) is generated from a fixed seed out
of the word lists below. Search is BM25 (bm25s, no Java), deterministic. WebShop's own 1000-product files (the
"small" setting of verl-agent and the PaW paper) load with `data_dir=`, without any other WebShop code.
"""

import functools
import json
import random
import re
from difflib import SequenceMatcher
from pathlib import Path

from envs import DataMissing, Step, parse_action, sample_games
from search_qa import STOPWORDS, BM25Index

# ----------------------------------------------------------------------------------------------------------------
# The built-in catalog: WebShop's five categories, six product types each; the last type of each category is never a
# training target (its goals are eval_out_of_distribution).
# ----------------------------------------------------------------------------------------------------------------

CATALOG_SEED = 0
PRODUCTS_PER_TYPE = 10
GOALS_PER_PRODUCT = 3
NUM_TEST_GOALS = 100  # held-out goals on the training product types (eval_in_distribution)

CATEGORIES = {
    "beauty": dict(
        path="Beauty & Personal Care",
        types={"shampoo": "Hair Care", "conditioner": "Hair Care", "face serum": "Skin Care",
               "body lotion": "Skin Care", "lip balm": "Skin Care", "nail polish": "Makeup"},
        attributes=["sulfate free", "paraben free", "cruelty free", "fragrance free", "long lasting", "travel size",
                    "organic", "vegan", "hypoallergenic", "dermatologist tested"],
        options={"scent": ["lavender", "coconut", "citrus", "rose", "mint", "vanilla", "unscented"],
                 "size": ["2 fl oz", "4 fl oz", "8 fl oz", "16 fl oz"]},
        prices=(4, 40),
        notes=["Gentle enough for daily use.", "Absorbs quickly without a greasy feel.",
               "Comes in a recyclable bottle.", "Formulated with plant extracts.", "Suitable for all hair types."],
    ),
    "food": dict(
        path="Grocery & Gourmet Food",
        types={"granola": "Breakfast Foods", "protein bar": "Snack Foods", "trail mix": "Snack Foods",
               "green tea": "Beverages", "coffee beans": "Beverages", "pasta sauce": "Pantry Staples"},
        attributes=["gluten free", "non gmo", "low sugar", "high protein", "keto friendly", "dairy free", "kosher",
                    "organic", "vegan", "individually wrapped"],
        options={"flavor": ["chocolate", "original", "berry", "honey", "cinnamon", "salted caramel", "lemon"],
                 "size": ["pack of 1", "pack of 2", "pack of 6", "pack of 12"]},
        prices=(3, 35),
        notes=["Made in small batches.", "A good snack for work or school.", "Resealable bag keeps it fresh.",
               "No artificial colors.", "Great for breakfast or on the go."],
    ),
    "fashion": dict(
        path="Clothing, Shoes & Jewelry",
        types={"hoodie": "Men", "wool socks": "Men", "rain jacket": "Women", "yoga pants": "Women",
               "running shoes": "Shoes", "denim jeans": "Women"},
        attributes=["machine washable", "moisture wicking", "quick drying", "water resistant", "relaxed fit",
                    "slim fit", "breathable", "lightweight", "stretch fabric", "recycled materials"],
        options={"color": ["black", "navy", "heather grey", "olive green", "burgundy", "white", "sand"],
                 "size": ["small", "medium", "large", "x-large", "xx-large"]},
        prices=(12, 90),
        notes=["Soft on the skin all day.", "Designed for everyday wear.", "Reinforced seams last longer.",
               "Easy to pair with any outfit.", "Made for walks, gym and travel."],
    ),
    "furniture": dict(
        path="Home & Kitchen",
        types={"bookshelf": "Furniture", "office chair": "Furniture", "coffee table": "Furniture",
               "bar stool": "Furniture", "shoe rack": "Storage & Organization", "nightstand": "Furniture"},
        attributes=["easy assembly", "solid wood", "space saving", "height adjustable", "storage space",
                    "metal frame", "mid century", "heavy duty", "living room", "scratch resistant"],
        options={"color": ["walnut", "white", "black", "natural oak", "espresso", "grey"],
                 "size": ["small", "medium", "large"]},
        prices=(30, 250),
        notes=["All tools are included in the box.", "Fits apartments and dorm rooms.",
               "Wipe clean with a damp cloth.", "Sturdy and stable on any floor.", "A clean modern look."],
    ),
    "electronics": dict(
        path="Electronics",
        types={"wireless earbuds": "Headphones", "phone charger": "Accessories", "bluetooth speaker": "Speakers",
               "usb hub": "Computer Accessories", "webcam": "Computer Accessories", "power bank": "Accessories"},
        attributes=["fast charging", "noise cancelling", "long battery life", "waterproof", "hands free",
                    "plug and play", "usb c", "portable", "high definition", "compact design"],
        options={"color": ["black", "white", "silver", "blue", "red"],
                 "style": ["standard", "with case", "2 pack", "travel kit"]},
        prices=(10, 120),
        notes=["Works with phones, tablets and laptops.", "One year warranty.", "Simple setup in minutes.",
               "Includes a charging cable.", "Tested for everyday reliability."],
    ),
}
BRANDS = ["Alderwick", "Brisa", "Calloway", "Dunmore", "Everly", "Fairhaven", "Glenrock", "Halden", "Ivory Fox",
          "Juniper Lane", "Kestrel", "Larkspur", "Mossgate", "Northvale", "Orchard & Pine", "Pemberly", "Quillon",
          "Redfern", "Stillwater", "Thornbury"]
LEADS = ["i need", "i am looking for", "i want to buy", "find me", "i would like"]

# WebShop's budgets: a goal's price cap is one of the round tens just above the product's price.
PRICE_STEPS = [10.0 * i for i in range(1, 100)]


def price_cap(price, rng):
    """WebShop's rule: the larger of two random picks among the next four tens above the price; None if uncapped."""
    steps = [step for step in PRICE_STEPS if step > price][:4]
    return sorted(rng.sample(steps, 2))[1] if len(steps) >= 2 else None


def with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def build_catalog(seed=CATALOG_SEED):
    """(products, goals) of the built-in shop, in the same shape as `load_webshop_files` returns."""
    rng = random.Random(seed)
    products = []
    for category, spec in CATEGORIES.items():
        for kind, subcategory in spec["types"].items():
            for _ in range(PRODUCTS_PER_TYPE):
                asin = "B0" + "".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", k=8))  # distinct: tested
                brand, attributes = rng.choice(BRANDS), rng.sample(spec["attributes"], 3)
                options = {}
                for name, values in spec["options"].items():
                    offered = set(rng.sample(values, rng.randint(2, min(4, len(values)))))
                    options[name] = [value for value in values if value in offered]  # in the list's order
                price = rng.randint(*spec["prices"]) + 0.99
                products.append(dict(
                    asin=asin, category=category, query=kind,
                    title=f"{brand} {kind.title()}, {attributes[0].title()}, {attributes[1].title()}",
                    path=f"{spec['path']} › {subcategory} › {kind.title()}",
                    price=price, price_text=f"${price:.2f}", options=options, attributes=attributes,
                    features=[f"{a.capitalize()}." for a in attributes] + rng.sample(spec["notes"], 2),
                    description=f"The {brand} {kind} is {attributes[2]}. {' '.join(rng.sample(spec['notes'], 2))}",
                ))
    goals, seen = [], set()
    for product in products:
        for _ in range(GOALS_PER_PRODUCT):
            attributes = rng.sample(product["attributes"], rng.randint(1, 2))
            options = {name: rng.choice(values) for name, values in product["options"].items()}
            cap = price_cap(product["price"], rng)
            wanted = " and ".join(attributes) + " " + product["query"]
            instruction = (f"{rng.choice(LEADS)} {with_article(wanted)}, with "
                           + ", and ".join(f"{name}: {value}" for name, value in options.items())
                           + f", and price lower than {cap:.2f} dollars")
            if instruction not in seen:
                seen.add(instruction)
                goals.append(goal_of(product, instruction, attributes, options, cap, expert_query=wanted))
    return products, goals


def goal_option_values(goal):
    """The option values a goal asks for: the built-in goals name them ({name: value}), WebShop's list them."""
    return list(goal["options"].values()) if isinstance(goal["options"], dict) else list(goal["options"])


def goal_of(product, instruction, attributes, options, price_upper, expert_query):
    """A goal: what the instruction asks for, the target product's identity (for WebShop's type match), and the
    search an expert types (for the walkthrough)."""
    return dict(asin=product["asin"], category=product["category"], query=product["query"], name=product["title"],
                path=product["path"], instruction=instruction, attributes=attributes, options=options,
                price_upper=price_upper, expert_query=expert_query)


# ----------------------------------------------------------------------------------------------------------------
# WebShop's own files (data_dir=): items_shuffle_1000.json, items_ins_v2_1000.json, items_human_ins.json
# ----------------------------------------------------------------------------------------------------------------

WEBSHOP_FILES = ("items_shuffle_1000.json", "items_ins_v2_1000.json", "items_human_ins.json")
GOAL_SHUFFLE_SEED = 233  # WebShop shuffles its goal list with this seed before splitting it
TEST_GOALS, DEV_GOALS = 500, 1500  # WebShop's split of the shuffled goals: test [0, 500), dev [500, 1500), train rest


def load_webshop_files(folder):
    """Products and human-instruction goals from WebShop's small-setting files, read the way WebShop's engine reads
    them (same filters and field mapping), so goal i here is WebShop's goal i. Two differences, both for
    determinism: a price range costs its low end (WebShop draws a random price in the range), and the price caps come
    from a seeded generator (WebShop's is unseeded)."""
    missing = [name for name in WEBSHOP_FILES if not (folder / name).is_file()]
    if missing:
        raise DataMissing(f"data_dir={folder} lacks {', '.join(missing)}: WebShop's small-setting files "
                          f"(setup.sh -d small in the WebShop repository downloads them)")
    items, ins, human = (json.loads((folder / name).read_text()) for name in WEBSHOP_FILES)
    products, asins = [], set()
    for item in items:
        asin = item["asin"]
        if asin == "nan" or len(asin) > 10 or asin in asins:
            continue
        asins.add(asin)
        prices = [float(p) for p in re.findall(r"\$\s*([\d.]+)", (item.get("pricing") or "").replace(",", ""))][:2]
        bullets = item.get("small_description") or []
        products.append(dict(
            asin=asin, category=item["category"], query=item["query"].lower().strip(), title=item["name"],
            path=item["product_category"], price=prices[0] if prices else 100.0,
            price_text=" to ".join(f"${p}" for p in prices) if prices else "$100.0",
            options={name.lower(): [o["value"].strip().replace("/", " | ").lower() for o in values]
                     for name, values in (item.get("customization_options") or {}).items() if values},
            attributes=ins.get(asin, {}).get("attributes", []),
            features=bullets if isinstance(bullets, list) else [bullets],
            description=item.get("full_description") or "",
        ))
    rng, goals = random.Random(0), []
    for product in products:
        for row in human.get(product["asin"], []):
            if not row["instruction_attributes"]:  # WebShop skips these
                continue
            cap = price_cap(product["price"], rng)
            instruction = row["instruction"].strip(".") + (f", and price lower than {cap:.2f} dollars" if cap else "")
            goals.append(goal_of(product, instruction, row["instruction_attributes"], row["instruction_options"],
                                 cap, expert_query=product["title"]))
    random.Random(GOAL_SHUFFLE_SEED).shuffle(goals)
    return products, goals


# ----------------------------------------------------------------------------------------------------------------
# WebShop's reward
# ----------------------------------------------------------------------------------------------------------------


def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def token_set_ratio(a, b):
    """thefuzz's token_set_ratio (0-100), with difflib's ratio in place of Levenshtein's: 100 when one phrase's words
    are all among the other's, else the best similarity of the sorted shared and leftover words."""
    wa, wb = set(words(a)), set(words(b))
    if not wa or not wb:
        return 0
    shared = " ".join(sorted(wa & wb))
    if shared and (wa <= wb or wb <= wa):
        return 100
    ca, cb = (f"{shared} {' '.join(sorted(w - (wa & wb)))}".strip() for w in (wa, wb))
    pairs = [(shared, ca), (shared, cb), (ca, cb)] if shared else [(ca, cb)]
    return round(100 * max(SequenceMatcher(None, x, y).ratio() for x, y in pairs))


def fuzzy_match(a, b):
    return token_set_ratio(a, b) > 85  # WebShop's threshold


def mentions(product, phrase):
    """The phrase, as whole words, in the title, features or description (WebShop tests a raw substring, which finds
    'red' in 'preferred'; we need whole words)."""
    text = " ".join(words(" ".join([product["title"], *product["features"], product["description"]])))
    return bool(phrase.strip()) and f" {' '.join(words(phrase))} " in f" {text} "


def category_levels(path):
    return {level.strip() for level in path.split("›")}


def type_factor(product, goal):
    """WebShop's type match: 1 if the product shares the goal's search query, two category levels or a fifth of the
    title's words, else 0.5; 0.1 below a tenth of the title's words and 0 with none. (WebShop counts the title's nouns
    with spaCy's large English model; we count its words that are not stopwords or numbers.)"""
    wanted = {w for w in words(goal["name"]) if w not in STOPWORDS and not w.isdigit()}
    title_score = len(wanted & set(words(product["title"]))) / len(wanted) if wanted else 0.2
    category_match = len(category_levels(product["path"]) & category_levels(goal["path"])) >= 2
    factor = 1.0 if product["query"] == goal["query"] or category_match or title_score > 0.2 else 0.5
    if title_score < 0.1:
        factor = 0.1
    return 0.0 if title_score == 0 else factor


def webshop_reward(product, chosen, goal):
    """WebShop's score for buying `product` with options `chosen` ({option name: value}):
    (goal attributes found + chosen options that match a goal option + price within the cap) / (attributes + goal
    options + 1), times the type factor. A size must match exactly, other options fuzzily; an attribute or option
    also counts when the product's text names it."""
    goal_options = goal_option_values(goal)
    found = sum(any(fuzzy_match(have, attribute) for have in product["attributes"]) or mentions(product, attribute)
                for attribute in goal["attributes"])
    matched = sum(
        (value in goal_options if name == "size" else any(fuzzy_match(g, value) for g in goal_options))
        or mentions(product, value)
        for name, value in chosen.items())
    within_budget = goal["price_upper"] is None or product["price"] <= goal["price_upper"]
    total = len(goal["attributes"]) + len(goal_options) + 1
    # WebShop counts chosen options, which can outnumber the goal's; capped so that the score stays within [0, 1].
    return (found + min(matched, len(goal_options)) + within_budget) / total * type_factor(product, goal)


# ----------------------------------------------------------------------------------------------------------------
# The shop: products, goals, splits and the search engine, built once per process
# ----------------------------------------------------------------------------------------------------------------

SEARCH_RETURN_N, PAGE_SIZE = 50, 10  # WebShop's: 50 results per search, 10 per page
SPLITS = ("train", "eval_in_distribution", "eval_out_of_distribution")


class Shop:
    def __init__(self, products, goals, splits):
        self.products, self.goals, self.splits = products, goals, splits
        self.by_asin = {product["asin"].lower(): product for product in products}
        # What WebShop indexes for a product: its title, description, features and option values.
        self.index = BM25Index([" ".join([p["title"], p["description"], *p["features"],
                                          *(v for values in p["options"].values() for v in values)])
                                for p in products])

    def search(self, query):
        return [self.products[i] for i in self.index.search(query, SEARCH_RETURN_N)]


@functools.cache
def load_shop(data_dir=None):
    if data_dir is not None:
        products, goals = load_webshop_files(Path(data_dir).expanduser())
        test = list(range(min(TEST_GOALS, len(goals))))  # WebShop has one test split: both eval names use it
        return Shop(products, goals, {"train": list(range(DEV_GOALS, len(goals))), "eval_in_distribution": test,
                                      "eval_out_of_distribution": test})
    products, goals = build_catalog()
    held_out = {list(spec["types"])[-1] for spec in CATEGORIES.values()}
    seen = [i for i, goal in enumerate(goals) if goal["query"] not in held_out]
    test = set(random.Random(CATALOG_SEED).sample(seen, NUM_TEST_GOALS))
    return Shop(products, goals, {
        "train": [i for i in seen if i not in test], "eval_in_distribution": sorted(test),
        "eval_out_of_distribution": [i for i, goal in enumerate(goals) if goal["query"] in held_out]})


# ----------------------------------------------------------------------------------------------------------------
# The environment
# ----------------------------------------------------------------------------------------------------------------

WEBSHOP_SYSTEM_PROMPT = (
    "You are an expert online shopping agent in the WebShop environment. Each turn you see a web page and the actions "
    "you may take. Buy the product that best matches the instruction: search[your query] on the search page, "
    "click[...] a product in the results, click its options, then click[buy now]. Reason briefly inside "
    "<think> </think> tags, then give exactly one admissible action inside <action> </action> tags, for example: "
    "<think>First I search for the product.</think><action>search[vegan shampoo]</action>"
)
ACTION = re.compile(r"(search|click)\[(.*)\]")
SEARCH_ACTION = "search[<your query>]"  # how verl-agent lists the search bar among the admissible actions
INVALID_ACTION = "Invalid action. Nothing happens."


class WebShopEnv:
    """One shopping goal. Option (a string from `--env_options`): data_dir= (a folder with WebShop's own
    small-setting files; default: the built-in catalog)."""

    system_prompt = WEBSHOP_SYSTEM_PROMPT
    eval_max_steps = 15
    gigpo_std = False  # verl-agent's WebShop setting for GiGPO (mean_norm)
    reset_seconds, step_seconds = 0.001, 0.001  # under a millisecond each on our CPU (2026-12-07)
    logged_options = ()

    @staticmethod
    def games(split, num_games=0, task_types=None, seed=None, data_dir=None):
        if split not in SPLITS:
            raise ValueError(f"unknown webshop split {split!r}; choose one of {', '.join(SPLITS)}")
        return sample_games([f"goal-{i}" for i in load_shop(data_dir).splits[split]], num_games, task_types, seed,
                            lambda goal: WebShopEnv(goal, data_dir).task_type)

    def __init__(self, game, data_dir=None):
        self.game, self.shop = game, load_shop(data_dir)
        self.goal = self.shop.goals[int(game.removeprefix("goal-"))]
        self.task_type = self.goal["category"]
        self.walkthrough = []

    def reset(self):
        self.page, self.results, self.page_no, self.product, self.chosen = "search", [], 1, None, {}
        self.walkthrough = self._walkthrough()
        return self._show()

    def random_reply(self, seed):
        """Search the instruction as written, then click uniformly among the page's buttons."""
        if self.page == "search":
            return f"<action>search[{self.goal['instruction']}]</action>"
        return f"<action>{random.Random(seed).choice(self.admissible)}</action>"

    def _walkthrough(self):
        """Replies that solve the goal: search the goal's words, page to the target product, click the goal's options
        it offers, buy. Search is deterministic, so they are known at reset. Empty if the search misses the target
        (never in the built-in catalog)."""
        query, asin = self.goal["expert_query"], self.goal["asin"]
        found = [product["asin"] for product in self.shop.search(query)]
        if asin not in found:
            return []
        offered = {value for values in self.shop.by_asin[asin.lower()]["options"].values() for value in values}
        actions = ([f"search[{query}]"] + ["click[next >]"] * (found.index(asin) // PAGE_SIZE)
                   + [f"click[{asin.lower()}]"]
                   + [f"click[{value}]" for value in goal_option_values(self.goal) if value in offered]
                   + ["click[buy now]"])
        return [f"<action>{action}</action>" for action in actions]

    def step(self, reply):
        action = parse_action(reply)
        match = ACTION.fullmatch(action or "")
        if match is None:
            return self._invalid(action)
        verb, arg = match.group(1), match.group(2).strip()
        if verb == "search":
            if self.page != "search" or not arg:
                return self._invalid(action)
            self.page, self.results, self.page_no = "results", self.shop.search(arg), 1
        elif arg not in self.buttons:
            return self._invalid(action)
        elif arg == "buy now":
            score = webshop_reward(self.product, self.chosen, self.goal)
            page = f"Thank you for shopping with us! [SEP] Your score (min 0.0, max 1.0) [SEP] {score:.2f}"
            return Step(page, reward=score, done=True, won=score == 1, action=action)
        else:
            self._click(arg)
        return self._show(action)

    def _click(self, button):
        if button == "back to search":
            self.page, self.product, self.chosen = "search", None, {}
        elif button == "next >":
            self.page_no += 1
        elif button == "< prev":  # from a product back to its results, from its description or features to it
            if self.page == "results":
                self.page_no -= 1
            else:
                self.page = "results" if self.page == "item" else "item"
        elif self.page == "results":  # a product
            self.page, self.product, self.chosen = "item", self.shop.by_asin[button], {}
        elif button in ("description", "features"):
            self.page = button
        else:  # an option value: it replaces the earlier choice of that option
            name = next(name for name, values in self.product["options"].items() if button in values)
            self.chosen[name] = button

    def _page(self):
        """The current page as (text, is_button) pieces, in WebShop's order."""
        if self.page == "search":
            return [("WebShop", False), ("Instruction:", False), (self.goal["instruction"], False), ("Search", False)]
        pieces = [("Back to Search", True)]
        if self.page == "results":
            pieces.append((f"Page {self.page_no} (Total results: {len(self.results)})", False))
            if self.page_no > 1:
                pieces.append(("< Prev", True))
            if self.page_no * PAGE_SIZE < len(self.results):
                pieces.append(("Next >", True))
            for product in self.results[(self.page_no - 1) * PAGE_SIZE:self.page_no * PAGE_SIZE]:
                pieces += [(product["asin"], True), (product["title"], False), (product["price_text"], False)]
            return pieces
        pieces.append(("< Prev", True))
        product = self.product
        if self.page == "description":
            return pieces + [(product["description"], False)]
        if self.page == "features":
            return pieces + [(feature, False) for feature in product["features"]]
        # The item page. WebShop's rich text mode says which options are clicked; its plain text mode says nothing.
        clicked = [(f"You have clicked {value}.", False) for value in self.chosen.values()]
        for name, values in product["options"].items():
            pieces += [(name, False)] + [(value, True) for value in values]
        return clicked + pieces + [(product["title"], False), (f"Price: {product['price_text']}", False),
                                   ("Description", True), ("Features", True), ("Buy Now", True)]

    @property
    def admissible(self):
        return [SEARCH_ACTION] if self.page == "search" else [f"click[{button}]" for button in self.buttons]

    def _show(self, action=None):
        pieces = self._page()
        self.buttons = [text.lower() for text, is_button in pieces if is_button]
        return Step(" [SEP] ".join(text for text, _ in pieces), self.admissible, action=action)

    def _invalid(self, action):
        """WebShop ignores an action it cannot take; we say so, rather than repeat the whole page."""
        return Step(INVALID_ACTION, self.admissible, action=action, valid=False)

    def close(self):
        pass
