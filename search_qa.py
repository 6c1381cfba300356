"""Search-augmented QA (Search-R1's interface) on a project-written corpus, with in-process BM25 or an HTTP retriever.

    python train_paw.py --env search                                                      # built-in corpus, BM25
    python train_paw.py --env search --env_options retriever_url=http://127.0.0.1:8000/retrieve data_dir=~/nq

Each turn the agent either searches, `<search>query</search>`, and gets the top-3 passages back inside
`<information>...</information>`, or answers, `<answer>...</answer>`, which ends the episode with reward 1 if the
normalised answer equals one of the gold answers (exact match, as Search-R1 scores it) and 0 otherwise.

The built-in corpus describes fictional towns, rivers, regions, people and companies, generated from a fixed seed, so
a model cannot answer from memory: every answer needs a search. Questions are single-hop ("Who founded X?") or
two-hop ("Which river flows through the town where P was born?"). The retriever is in-process BM25 (bm25s, no Java)
over that corpus, or, with `retriever_url=`, any server that speaks Search-R1's `/retrieve` contract (its
Wikipedia + e5 server included). `data_dir=` replaces the built-in questions (and corpus) with your own files.
"""

import functools
import json
import random
import re
import string
import urllib.error
import urllib.request
from pathlib import Path

import bm25s
from bm25s.stopwords import STOPWORDS_EN

from envs import DataMissing, Step, sample_games

# ----------------------------------------------------------------------------------------------------------------
# BM25 (shared with webshop.py)
# ----------------------------------------------------------------------------------------------------------------

STOPWORDS = frozenset(STOPWORDS_EN)


def bm25_tokens(text):
    return [word for word in re.findall(r"[a-z0-9]+", text.lower()) if word not in STOPWORDS]


class BM25Index:
    """Okapi BM25 over a fixed list of texts: Lucene's scoring with pyserini's defaults (k1=0.9, b=0.4), which
    WebShop's and Search-R1's BM25 baselines use. Deterministic: ties keep corpus order (bm25s' own top-k does not
    promise an order for ties)."""

    def __init__(self, texts):
        self.bm25 = bm25s.BM25(k1=0.9, b=0.4)
        self.bm25.index([bm25_tokens(text) for text in texts], show_progress=False)

    def search(self, query, k):
        """Indices of the (at most) k best texts that share a word with the query, best first."""
        tokens = [token for token in bm25_tokens(query) if token in self.bm25.vocab_dict]
        if not tokens:
            return []
        scores = self.bm25.get_scores(tokens).tolist()
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted() is stable: ties by index
        return [i for i in ranked[:k] if scores[i] > 0]


# ----------------------------------------------------------------------------------------------------------------
# The built-in corpus and questions, generated from a seed: fictional entities, so answers cannot be memorised.
# ----------------------------------------------------------------------------------------------------------------

CORPUS_SEED = 0
NUM_TOWNS, NUM_RIVERS, NUM_REGIONS, NUM_PEOPLE, NUM_COMPANIES = 40, 10, 8, 100, 40
NUM_TEST_QUESTIONS = 100  # held-out questions of the training templates (eval_in_distribution)

SYLLABLES = ["al", "bar", "cor", "dra", "el", "fen", "gal", "hal", "is", "kel", "lor", "mar", "nor", "or", "pel",
             "quin", "ros", "sel", "tam", "ul", "vel", "wyn", "yar", "zan", "bri", "cas", "dun", "esk", "fal", "gor"]
ENDINGS = ["a", "ia", "on", "en", "is", "or", "ek", "ith", "um", "ara", "ette", "ov"]
PROFESSIONS = ["sculptor", "chemist", "cartographer", "violinist", "architect", "novelist", "botanist", "engineer",
               "painter", "astronomer"]
CRAFTS = ["glassmaking", "clockmaking", "wool weaving", "salt mining", "boat building", "cheese making", "pottery",
          "bell casting"]
PRODUCTS = ["bicycles", "telescopes", "typewriters", "lanterns", "pianos", "sewing machines", "compasses", "kettles"]
LANDFORMS = ["coastal", "mountainous", "forested", "lake", "river valley", "highland", "marshland", "island"]
HONOURS = ["a series of public fountains", "a widely used field guide", "an early study of tides",
           "a set of chamber sonatas", "a bridge design still in use", "a novel about lighthouse keepers",
           "a survey of northern coastlines", "a catalogue of variable stars"]

# Question templates never trained on: their questions are eval_out_of_distribution, as Search-R1 evaluates out of
# domain on datasets it did not train on.
OOD_TEMPLATES = {"town_river", "company_region"}


def fictional_names(rng, count):
    names = set()
    while len(names) < count:
        names.add((rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + rng.choice(ENDINGS)).capitalize())
    return sorted(names)  # a set's order varies between runs; sorting keeps the corpus identical everywhere


