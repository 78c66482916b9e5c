"""PromptTokenizer: exact token ids for request bodies, with a spliced shared-prefix cache.

Exactness tests run with the self-check off (`verify_first=0, verify_every=0`), so a
wrong splice shows up as a wrong result instead of being repaired by the check.
"""

from __future__ import annotations

import random
import threading
from array import array
from typing import Any

import pytest
import tokenizers
from tokenizers import AddedToken, models, normalizers, pre_tokenizers, processors, trainers

import lbproxy.tokenization.token_cache as token_cache
from lbproxy.routing.state import RequestContext
from lbproxy.tokenization.token_cache import PromptTokenizer
from lbproxy.tokenization.tokenizer import Tokenizer, default_tokenizer

_VOCABULARY = (
    "the of and to in is was for on that with as by at from cache request server model "
    "token block memory queue route prefix latency throughput backend engine batch"
)
WORDS = _VOCABULARY.split()
ODD = [
    "Ünïcödé",
    "日本語のテキスト",
    "emoji🚀🚀",
    "naïve",
    "\u00a0nbsp",
    "tab\there",
    "line\nbreak",
    "  double",
    "   triple",
    "trailing ",
    "x\u3000y",
    "12345678",
    "don't",
    "<|end|>",
    "<s>",
    "</s>",
    "a<|user|>b",
    "\n\n",
    "{'json': [1, 2]}",
    "\u0301combining",
    "two  \nlines",
    "tabs \t\t\nand",
    "end.  \n\n",
]


def words(rng: random.Random, n: int, odd: float = 0.1) -> str:
    out = []
    for _ in range(n):
        out.append(rng.choice(ODD) if rng.random() < odd else rng.choice(WORDS))
    return " ".join(out)


def exact(tok: Tokenizer, **kw: Any) -> PromptTokenizer:
    """A PromptTokenizer whose splices are never checked (so wrong ones would show)."""
    return PromptTokenizer(tok, verify_first=0, verify_every=0, **kw)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


# ---------------------------------------------------------------- completions
@pytest.mark.parametrize("chunk", [16, 64, 256])
def test_random_prompts_sharing_prefixes_match_full_encoding(tok: Tokenizer, chunk: int) -> None:
    rng = random.Random(chunk)
    pt = exact(tok, chunk_chars=chunk)
    systems = [words(rng, rng.randrange(50, 400)) for _ in range(4)]
    for i in range(120):
        base = rng.choice(systems)
        if rng.random() < 0.3:  # share only part of a system prompt
            base = base[: rng.randrange(len(base) + 1)]
        sep = rng.choice([" ", "", "\n", "  ", "<|end|>", "\t"])
        text = base + sep + words(rng, rng.randrange(0, 60), odd=0.3)
        special = rng.random() < 0.5
        body = {"prompt": text} if special else {"prompt": text, "add_special_tokens": False}
        assert pt.ids_for_body(body) == tok.encode(text, add_special_tokens=special), i
    assert pt.hits > 60  # the splice really ran
    assert pt.cached_tokens_reused > 0


def test_unicode_whitespace_and_special_tokens_near_every_cut(tok: Tokenizer) -> None:
    # Dense odd material, small chunks: cuts land next to multi-byte characters,
    # whitespace runs and special tokens written in the text.
    rng = random.Random(7)
    pt = exact(tok, chunk_chars=32)
    for _ in range(150):
        prefix = words(rng, 80, odd=0.6)
        for _ in range(3):
            text = prefix + words(rng, rng.randrange(1, 20), odd=0.6)
            assert pt.encode(text) == tok.encode(text)
            assert pt.encode(text, add_special_tokens=False) == tok.encode(
                text, add_special_tokens=False
            )
    assert pt.hits > 200


