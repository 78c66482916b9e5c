"""Tokenisation off the event loop: precise-prefix token ids are computed before routing,
cache hits inline and misses in a worker thread, so a cold long prompt does not stall
the streams the proxy is relaying."""

from __future__ import annotations

import random
import threading
import time
from array import array
from typing import Any

import aiohttp

from lbproxy.proxy import prompt_ids
from lbproxy.proxy.app import RunningProxy
from lbproxy.tokenization.token_cache import INLINE_FRESH_BYTES, PromptTokenizer
from lbproxy.tokenization.tokenizer import Tokenizer, default_tokenizer
from tests.conftest import proxy_config
from tests.fake_backend import FakeBackend
from tests.stream_gaps import gaps_around

SYLLABLES = ["an", "ro", "zir", "lo", "wex", "kest", "fos", "ul", "jin", "mon", "ny", "qua"]


def cold_text(rng: random.Random, words: int) -> str:
    """Text the proxy has never seen: random made-up words (~4 tokens each)."""
    return " ".join(
        "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) + str(rng.randint(0, 99))
        for _ in range(words)
    )


def inline_cost(text: str) -> float:
    """What the old code paid on the event loop for this prompt: a cold encode with its
    cache bookkeeping (best of 3, on a fresh cache each time)."""
    best = float("inf")
    for _ in range(3):
        pt = PromptTokenizer(default_tokenizer())
        t0 = time.perf_counter()
        pt.encode(text, add_special_tokens=True)
        best = min(best, time.perf_counter() - t0)
    return best


def precise_config(backends: list[FakeBackend], **kw: Any) -> dict[str, Any]:
    cfg = proxy_config(backends, routing=kw.pop("routing", "precise-cache-aware"))
    cfg["pools"][0]["tokenizer"] = "default"
    cfg.update(kw)
    return cfg


async def _stream_gaps_around_cold_prompt(url: str, prompt: str) -> tuple[float, float, int]:
    """The stream's largest gap while a cold prompt is handled, the gap before, its status."""

    async def cold(s: aiohttp.ClientSession) -> int:
        body = {"model": "fake-model", "prompt": prompt, "max_tokens": 1}
        async with s.post(url + "/v1/completions", json=body) as r:
            await r.read()
            return r.status

    return await gaps_around(url, cold)


def test_cold_long_prompt_does_not_stall_concurrent_streams(
    loop_thread, fake_backends, run_proxy
) -> None:
    rng = random.Random(20261206)
    words = 6000
    text = cold_text(rng, words)
    cost = inline_cost(text)
    while cost < 0.06 and words < 200_000:  # >= 60 ms of tokenisation, whatever the machine
        words *= 2
        text = cold_text(rng, words)
        cost = inline_cost(text)
    assert cost >= 0.03, cost
    backends = fake_backends(1, chunk_delay=0.004)
    proxy: RunningProxy = run_proxy(precise_config(backends))
    tokenizer = proxy.state.pools.pools[0].tokenize
    assert tokenizer is not None
    gap, before, status = loop_thread.run(_stream_gaps_around_cold_prompt(proxy.url, text))
    print(
        f"tokenisation {cost * 1e3:.1f} ms, largest gap {gap * 1e3:.1f} ms"
        f" (before: {before * 1e3:.1f} ms)"
    )
    assert status == 200
    # The old code tokenised on the event loop: one gap of about `cost`.
    assert gap < cost / 2, (gap, cost, before)
    # ... and routing still got the prompt's ids (a full encode for the miss, cached).
    assert tokenizer.misses >= 1
    assert tokenizer.cached_tokens > 0