def build_corpus(seed=CORPUS_SEED):
    """(passages, questions): passages are {"title", "text"}; questions are {"question", "answers", "type",
    "template", "hops"} where hops are the entity names an expert searches for, in order."""
    rng = random.Random(seed)
    total = NUM_TOWNS + NUM_RIVERS + NUM_REGIONS + 2 * NUM_PEOPLE + NUM_COMPANIES
    pool = fictional_names(rng, total)
    rng.shuffle(pool)
    take = iter(pool)
    regions = [next(take) for _ in range(NUM_REGIONS)]
    rivers = [f"{next(take)} River" for _ in range(NUM_RIVERS)]
    towns = [dict(name=next(take), region=rng.choice(regions), river=rng.choice(rivers), year=rng.randint(1100, 1800),
                  craft=rng.choice(CRAFTS)) for _ in range(NUM_TOWNS)]
    people = [dict(name=f"{next(take)} {next(take)}", town=rng.choice(towns)["name"], year=rng.randint(1820, 1960),
                   profession=rng.choice(PROFESSIONS), honour=rng.choice(HONOURS), company=None)
              for _ in range(NUM_PEOPLE)]
    companies = []
    for founder in rng.sample(people, NUM_COMPANIES):
        name = f"{next(take)} {rng.choice(['Industries', 'Works', 'Company', 'Manufacturing'])}"
        founder["company"] = name
        companies.append(dict(name=name, founder=founder["name"], year=founder["year"] + rng.randint(22, 45),
                              town=rng.choice(towns)["name"], product=rng.choice(PRODUCTS)))
    town_of = {town["name"]: town for town in towns}

    passages = [dict(title=r, text=f"{r} is a {rng.choice(LANDFORMS)} region with "
                                   f"{sum(t['region'] == r for t in towns)} towns.") for r in regions]
    passages += [dict(title=river, text=f"The {river} rises in the {rng.choice(regions)} hills and runs for "
                                        f"{rng.randint(40, 600)} kilometres before it reaches the sea.")
                 for river in rivers]
    passages += [dict(title=t["name"], text=f"{t['name']} is a town in the {t['region']} region, on the banks of the "
                                            f"{t['river']}. It was founded in {t['year']} and is known for its "
                                            f"{t['craft']}.") for t in towns]
    for p in people:
        surname = p["name"].split()[1]  # no founding year here: that question needs the company's passage
        work = f"{surname} founded {p['company']}." if p["company"] else f"{surname} is best known for {p['honour']}."
        passages.append(dict(title=p["name"], text=f"{p['name']} (born {p['year']}) is a {p['profession']} from "
                                                   f"{p['town']}. {work}"))
    passages += [dict(title=c["name"], text=f"{c['name']} is a maker of {c['product']}, founded in {c['year']} by "
                                            f"{c['founder']}. Its headquarters are in {c['town']}.")
                 for c in companies]

    def person(name):  # a surname alone is an accepted answer, as aliases are in NQ-style gold answers
        return [name, name.split()[1]]

    def river(name):
        return [name, name.removesuffix(" River")]

    def q(template, kind, text, answers, *hops):
        return dict(template=template, type=kind, question=text, answers=answers, hops=list(hops))

    questions = []
    for c in companies:
        founder = next(p for p in people if p["name"] == c["founder"])
        questions += [
            q("company_year", "single-hop", f"In which year was {c['name']} founded?", [str(c["year"])], c["name"]),
            q("company_founder", "single-hop", f"Who founded {c['name']}?", person(c["founder"]), c["name"]),
            q("founder_town", "two-hop", f"In which town was the founder of {c['name']} born?", [founder["town"]],
              c["name"], c["founder"]),
            q("founder_company_year", "two-hop", f"In which year was the company founded by {c['founder']} "
              "established?", [str(c["year"])], c["founder"], c["name"]),
            q("company_region", "two-hop", f"In which region is the town where {c['name']} has its headquarters?",
              [town_of[c["town"]]["region"], f"{town_of[c['town']]['region']} region"], c["name"], c["town"]),
        ]
    for p in people:
        questions += [
            q("person_town", "single-hop", f"In which town was {p['name']} born?", [p["town"]], p["name"]),
            q("person_river", "two-hop", f"Which river flows through the town where {p['name']} was born?",
              river(town_of[p["town"]]["river"]), p["name"], p["town"]),
        ]
    questions += [q("town_river", "single-hop", f"Which river flows through {t['name']}?", river(t["river"]),
                    t["name"]) for t in towns]
    return passages, questions