def test_prompt_shapes(tok: Tokenizer) -> None:
    pt = exact(tok)
    assert pt.ids_for_body({"prompt": "hello world"}) == tok.encode("hello world")
    assert pt.ids_for_body({"prompt": ["hello world"]}) == tok.encode("hello world")
    assert pt.ids_for_body({"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert pt.ids_for_body({"prompt": [[5, 6], [7]]}) == [5, 6]  # a batch: the first
    assert pt.ids_for_body({"input": "an embedding"}) == tok.encode("an embedding")
    no_bos = {"prompt": "hello", "add_special_tokens": False}
    assert pt.ids_for_body(no_bos) == tok.encode("hello", add_special_tokens=False)
    assert pt.array_for_body({"prompt": "hello world"}) == array("I", tok.encode("hello world"))
    for bad in (
        {},
        {"prompt": 42},
        {"prompt": []},
        {"prompt": [1, "x"]},
        {"prompt": [1, -2]},
        {"prompt": [True, False]},
        {"messages": "not a list"},
        {"messages": [{"role": "nobody", "content": "x"}]},  # the template raises
        {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"},
        {"messages": []},
        "not a dict",
    ):
        assert pt.ids_for_body(bad) == [], bad  # type: ignore[arg-type]
        assert len(pt.array_for_body(bad)) == 0  # type: ignore[arg-type]


def test_short_prompts_are_encoded_not_cached(tok: Tokenizer) -> None:
    pt = exact(tok, chunk_chars=256)
    for text in ["", "x", "short prompt", "a" * 200]:
        assert pt.encode(text) == tok.encode(text)
    assert pt.entries == 0 and pt.hits == 0 and pt.misses == 4


def test_token_id_prompts_bypass_the_tokenizer(tok: Tokenizer) -> None:
    pt = exact(tok)
    ids = list(range(100, 600))
    assert pt.ids_for_body({"prompt": ids}) == ids
    assert pt.hits == pt.misses == 0  # nothing to tokenise


# ---------------------------------------------------------------- chat
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_chat_bodies_match_encode_chat(tok: Tokenizer) -> None:
    rng = random.Random(3)
    pt = exact(tok)
    systems = [words(rng, 600, odd=0.05) for _ in range(3)]
    history: list[dict[str, Any]] = []
    for i in range(90):
        system = systems[i % 3]
        if i % 10 == 0:
            history = []
        history = [*history, {"role": "user", "content": words(rng, rng.randrange(1, 80))}]
        messages = [{"role": "system", "content": system}, *history]
        body: dict[str, Any] = {"messages": messages}
        kwargs: dict[str, Any] = {}
        tools = None
        if i % 3 == 1:
            body["tools"] = tools = TOOLS
        if i % 5 == 2:
            body["chat_template_kwargs"] = kwargs = {"enable_thinking": False}
        if i % 7 == 3:
            body["add_generation_prompt"] = False
        expected = tok.encode_chat(
            messages, body.get("add_generation_prompt", True), tools=tools, **kwargs
        )
        assert pt.ids_for_body(body) == expected, i
        history.append({"role": "assistant", "content": words(rng, rng.randrange(1, 40))})
    assert pt.hits > 50


def test_chat_content_parts_and_special_tokens_in_content(tok: Tokenizer) -> None:
    pt = exact(tok, chunk_chars=64)
    system = "You are terse. " * 40
    for tail in ["<|end|>\n<|user|>\nsneaky", "</s> and <s>", "plain"]:
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": [{"type": "text", "text": tail}]},
        ]
        assert pt.ids_for_body({"messages": messages}) == tok.encode_chat(messages)


def test_chat_template_kwargs_override_request_fields(tok: Tokenizer) -> None:
    pt = exact(tok)
    messages = [{"role": "user", "content": "hi there"}]
    body = {"messages": messages, "chat_template_kwargs": {"add_generation_prompt": False}}
    assert pt.ids_for_body(body) == tok.encode_chat(messages, add_generation_prompt=False)
    assert pt.ids_for_body(body) != tok.encode_chat(messages, add_generation_prompt=True)


def test_tools_are_passed_as_vllm_dumps_them(tok: Tokenizer) -> None:
    # vLLM renders `ChatCompletionToolsParam.model_dump()`: description/parameters
    # present (null when absent), in declaration order, extras after.
    pt = exact(tok)
    messages = [{"role": "user", "content": "weather?"}]
    sparse = [{"function": {"parameters": {"type": "object"}, "name": "f"}}]
    dumped = [
        {
            "type": "function",
            "function": {"name": "f", "description": None, "parameters": {"type": "object"}},
        }
    ]
    assert pt.ids_for_body({"messages": messages, "tools": sparse}) == tok.encode_chat(
        messages, tools=dumped
    )


def test_tool_call_arguments_are_parsed_like_vllm(tok: Tokenizer) -> None:
    pt = exact(tok)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    messages = [
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    parsed = {**call, "function": {"name": "f", "arguments": {"a": 1}}}
    expected = tok.encode_chat([messages[0], {**messages[1], "tool_calls": [parsed]}, messages[2]])
    assert pt.ids_for_body({"messages": messages}) == expected
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # not mutated


def test_continue_final_message(tok: Tokenizer) -> None:
    pt = exact(tok)
    messages = [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two,"},
    ]
    body = {"messages": messages, "continue_final_message": True, "add_generation_prompt": False}
    rendered = tok.render_chat(messages, add_generation_prompt=False)
    text = rendered[: rendered.rindex("One, two,") + len("One, two,")]
    assert pt.ids_for_body(body) == tok.encode(text, add_special_tokens=False)
    assert pt.ids_for_body({**body, "add_generation_prompt": True}) == []  # vLLM rejects it


def test_responses_route_renders_chat(tok: Tokenizer) -> None:
    pt = exact(tok)
    body = {"input": "What is a KV cache?", "instructions": "Answer briefly."}
    expected = tok.encode_chat(
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is a KV cache?"},
        ]
    )
    assert pt.ids_for_body(body, route="/v1/responses") == expected
    items = {
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "What is a KV"}]}]
    }
    assert pt.ids_for_body(items, route="/v1/responses") == tok.encode_chat(
        [{"role": "user", "content": "What is a KV"}]
    )
    assert pt.ids_for_body({**body, "previous_response_id": "r1"}, route="/v1/responses") == []
    # elsewhere (embeddings) `input` is a plain prompt
    assert pt.ids_for_body(body) == tok.encode("What is a KV cache?")


