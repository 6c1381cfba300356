"""Search QA: every question is solvable by searching, random play scores low, exact match, malformed replies, the
turn limit, the HTTP retriever (Search-R1's /retrieve contract) and an unreachable one, your own files, training."""

import json
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from envs import DataMissing, list_games, make_env
from rollout import expert_policy, play, random_policy, text_policy
from search_qa import (CORRECT, INCORRECT, INVALID_ACTION, SearchQAEnv, build_corpus, exact_match, load_qa,
                       normalize_answer, parse_reply)


def test_splits_are_disjoint_and_ood_questions_use_templates_never_trained_on():
    train, in_dist, out_dist = (list_games("search", split) for split in
                                ("train", "eval_in_distribution", "eval_out_of_distribution"))
    assert (len(train), len(in_dist), len(out_dist)) == (260, 100, 80)
    assert not (set(train) & set(in_dist)) and not (set(train) | set(in_dist)) & set(out_dist)
    questions = load_qa().questions
    templates = lambda games: {questions[g]["template"] for g in games}  # noqa: E731
    assert not templates(train) & templates(out_dist) and templates(in_dist) <= templates(train)
    assert {SearchQAEnv(g).task_type for g in in_dist} == {"single-hop", "two-hop"}


@pytest.mark.parametrize("split", ["eval_in_distribution", "eval_out_of_distribution"])
def test_the_walkthrough_answers_every_test_question_from_what_it_retrieved(chat, split):
    games = list_games("search", split)
    episodes = play([make_env("search", g) for g in games], expert_policy(chat), chat, max_steps=4)
    assert len(episodes) == len(games)
    for e in episodes:
        item = e.env.item
        assert e.won and e.task_return == 1.0 and e.invalid_actions == 0 and e.error is None, e.turns
        assert len(e.turns) == len(item["hops"]) + 1 and e.turns[-1]["observation"] == CORRECT
        information = [turn["observation"] for turn in e.turns[:-1]]
        assert all(info.startswith("<information>Doc 1(Title: ") for info in information)
        for hop, info in zip(item["hops"][1:], information):  # each search reveals the next hop's entity...
            assert hop in info
        assert item["answers"][0] in information[-1]  # ...and the last one the answer
        for t, turn in enumerate(e.turns):  # the WM target of turn t is exactly what the environment answered
            target = [tok for tok, index in zip(e.completion_ids, e.obs_index) if index == t]
            assert chat.tokenizer.decode(target) == turn["observation"]


def test_a_random_answerer_scores_low(chat):
    """Searches the question, then answers the title of one of the retrieved passages, picked at random."""
    games = list_games("search", "eval_in_distribution") + list_games("search", "eval_out_of_distribution")
    episodes = play([make_env("search", g) for g in games], random_policy(chat, seed=0), chat, max_steps=4)
    em = 100 * sum(e.won for e in episodes) / len(episodes)
    print(f"random answerer (seed 0) on {len(episodes)} test questions: exact match {em:.1f}%")
    assert em < 20 and all(len(e.turns) == 2 and e.error is None for e in episodes)


def test_corpus_is_deterministic_and_fictional_names_are_unique():
    passages, questions = build_corpus()
    assert (passages, questions) == build_corpus()
    titles = [p["title"] for p in passages]
    assert len(titles) == len(set(titles)) == 198 and len(questions) == 440
    query = questions[0]["question"]
    env = SearchQAEnv("q0000")
    assert env.retrieve(query) == env.retrieve(query) and len(env.retrieve(query)) == 3


@pytest.mark.parametrize("prediction,answers,expected", [
    ("The Selva River.", ["Selva River", "Selva"], 1.0),  # article, case, punctuation
    ("selva", ["Selva River", "Selva"], 1.0),  # an alias
    ("River Selva", ["Selva River", "Selva"], 0.0),  # not an alias: exact match is exact
    ("in 1874", ["1874"], 0.0),
    ("  1874 ", ["1874"], 1.0),
    ("Ulelia", ["Pelbriette Ulelia", "Ulelia"], 1.0),
    ("an apple", ["Apple"], 1.0),
    ("", ["Apple"], 0.0),
])
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


def test_normalize_answer_follows_squad():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("A theatre and an Anthem") == "theatre and anthem"  # whole-word articles only


@pytest.mark.parametrize("reply,expected", [
    ("<think>x</think><search> Selva  River </search>", ("search", "Selva River")),
    ("<SEARCH>a</SEARCH>", ("search", "a")),
    ("<answer> 1874 </answer>", ("answer", "1874")),
    ("<search>a</search><answer>b</answer>", ("search", "a")),  # Search-R1 acts on the first tag
    ("the answer is 1874", None), ("<search></search>", None), ("<answer>  </answer>", None), ("<search>a", None),
])
def test_parse_reply(reply, expected):
    assert parse_reply(reply) == expected


@pytest.mark.parametrize("reply", ["1874", "<search></search>", "<answer></answer>", "<search>unclosed", ""])
def test_malformed_replies_get_feedback_and_count_as_turns(chat, reply):
    (episode,) = play([make_env("search", "q0000")], text_policy(chat, lambda e: reply), chat, max_steps=10)
    assert episode.error is None and not episode.won and episode.task_return == 0
    assert len(episode.turns) == 4 and episode.invalid_actions == 4  # the default turn limit ends it
    assert [t["observation"] for t in episode.turns] == [INVALID_ACTION] * 4