def test_hits_inline_misses_in_a_thread() -> None:
    pt = PromptTokenizer(default_tokenizer(), verify_first=0, verify_every=0)
    rng = random.Random(7)
    system = cold_text(rng, 2000)
    body = {"prompt": system + " first question"}
    # cold and long: handed out for a thread, unencoded
    todo = pt.array_or_prompt(body)
    assert todo == (body["prompt"], True)
    assert pt.misses == 0
    ids = pt.encode_off_loop(*todo)
    assert ids.tolist() == default_tokenizer().encode(body["prompt"])
    # the same prompt, then a new question after the cached system prompt: inline
    again = pt.array_or_prompt(body)
    assert isinstance(again, array) and again == ids
    other = {"prompt": system + " another question, a little longer"}
    spliced = pt.array_or_prompt(other)
    assert isinstance(spliced, array)
    assert spliced.tolist() == default_tokenizer().encode(other["prompt"])
    # a short cold prompt is cheap enough to encode inline
    short = {"prompt": cold_text(rng, 50)}
    assert len(short["prompt"]) < INLINE_FRESH_BYTES
    assert isinstance(pt.array_or_prompt(short), array)
    # a long fresh tail after a cached prefix goes to the thread
    tail = {"prompt": system + " " + cold_text(rng, 2000)}
    assert isinstance(pt.array_or_prompt(tail), tuple)
    # token-id prompts and shapes we do not handle cost nothing
    assert pt.array_or_prompt({"prompt": [1, 2, 3]}) == array("I", [1, 2, 3])
    assert pt.array_or_prompt({"nothing": 1}) == array("I")


def test_a_due_verification_goes_to_the_thread() -> None:
    """The self-check's full encode must not run on the loop either."""
    pt = PromptTokenizer(default_tokenizer(), verify_first=1, verify_every=0)
    system = cold_text(random.Random(3), 2000)
    pt.encode_off_loop(system + " one", True)
    first = {"prompt": system + " two"}
    assert isinstance(pt.array_or_prompt(first), tuple)  # the first splice is checked
    pt.encode_off_loop(system + " two", True)
    assert pt.verifications == 1
    assert isinstance(pt.array_or_prompt({"prompt": system + " three"}), array)
    assert pt.verifications == 1


def test_cache_is_exact_under_concurrent_threads_and_loop_hits() -> None:
    """Misses computed in worker threads while the caller serves hits from the same cache
    give the ids a plain encode gives."""
    tok = default_tokenizer()
    pt = PromptTokenizer(tok, chunk_chars=64, max_cached_tokens=40_000)
    rng = random.Random(11)
    systems = [cold_text(rng, 800) for _ in range(6)]
    prompts = [s + " " + cold_text(rng, rng.randint(1, 60)) for s in systems for _ in range(8)]
    rng.shuffle(prompts)
    wrong: list[str] = []
    errors: list[BaseException] = []

    def worker(mine: list[str]) -> None:
        try:
            for p in mine:
                if pt.encode_off_loop(p, True).tolist() != tok.encode(p):
                    wrong.append(p)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(prompts[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for p in prompts:  # the "loop": inline where cheap, else encode here too
        out = pt.array_or_prompt({"prompt": p})
        ids = out if isinstance(out, array) else pt.encode_off_loop(*out)
        if ids.tolist() != tok.encode(p):
            wrong.append(p)
    for t in threads:
        t.join(30)
    assert not errors and not wrong
    assert pt.hits > 0 and pt.misses > 0
    assert pt.verify_failures == 0


def test_pools_without_precise_prefix_pay_nothing(fake_backends, run_proxy) -> None:
    backends = fake_backends(1)
    proxy = run_proxy(precise_config(backends, routing="cache-aware"))
    pool = proxy.state.pools.pools[0]
    assert pool.tokenize is not None  # a tokenizer is configured ...
    assert pool.routing_tokenizer is None  # ... but no scorer reads token ids
    assert prompt_ids.TOKENIZE_THREADS <= 2


def test_chat_template_is_compiled_with_the_pool_not_on_the_first_request() -> None:
    """Compiling a chat template takes ~10 ms: at build time, not on the event loop."""
    tok = Tokenizer.from_file()  # a fresh one: default_tokenizer() is shared
    assert tok._compiled is None
    PromptTokenizer(tok)
    assert tok._compiled is not None
    # an invalid template still fails per request (no ids), not at build time
    bad = Tokenizer(tok.tokenizer, chat_template="{% if %}")
    pt = PromptTokenizer(bad)
    assert pt.array_or_prompt({"messages": [{"role": "user", "content": "hi"}]}) == array("I")