def test_as_request_context_tokenizer(tok: Tokenizer) -> None:
    pt = PromptTokenizer(tok)
    messages = [{"role": "system", "content": "Be brief. " * 100}, {"role": "user", "content": "q"}]
    ctx = RequestContext(model="m", body={"messages": messages}, _tokenize=pt)
    assert ctx.token_ids() == tok.encode_chat(messages)
    other = [*messages[:1], {"role": "user", "content": "r"}]
    ctx2 = RequestContext(model="m", body={"messages": other}, _tokenize=pt)
    assert ctx2.token_ids() == tok.encode_chat(other)
    assert (pt.misses, pt.hits) == (1, 1)


# ---------------------------------------------------------------- cache mechanics
def test_counters_and_reuse(tok: Tokenizer) -> None:
    pt = exact(tok, chunk_chars=64)
    system = words(random.Random(1), 300)
    first = system + " first question"
    assert pt.encode(first) == tok.encode(first)
    assert (pt.hits, pt.misses, pt.cached_tokens_reused) == (0, 1, 0)
    assert pt.cached_tokens == len(tok.encode(first)) - 1  # content ids, without the BOS

    second = system + " another question entirely"
    assert pt.encode(second) == tok.encode(second)
    assert (pt.hits, pt.misses) == (1, 1)
    # most of the system prompt came from the cache (all but under two chunks of it)
    reused = pt.cached_tokens_reused
    system_tokens = len(tok.encode(system, add_special_tokens=False))
    assert system_tokens - 40 < reused <= system_tokens

    assert pt.encode(first) == tok.encode(first)  # a cached prompt again: all reused
    assert (pt.hits, pt.misses) == (2, 1)
    assert pt.cached_tokens_reused - reused == len(tok.encode(first)) - 1


def test_conversations_extend_spliced_entries(tok: Tokenizer) -> None:
    # Turn n+1 starts with turn n, which was itself spliced: it must reuse turn n's ids.
    rng = random.Random(5)
    pt = exact(tok, chunk_chars=64)
    text = words(rng, 200)
    pt.encode(text)
    for _ in range(6):
        before = pt.cached_tokens_reused
        previous = len(tok.encode(text, add_special_tokens=False))
        text += " " + words(rng, 100)
        assert pt.encode(text) == tok.encode(text)
        # all of the previous turn but its last chunk or so (64 bytes + the margin)
        assert pt.cached_tokens_reused - before > previous - 40


def test_lru_bound_is_respected(tok: Tokenizer) -> None:
    rng = random.Random(11)
    pt = exact(tok, chunk_chars=32, max_cached_tokens=3000)
    for i in range(40):
        text = f"{i} " + words(rng, 300)
        assert pt.encode(text) == tok.encode(text)
        assert pt.cached_tokens <= 3000
    assert 0 < pt.entries < 40
    assert pt.cached_tokens == sum(len(e.ids) for e in pt._lru)
    # every indexed key belongs to a live entry
    live = set(map(id, pt._lru))
    assert all(id(e) in live for e in pt._index.values())
    # a prompt longer than the whole budget is encoded but not cached
    big = words(rng, 5000)
    entries = pt.entries
    assert pt.encode(big) == tok.encode(big)
    assert pt.entries == entries and pt.cached_tokens <= 3000