def split_questions(questions, seed=CORPUS_SEED):
    """train / test (held-out questions of the training templates) / ood (questions of held-out templates)."""
    seen = [i for i, question in enumerate(questions) if question["template"] not in OOD_TEMPLATES]
    test = set(random.Random(seed).sample(seen, NUM_TEST_QUESTIONS))
    return {"train": [i for i in seen if i not in test], "test": sorted(test),
            "ood": [i for i, question in enumerate(questions) if question["template"] in OOD_TEMPLATES]}


# ----------------------------------------------------------------------------------------------------------------
# Data: the built-in set, or your own files (data_dir=)
# ----------------------------------------------------------------------------------------------------------------

# `--train_split` / eval split name -> the split that answers it.
SPLITS = {"train": "train", "eval_in_distribution": "test", "eval_out_of_distribution": "ood"}


class QAData:
    """Questions by game id, split lists, and (when there is one) a local corpus of Search-R1 "contents" strings."""

    def __init__(self, questions, splits, contents):
        self.questions, self.splits, self.contents = questions, splits, contents
        self.index = BM25Index(contents) if contents else None


@functools.cache
def load_qa(data_dir=None):
    if data_dir is None:
        passages, questions = build_corpus()
        by_id = {f"q{i:04d}": question for i, question in enumerate(questions)}
        splits = {name: [f"q{i:04d}" for i in ids] for name, ids in split_questions(questions).items()}
        # Passages in wiki-18's format, which Search-R1's server returns: quoted title, newline, text.
        return QAData(by_id, splits, [f'"{p["title"]}"\n{p["text"]}' for p in passages])
    return load_qa_files(Path(data_dir).expanduser())


def load_qa_files(folder):
    """Your own questions, in FlashRAG's / Search-R1's JSONL format: `train.jsonl` and `test.jsonl`, one
    {"question", "golden_answers": [...], "data_source"?} per line (data_source, e.g. nq or hotpotqa, is the task type).
    Optional `corpus.jsonl`, one {"contents": "\"Title\"\\ntext"} per line, for in-process BM25; without it use
    retriever_url=. Both eval splits are test.jsonl."""
    questions, splits = {}, {}
    for name in ("train", "test"):
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise DataMissing(f"data_dir={folder} must hold train.jsonl and test.jsonl (one JSON object with "
                              f'"question" and "golden_answers" per line); {path} is missing')
        splits[name] = []
        for i, line in enumerate(path.read_text().splitlines()):
            row = json.loads(line)
            game = f"{name}-{i}"
            questions[game] = dict(question=row["question"], answers=list(row["golden_answers"]),
                                   type=row.get("data_source", "qa"))
            splits[name].append(game)
    splits["ood"] = splits["test"]
    corpus = folder / "corpus.jsonl"
    contents = [json.loads(line)["contents"] for line in corpus.read_text().splitlines()] if corpus.is_file() else []
    return QAData(questions, splits, contents)


# ----------------------------------------------------------------------------------------------------------------
# Retrieval and formatting
# ----------------------------------------------------------------------------------------------------------------

TOP_K = 3  # passages per search, as in Search-R1
RETRIEVER_TIMEOUT = 60  # seconds: a server that hangs longer ends the episode as an env error


class RetrieverError(RuntimeError):
    """The HTTP retriever is unreachable or answered out of contract: an infrastructure failure, not the agent's."""


def retrieve_http(url, query, k=TOP_K):
    """Passage contents from a server speaking Search-R1's /retrieve contract."""
    body = json.dumps({"queries": [query], "topk": k, "return_scores": True}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=RETRIEVER_TIMEOUT) as response:
            return [hit["document"]["contents"] for hit in json.load(response)["result"][0]]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:  # URLError and timeouts are OSErrors
        raise RetrieverError(f"the retriever at {url} failed ({type(error).__name__}: {error}). Start it (Search-R1: "
                             f"retrieval_launch.sh) or drop retriever_url= to search the local corpus") from None


def format_information(contents):
    """Search-R1's rendering of retrieved passages: Doc i(Title: ...) text, one per line."""
    docs = []
    for i, passage in enumerate(contents, 1):
        title, _, text = passage.partition("\n")
        docs.append(f"Doc {i}(Title: {title}) {text}")
    return "<information>" + "\n".join(docs) + "</information>"


# ----------------------------------------------------------------------------------------------------------------
# Answers: Search-R1's exact match on SQuAD-normalised strings
# ----------------------------------------------------------------------------------------------------------------


def normalize_answer(text):
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (the SQuAD/Search-R1 rule)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction, answers):
    return float(normalize_answer(prediction) in {normalize_answer(answer) for answer in answers})


# ----------------------------------------------------------------------------------------------------------------
# The environment
# ----------------------------------------------------------------------------------------------------------------

