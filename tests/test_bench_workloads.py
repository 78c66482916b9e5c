"""Benchmark workloads: exact token lengths, group structure, determinism by seed."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

import pytest

from lbproxy.bench.workloads import Request, Workload, make_workload
from lbproxy.routing.prompt import prompt_bytes_from_body
from lbproxy.tokenization.tokenizer import Tokenizer, default_tokenizer

SMALL_SP = {
    "num_groups": 5,
    "num_prompts_per_group": 4,
    "system_prompt_len": 300,
    "question_len": 40,
    "output_len": 7,
}
SMALL_MT = {
    "num_conversations": 4,
    "turns": 3,
    "system_prompt_len": 50,
    "question_len": 20,
    "output_len": 9,
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def content_len(tok: Tokenizer, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def server_ids(tok: Tokenizer, req: Request) -> list[int]:
    """What a vLLM-style server computes from the request body."""
    body = req.body("m")
    if "messages" in body:
        return tok.encode_chat(body["messages"])
    if isinstance(body["prompt"], list):
        return body["prompt"]
    return tok.encode(body["prompt"], add_special_tokens=True)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_shared_prefix_exact_lengths(tok: Tokenizer, api: str) -> None:
    wl = make_workload("shared-prefix", tok, {**SMALL_SP, "api": api})
    specials = 1 if api == "completions" else None  # the BOS; chat: the template's tokens
    for i in range(len(wl)):
        req = wl.request(i)
        system, question = req.segments
        assert content_len(tok, system.text) == len(system.ids) == 300
        assert content_len(tok, question.text) == len(question.ids) == 40
        ids = req.token_ids()
        assert ids == server_ids(tok, req)  # assembled ids = the server's tokenisation
        assert req.num_prompt_tokens == len(ids)
        if specials is not None:
            assert len(ids) == 300 + 40 + specials
        assert req.max_tokens == 7


def test_shared_prefix_group_structure(tok: Tokenizer) -> None:
    wl = make_workload("shared-prefix", tok, SMALL_SP)
    assert len(wl) == 20
    reqs = [wl.request(i) for i in range(len(wl))]
    # One pass covers every prompt exactly once, then the sequence repeats.
    texts = [r.prompt_text for r in reqs]
    assert len(set(texts)) == 20
    assert [r.prompt_text for r in (wl.request(20), wl.request(39))] == [texts[0], texts[19]]
    by_group: dict[int, list[Request]] = defaultdict(list)
    for r in reqs:
        by_group[r.group].append(r)
    assert sorted(by_group) == list(range(5))
    systems = set()
    for members in by_group.values():
        assert len(members) == 4
        # The group shares its system prompt (a byte and token prefix), not its questions.
        assert len({r.segments[0].text for r in members}) == 1
        assert len({r.segments[1].text for r in members}) == 4
        ids = [r.token_ids() for r in members]
        assert all(x[:301] == ids[0][:301] for x in ids)
        systems.add(members[0].segments[0].text)
    assert len(systems) == 5
    # Shuffled like inference-perf: consecutive requests are not all of one group.
    assert [r.group for r in reqs[:5]] != [reqs[0].group] * 5


def test_determinism_by_seed(tok: Tokenizer) -> None:
    def texts(wl: Workload) -> list[str]:
        return [wl.request(i).prompt_text for i in range(len(wl))]

    a = make_workload("shared-prefix", tok, {**SMALL_SP, "seed": 3})
    b = make_workload("shared-prefix", tok, {**SMALL_SP, "seed": 3})
    c = make_workload("shared-prefix", tok, {**SMALL_SP, "seed": 4})
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert not set(texts(a)) & set(texts(c))


def test_diverse_prefix(tok: Tokenizer) -> None:
    wl = make_workload("diverse-prefix", tok, {"num_prompts": 12, "prompt_len": 200})
    reqs = [wl.request(i) for i in range(12)]
    assert all(len(r.token_ids()) == 201 and r.token_ids() == server_ids(tok, r) for r in reqs)
    # Little reuse: no two prompts share even their first 16 tokens (one vLLM block).
    assert len({tuple(r.token_ids()[1:17]) for r in reqs}) == 12


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_multi_turn_grows_per_session(tok: Tokenizer, api: str) -> None:
    wl = make_workload("multi-turn", tok, {**SMALL_MT, "api": api})
    assert len(wl) == 12
    reqs = [wl.request(i) for i in range(12)]
    by_session: dict[str, list[Request]] = defaultdict(list)
    for r in reqs:
        assert r.session is not None
        by_session[r.session].append(r)
        assert r.token_ids() == server_ids(tok, r)
    assert len(by_session) == 4
    for turns in by_session.values():
        # Rounds: each conversation's turns come in order; each resends the whole history.
        assert [len(r.segments) for r in turns] == [2, 4, 6]
        for prev, nxt in itertools.pairwise(turns):
            assert nxt.segments[: len(prev.segments)] == prev.segments
            assert content_len(tok, nxt.segments[-1].text) == 20  # the new question
            assert content_len(tok, nxt.segments[-2].text) == 9  # the previous answer
        if api == "chat":
            assert [m["role"] for m in turns[-1].messages()] == [
                "system",
                "user",
                "assistant",
                "user",
                "assistant",
                "user",
            ]
    # Turn 1 of every conversation goes out before any turn 2.
    assert Counter(len(r.segments) for r in reqs[:4]) == {2: 4}


def test_body_and_prompt_bytes_match_the_proxy(tok: Tokenizer) -> None:
    for api in ("completions", "chat"):
        req = make_workload("shared-prefix", tok, {**SMALL_SP, "api": api}).request(0)
        body = req.body("granite")
        assert body["model"] == "granite"
        assert body["max_tokens"] == body["min_tokens"] == 7
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert req.prompt_bytes() == prompt_bytes_from_body(body)
        assert req.route == ("/v1/chat/completions" if api == "chat" else "/v1/completions")
    ids_req = make_workload("shared-prefix", tok, SMALL_SP, prompt_format="ids").request(0)
    body = ids_req.body("m")
    assert body["prompt"] == ids_req.token_ids() == tok.encode(ids_req.prompt_text)
    assert ids_req.prompt_bytes() == prompt_bytes_from_body(body)


def test_shared_token_ids_cache(tok: Tokenizer) -> None:
    wl = make_workload("shared-prefix", tok, SMALL_SP)
    assert wl.token_ids(3) == wl.request(3).token_ids()
    assert wl.token_ids(3) is wl.token_ids(23)  # the same prompt again: one list


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("nope", {}, "unknown workload"),
        ("shared-prefix", {"prompt_len": 5}, "takes no parameter 'prompt_len'"),
        ("shared-prefix", {"num_groups": 0}, "num_groups must be >= 1"),
        ("diverse-prefix", {"prompt_len": 2.5}, "prompt_len must be an integer"),
        ("multi-turn", {"api": "embeddings"}, "api must be one of"),
    ],
)
def test_bad_parameters(tok: Tokenizer, name: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_workload(name, tok, params)


def test_token_id_prompts_need_completions(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="needs the completions api"):
        make_workload("multi-turn", tok, prompt_format="ids")