def test_turn_limit_and_a_wrong_answer():
    env = SearchQAEnv("q0000", max_turns="2")  # a string, as --env_options gives it
    env.reset()
    first, second = env.step("<search>anything</search>"), env.step("<search>anything</search>")
    assert not first.done and second.done and second.reward == 0 and second.observation.startswith("<information>")
    env.reset()
    answer = env.step("<answer>1066</answer>")
    assert (answer.observation, answer.done, answer.won, answer.reward, answer.valid) == (INCORRECT, True, False, 0,
                                                                                          True)
    with pytest.raises(ValueError, match="max_turns must be a whole number >= 1, got '0'"):
        list_games("search", "train", options={"max_turns": "0"})


# ----------------------------------------------------------------------------------------------------------------
# The HTTP retriever: Search-R1's /retrieve contract
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def serving(answer):
    """An HTTP server on 127.0.0.1 whose POST answers are answer(path, request) -> bytes; yields its /retrieve URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = answer(self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def retrieval_server():
    """A /retrieve server over the built-in corpus (what Search-R1's retrieval_server.py answers), and the requests
    it received."""
    data, requests = load_qa(), []

    def answer(path, request):
        requests.append((path, request))
        result = [[{"document": {"id": str(i), "contents": data.contents[i]}, "score": 1.0}
                   for i in data.index.search(query, request["topk"])] for query in request["queries"]]
        return json.dumps({"result": result}).encode()

    with serving(answer) as url:
        yield url, requests


def test_the_http_retriever_speaks_search_r1s_contract_and_gives_the_same_passages(chat, retrieval_server):
    url, requests = retrieval_server
    options = {"retriever_url": url}
    games = list_games("search", "eval_in_distribution", options=options)[:10]
    assert requests == [("/retrieve", {"queries": ["probe"], "topk": 1, "return_scores": True})]  # the start-up check
    remote = play([make_env("search", g, options) for g in games], expert_policy(chat), chat, max_steps=4)
    local = play([make_env("search", g) for g in games], expert_policy(chat), chat, max_steps=4)
    assert all(e.won for e in remote)
    assert [[t["observation"] for t in e.turns] for e in remote] == [[t["observation"] for t in e.turns] for e in local]
    assert requests[1][1] == {"queries": [remote[0].env.item["hops"][0]], "topk": 3, "return_scores": True}


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/retrieve"  # nothing listens there any more


def test_an_unreachable_retriever_is_a_clear_error_at_start_and_an_env_error_mid_run(chat):
    url = closed_port_url()
    with pytest.raises(ValueError, match=f"the retriever at {url} failed .*drop retriever_url="):
        list_games("search", "train", options={"retriever_url": url})
    env = make_env("search", "q0000", {"retriever_url": url})
    (episode,) = play([env], expert_policy(chat), chat, max_steps=4)
    assert episode.error.startswith("step 0: RetrieverError: the retriever at") and not episode.won
    assert len(episode.turns) == 1 and episode.finished  # accounted for: one failed turn, not a crash


def test_a_retriever_answering_out_of_contract_is_an_env_error(chat):
    with serving(lambda path, request: b'{"results": []}') as url:
        (episode,) = play([make_env("search", "q0000", {"retriever_url": url})], expert_policy(chat), chat, max_steps=4)
    assert "RetrieverError" in episode.error and "KeyError" in episode.error


# ----------------------------------------------------------------------------------------------------------------
# Your own questions and corpus (data_dir=), in FlashRAG's / Search-R1's JSONL format
# ----------------------------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_own_questions_and_corpus_load_and_train_in_process(chat, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "Who built the Harbour Clock?", "golden_answers": ["Ada Pell"],
                                            "data_source": "nq"}])
    write_jsonl(tmp_path / "test.jsonl", [
        {"question": "Where is the Harbour Clock?", "golden_answers": ["Velmouth", "Velmouth harbour"],
         "data_source": "hotpotqa"}])
    write_jsonl(tmp_path / "corpus.jsonl", [
        {"id": "0", "contents": '"Harbour Clock"\nThe Harbour Clock of Velmouth was built by Ada Pell in 1871.'},
        {"id": "1", "contents": '"Velmouth"\nVelmouth is a port town.'}])
    options = {"data_dir": str(tmp_path)}
    assert list_games("search", "train", options=options) == ["train-0"]
    assert list_games("search", "eval_in_distribution", options=options) == \
        list_games("search", "eval_out_of_distribution", options=options) == ["test-0"]
    env = make_env("search", "test-0", options)
    assert env.task_type == "hotpotqa" and env.walkthrough == []
    replies = ["<search>Harbour Clock, Velmouth</search>", "<answer>velmouth harbour</answer>"]
    (episode,) = play([env], text_policy(chat, lambda e: replies[len(e.turns)]), chat, max_steps=4)
    assert episode.turns[0]["observation"] == (
        '<information>Doc 1(Title: "Harbour Clock") The Harbour Clock of Velmouth was built by Ada Pell in 1871.\n'
        'Doc 2(Title: "Velmouth") Velmouth is a port town.</information>')
    assert episode.won


def test_own_files_missing_are_clear_errors(tmp_path):
    with pytest.raises(DataMissing, match="train.jsonl is missing"):
        list_games("search", "train", options={"data_dir": str(tmp_path)})
    write_jsonl(tmp_path / "train.jsonl", [])
    write_jsonl(tmp_path / "test.jsonl", [])
    with pytest.raises(DataMissing, match="no corpus.jsonl to search"):
        list_games("search", "train", options={"data_dir": str(tmp_path)})