def test_evicted_entries_stop_matching(tok: Tokenizer) -> None:
    rng = random.Random(12)
    pt = exact(tok, chunk_chars=32, max_cached_tokens=1000)
    old = words(rng, 300)
    pt.encode(old)
    for _ in range(10):
        pt.encode(words(rng, 300))
    hits = pt.hits
    text = old + " more"
    assert pt.encode(text) == tok.encode(text)
    assert pt.hits == hits  # evicted: a miss, not a stale splice


def test_hash_collisions_are_caught(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    # A hash that collides all the time: the byte comparison must turn those into misses.
    monkeypatch.setattr(token_cache, "_hash", lambda b: len(b) % 3)
    monkeypatch.setattr(
        token_cache,
        "_prefix_keys",
        lambda raw, chunk, done, last: [i * chunk % 3 for i in range(done + 1, last + 1)],
    )
    rng = random.Random(13)
    pt = exact(tok, chunk_chars=32)
    for _ in range(60):
        text = words(rng, rng.randrange(20, 200))
        assert pt.encode(text) == tok.encode(text)


def test_added_token_running_past_the_shared_prefix(tok: Tokenizer) -> None:
    # "a b" is one added token. The cached prompt has "a c" where the new one has "a b",
    # and they agree only up to the space: cutting there would split the new prompt's
    # "a b". The margin keeps cuts far enough from the end of the shared bytes.
    tk = tokenizers.Tokenizer.from_str(tok.tokenizer.to_str())
    tk.add_tokens([AddedToken("a b", normalized=False)])
    pt = exact(Tokenizer(tk), chunk_chars=16)
    shared = "y" * 14 + "a "  # exactly one chunk
    for i, (old, new) in enumerate([("c", "b"), ("c tail", "b tail"), ("cc more", "b more")]):
        first, second = f"{i}{shared}{old} words", f"{i}{shared}{new} words"
        assert pt.encode(first[1:]) == tk.encode(first[1:]).ids
        assert pt.encode(second[1:]) == tk.encode(second[1:]).ids


def test_rstrip_added_token_before_a_space(tok: Tokenizer) -> None:
    # An rstrip added token swallows the space after it: a cut at that space is not a
    # token boundary in the cached prompt's encoding, so it must not be used.
    tk = tokenizers.Tokenizer.from_str(tok.tokenizer.to_str())
    tk.add_special_tokens([AddedToken("<|sep|>", rstrip=True, special=True)])
    sticky = Tokenizer(tk)
    pt = exact(sticky, chunk_chars=16)
    rng = random.Random(17)
    for _ in range(80):
        text = " ".join(rng.choice(["<|sep|>", "<|sep|>  ", "word", "x"]) for _ in range(60))
        text2 = text + " tail " + words(rng, 5)
        assert pt.encode(text) == tk.encode(text).ids
        assert pt.encode(text2) == tk.encode(text2).ids


# ---------------------------------------------------------------- other tokenizers
_rng = random.Random(0)
_CORPUS = [words(_rng, _rng.randrange(5, 30), odd=0.05) for _ in range(300)]
_SPECIALS = ["<s>", "</s>", "<|user|>", "<|end|>", "[CLS]", "[SEP]", "[UNK]"]
_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _sentencepiece_bpe() -> tokenizers.Tokenizer:
    """Llama-2 style: "▁" prepended and spaces replaced, no pre-tokenizer, so BPE merges
    run across spaces and a space cut changes the tokens."""
    tk = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = [*_SPECIALS, "<|system|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    tk.train_from_iterator(_CORPUS, trainer)
    return tk


def _unigram() -> tokenizers.Tokenizer:
    tk = tokenizers.Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=_SPECIALS, unk_token="[UNK]", show_progress=False
    )
    tk.train_from_iterator(_CORPUS, trainer)
    return tk


def _wordpiece() -> tokenizers.Tokenizer:
    tk = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=_SPECIALS, show_progress=False
    )
    tk.train_from_iterator(_CORPUS, trainer)
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tk


def _shared_prefix_texts(seed: int, n: int = 60) -> list[str]:
    rng = random.Random(seed)
    systems = [" ".join(_CORPUS[i * 20 : i * 20 + 20]) for i in range(3)]
    return [rng.choice(systems) + " " + words(rng, rng.randrange(3, 40)) for _ in range(n)]