SEARCH_SYSTEM_PROMPT = (
    "Answer the question. Think inside <think> </think> tags every time you get new information. When you lack "
    "knowledge, call the search engine with <search> query </search>: it returns the top passages between "
    "<information> and </information>. You may search several times. When you know the answer, give only the "
    "answer, without explanation, inside <answer> </answer> tags, for example: <answer> Lake Oswin </answer>"
)
TAG_PATTERN = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL | re.IGNORECASE)
INVALID_ACTION = ("Invalid action. To search, put a query between <search> and </search>. To answer, put the answer "
                  "between <answer> and </answer>.")
CORRECT, INCORRECT = "Your answer is correct.", "Your answer is incorrect."


def turn_limit(max_turns):
    """max_turns as given on the command line (a string) or in code, checked."""
    if not str(max_turns).isdigit() or int(max_turns) < 1:
        raise ValueError(f"max_turns must be a whole number >= 1, got {max_turns!r}")
    return int(max_turns)


def parse_reply(reply):
    """(tag, content) of the reply's first complete <search> or <answer> pair, as Search-R1 reads a turn; None when
    there is none or it is empty."""
    match = TAG_PATTERN.search(reply)
    if match is None or not match.group(2).strip():
        return None
    return match.group(1).lower(), " ".join(match.group(2).split())


class SearchQAEnv:
    """One question. Options (strings from `--env_options`): retriever_url= (Search-R1's /retrieve endpoint;
    default: BM25 in-process), data_dir= (your own questions, see `load_qa_files`), max_turns= (replies per episode,
    default 4; the episode also stops at --max_env_steps, whichever comes first)."""

    system_prompt = SEARCH_SYSTEM_PROMPT
    eval_max_steps = 50  # no cap of eval.py's own: max_turns= (4, Search-R1's limit) ends an episode first
    gigpo_std = True  # verl-agent's search setting for GiGPO (mean_std_norm)
    reset_seconds, step_seconds = 0.001, 0.001  # under a millisecond each on our CPU, local BM25 (2026-12-07)
    logged_options = ()

    @staticmethod
    def games(split, num_games=0, task_types=None, seed=None, data_dir=None, retriever_url=None, max_turns=4):
        if split not in SPLITS:
            raise ValueError(f"unknown search split {split!r}; choose one of {', '.join(SPLITS)}")
        turn_limit(max_turns)
        data = load_qa(data_dir)
        if retriever_url:  # fail at start-up with a clear message, not as a run of failed episodes
            try:
                retrieve_http(retriever_url, "probe", 1)
            except RetrieverError as error:
                raise ValueError(str(error)) from None
        elif data.index is None:
            raise DataMissing(f"data_dir={data_dir} has no corpus.jsonl to search: add one, or give retriever_url=")
        return sample_games(list(data.splits[SPLITS[split]]), num_games, task_types, seed,
                            lambda question: SearchQAEnv(question, data_dir, retriever_url, max_turns).task_type)

    def __init__(self, game, data_dir=None, retriever_url=None, max_turns=4):
        self.data = load_qa(data_dir)
        self.game, self.retriever_url, self.max_turns = game, retriever_url, turn_limit(max_turns)
        self.item = self.data.questions[game]
        self.task_type = self.item["type"]
        self.turns = 0
        # Replies that solve the question: search each hop's entity, then answer. Your own questions (data_dir=) have
        # none.
        self.walkthrough = [f"<search>{hop}</search>" for hop in self.item.get("hops", [])]
        self.walkthrough += [f"<answer>{self.item['answers'][0]}</answer>"] if self.walkthrough else []

    def retrieve(self, query):
        if self.retriever_url:
            return retrieve_http(self.retriever_url, query)
        return [self.data.contents[i] for i in self.data.index.search(query, TOP_K)]

    def reset(self):
        self.turns, self.titles = 0, []
        return Step(f"Question: {self.item['question']}")

    def random_reply(self, seed):
        """Search the question, then answer the title of one of the passages retrieved last, picked at random."""
        if not self.titles:
            return f"<search>{self.item['question']}</search>"
        return f"<answer>{random.Random(seed).choice(self.titles)}</answer>"

    def step(self, reply):
        self.turns += 1
        out_of_turns = self.turns >= self.max_turns
        parsed = parse_reply(reply)
        if parsed is None:
            return Step(INVALID_ACTION, done=out_of_turns, valid=False)
        tag, content = parsed
        action = f"<{tag}>{content}</{tag}>"
        if tag == "answer":
            won = bool(exact_match(content, self.item["answers"]))
            return Step(CORRECT if won else INCORRECT, reward=float(won), done=True, won=won, action=action)
        # An unreachable retriever raises: the episode loop records an env error rather than blaming the agent.
        passages = self.retrieve(content)
        self.titles = [passage.partition("\n")[0].strip('"') for passage in passages] or self.titles
        return Step(format_information(passages), done=out_of_turns, action=action)

    def close(self):
        pass