def test_self_check_disables_space_cuts_where_they_are_wrong() -> None:
    tk = _sentencepiece_bpe()
    tok = Tokenizer(tk, chat_template=_TEMPLATE, bos_token="<s>")
    texts = _shared_prefix_texts(1)

    # Unchecked, space splices really are wrong for this tokenizer...
    blind = exact(tok, chunk_chars=64)
    wrong = sum(blind.encode(t, False) != tk.encode(t, add_special_tokens=False).ids for t in texts)
    assert wrong > len(texts) // 2

    # ... and the self-check catches the first one and turns space cuts off.
    pt = PromptTokenizer(tok, chunk_chars=64)
    for t in texts:
        assert pt.encode(t, False) == tk.encode(t, add_special_tokens=False).ids
    assert pt.verify_failures == 1
    assert pt.splicing == {"space": False, "special": True}

    # Cuts before special tokens stay exact: chat prompts still splice at message starts.
    rng = random.Random(2)
    system = " ".join(_CORPUS[:30])
    hits = pt.hits
    for _ in range(20):
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": words(rng, rng.randrange(3, 30))},
        ]
        assert pt.ids_for_body({"messages": messages}) == tok.encode_chat(messages)
    assert pt.hits - hits >= 18
    assert pt.verify_failures == 1


@pytest.mark.parametrize("build", [_unigram, _wordpiece], ids=["metaspace-unigram", "wordpiece"])
def test_other_tokenizers_splice_exactly(build: Any) -> None:
    # Metaspace/Unigram and BERT WordPiece pre-tokenize at spaces, so space cuts are
    # exact for them too (the WordPiece post-processor also wraps [CLS] ... [SEP]).
    tk = build()
    pt = exact(Tokenizer(tk), chunk_chars=64)
    for t in _shared_prefix_texts(3):
        for special in (False, True):
            assert pt.encode(t, special) == tk.encode(t, add_special_tokens=special).ids
    assert pt.hits > 60
    checked = PromptTokenizer(Tokenizer(tk), chunk_chars=64)
    for t in _shared_prefix_texts(4):
        assert checked.encode(t) == tk.encode(t).ids
    assert checked.verify_failures == 0 and checked.verifications > 0


def test_truncating_tokenizer_is_never_spliced(tok: Tokenizer) -> None:
    tk = tokenizers.Tokenizer.from_str(tok.tokenizer.to_str())
    tk.enable_truncation(50)
    pt = PromptTokenizer(Tokenizer(tk), chunk_chars=32)
    text = words(random.Random(1), 300)
    for suffix in ["", " a", " b"]:
        assert pt.encode(text + suffix) == tk.encode(text + suffix).ids
    assert pt.hits == 0 and pt.entries == 0
    assert pt.splicing == {"space": False, "special": False}


def test_verification_schedule(tok: Tokenizer) -> None:
    pt = PromptTokenizer(tok, chunk_chars=64, verify_first=3, verify_every=4)
    system = words(random.Random(2), 300)
    pt.encode(system + " q0")
    for i in range(1, 14):
        pt.encode(system + f" question {i}")
    # 13 splices: the first 3, then every 4th (the 4th, 8th and 12th)
    assert pt.verifications == 6
    assert pt.verify_failures == 0 and pt.hits == 13


def test_concurrent_callers_get_exact_ids(tok: Tokenizer) -> None:
    # The proxy may tokenise on executor threads: the cache must stay consistent.
    rng = random.Random(21)
    systems = [words(rng, 400) for _ in range(3)]
    texts = [rng.choice(systems) + " " + words(rng, rng.randrange(1, 60)) for _ in range(120)]
    pt = exact(tok, chunk_chars=64, max_cached_tokens=20_000)
    results: dict[int, list[int]] = {}

    def work(start: int) -> None:
        for i in range(start, len(texts), 4):
            results[i] = pt.encode(texts[i])

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == tok.encode(t) for i, t in enumerate(texts))
    assert pt.hits > 0
    assert pt.cached_tokens == sum(len(e.ids) for e in pt._lru) <= 20_000


def test_returned_ids_are_fresh_copies(tok: Tokenizer) -> None:
    # Callers own what they get: changing it, or asking again (with or without the
    # BOS, as a list or an array), must never alter what the cache holds.
    system = words(random.Random(22), 300)
    pt = exact(tok, chunk_chars=64)
    texts = [system + " one", system + " two", system + " one"]
    for _ in range(3):
        for text in texts:
            for special in (True, False):
                expected = tok.encode(text, add_special_tokens=special)
                got = pt.encode(text, special)
                assert got == expected
                got[:5] = [1, 1, 1, 1, 1]
                arr = pt.encode_array(text, special)
                assert arr.tolist() == expected
                arr[:5] = array("I", [2, 2, 2, 2, 2])
    assert pt.hits > 20
