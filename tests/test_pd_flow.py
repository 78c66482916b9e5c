"""Flow control for P/D split requests, live: a split request waits as one, is dispatched
as a pair (a prefill backend and a decode backend that can both take it, both slots
counted), is shed as one (one 429), and is never sent half. Simulated P/D servers on
127.0.0.1 behind capture fronts (tests/test_pd_routing.py), one of them gated."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from tests.leaving_clients import send_as
from tests.test_pd_routing import LONG, MODEL, Capture, metric, metrics_text, pd_config
from tests.test_pd_routing import sims as sims


class Gated(Capture):
    """A front that holds every POST until `open()` (a backend busy with it)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.event: asyncio.Event | None = None

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            if self.event is None:
                self.event = asyncio.Event()
            await self.event.wait()
        return await super()._answer(request)

    def open(self) -> None:
        if self.event is None:
            self.event = asyncio.Event()
        self.event.set()


def _flow_config(urls: list[tuple[str, str]], **flow: Any) -> dict[str, Any]:
    cfg = pd_config(urls)
    cfg["flow_control"] = {"max_in_flight": 1, **flow}
    return cfg


async def _post(url: str, prompt: str, timeout: float = 20) -> tuple[int, dict[str, Any]]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body,
                      timeout=aiohttp.ClientTimeout(total=timeout)) as r:  # fmt: skip
        return r.status, await r.json()


def _wait_for(cond: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_split_waits_until_its_decode_side_has_room(sims, run_proxy, loop_thread) -> None:
    """The decode backend is full (an aggregated request holds its one slot): a split
    request whose prefill backend is idle waits, prefill unsent; when the decode side
    frees, it goes as a pair and both slots are given back at its end."""
    pre, dec = sims("producer"), sims("consumer")
    gate = loop_thread.run(Gated(dec.url).start())
    try:
        proxy = run_proxy(_flow_config([(pre.url, "prefill"), (gate.url, "decode")]))
        p_ep, d_ep = proxy.state.pools.pools[0].endpoints
        run = loop_thread.loop
        short = asyncio.run_coroutine_threadsafe(_post(proxy.url, "hi"), run)
        _wait_for(lambda: len(gate.posts) == 1 or d_ep.in_flight == 1, "no aggregated request")
        split = asyncio.run_coroutine_threadsafe(_post(proxy.url, LONG), run)
        time.sleep(0.5)
        assert pre.posts == []  # not half-dispatched: the prefill waits for a decode slot
        assert (p_ep.in_flight, d_ep.in_flight) == (0, 1)
        assert proxy.state.pools.pools[0].gate.controller.queue.size == 1
        loop_thread.loop.call_soon_threadsafe(gate.open)
        assert short.result(10)[0] == 200
        status, answer = split.result(10)
        assert status == 200 and answer["usage"]["completion_tokens"] == 3
        assert len(pre.posts) == 1 and len(dec.posts) == 2  # prefill, then the decode
        assert "kv_transfer_params" in dec.posts[1]["body"].decode()
        _wait_for(lambda: (p_ep.in_flight, d_ep.in_flight) == (0, 0), "slots not given back")
    finally:
        loop_thread.run(gate.close())


def test_a_held_pair_counts_both_slots_and_is_shed_as_one(sims, run_proxy, loop_thread) -> None:
    """While one split request runs its prefill, it holds the decode slot too; a second
    split request finds no pair, waits max_wait, and gets one 429, sent nowhere."""
    slow = sims("producer", mode="hang")
    dec = sims("consumer")
    proxy = run_proxy(_flow_config([(slow.url, "prefill"), (dec.url, "decode")], max_wait=1.0))
    p_ep, d_ep = proxy.state.pools.pools[0].endpoints
    run = loop_thread.loop
    first = asyncio.run_coroutine_threadsafe(_post(proxy.url, LONG, timeout=30), run)
    _wait_for(lambda: len(slow.posts) == 1, "no prefill request")
    assert (p_ep.in_flight, d_ep.in_flight) == (1, 1)  # both slots counted at dispatch
    t0 = time.monotonic()
    status, answer = asyncio.run_coroutine_threadsafe(_post(proxy.url, LONG + "x"), run).result(10)
    assert status == 429 and answer["error"]["code"] == "queue_timeout"
    assert time.monotonic() - t0 < 5.0
    assert len(slow.posts) == 1 and dec.posts == []  # the shed one was sent nowhere
    text = metrics_text(proxy)
    assert metric(text, "lbproxy_flow_shed_total", reason="max_wait") == 1
    first.cancel()
    _wait_for(lambda: (p_ep.in_flight, d_ep.in_flight) == (0, 0), "slots not given back")


class Switch(Gated):
    """A Gated front that can be opened (POSTs pass) before any POST came."""

    def open_now(self) -> None:
        self.event = asyncio.Event()
        self.event.set()


def _affinity_config(urls: list[tuple[str, str]], affinity_wait: float) -> dict[str, Any]:
    cfg = pd_config(
        urls,
        min_prompt_tokens=1,
        prefill_routing={"scorers": [{"type": "prefix-hash", "weight": 3}],
                         "picker": "max-score"},
    )  # fmt: skip
    # One prefill leg fills a prefill backend (its rate unknown: `limit.initial` legs).
    cfg["flow_control"] = {"max_wait": 10.0, "affinity_wait": affinity_wait,
                           "limit": {"initial": 1, "min": 1}}  # fmt: skip
    return cfg


def _cached_busy_pair(sims, run_proxy, loop_thread, affinity_wait: float):  # type: ignore[no-untyped-def]
    """Two gated prefill backends, two decode backends. A first split request's prefill
    is held on one prefill backend (`cached`: it now has the prompt's prefix, and no
    room; a gated front records a POST once it lets it through); the other (`cold`) is
    opened. Returns (proxy, cached, cold, first future, both fronts)."""
    fronts = [loop_thread.run(Switch(sims("producer").url).start()) for _ in range(2)]
    decs = [sims("consumer"), sims("consumer")]
    cfg = _affinity_config([(fronts[0].url, "prefill"), (fronts[1].url, "prefill"),
                            (decs[0].url, "decode"), (decs[1].url, "decode")],
                           affinity_wait)  # fmt: skip
    proxy = run_proxy(cfg)
    eps = proxy.state.pools.pools[0].endpoints[:2]
    first = asyncio.run_coroutine_threadsafe(_post(proxy.url, LONG), loop_thread.loop)
    _wait_for(lambda: any(ep.in_flight for ep in eps), "no prefill request")
    cached, cold = fronts if eps[0].in_flight else fronts[::-1]
    loop_thread.loop.call_soon_threadsafe(cold.open_now)
    return proxy, cached, cold, first, fronts


def test_a_pair_waits_briefly_for_its_cached_prefill_backend(sims, run_proxy, loop_thread) -> None:
    """A second request with the same prefix prefers the prefill backend that holds it,
    which is busy: it waits (affinity_wait 5 s) although the cold one has room, and goes
    to the cached one when it frees."""
    proxy, cached, cold, first, fronts = _cached_busy_pair(sims, run_proxy, loop_thread, 5.0)
    try:
        second = asyncio.run_coroutine_threadsafe(
            _post(proxy.url, LONG + "And one more question."), loop_thread.loop
        )
        time.sleep(0.6)
        assert cold.posts == [] and cached.posts == []  # waiting for its backend
        pool = proxy.state.pools.pools[0]
        assert pool.gate.controller.queue.size == 1
        cached_ep = pool.endpoints[0 if cached is fronts[0] else 1]
        shown = pool.gate.backend_json(cached_ep)  # what /admin/backends shows
        assert shown["prefill_legs"] == 1 and shown["prefill_rate_tokens_s"] is None
        loop_thread.loop.call_soon_threadsafe(cached.open)
        assert first.result(10)[0] == 200
        assert second.result(10)[0] == 200
        assert len(cached.posts) == 2 and cold.posts == []  # both prefills where cached
    finally:
        for f in fronts:
            loop_thread.run(f.close())


def test_a_pair_goes_cold_once_its_affinity_wait_is_over(sims, run_proxy, loop_thread) -> None:
    """The cached prefill backend stays busy: after affinity_wait (0.5 s) the pair takes
    the cold one, well within max_wait."""
    proxy, cached, cold, first, fronts = _cached_busy_pair(sims, run_proxy, loop_thread, 0.5)
    try:
        t0 = time.monotonic()
        status, _ = asyncio.run_coroutine_threadsafe(
            _post(proxy.url, LONG + "And one more question."), loop_thread.loop
        ).result(10)
        assert status == 200 and len(cold.posts) == 1 and cached.posts == []
        assert time.monotonic() - t0 >= 0.4  # it waited for the cached one first
        loop_thread.loop.call_soon_threadsafe(cached.open)
        assert first.result(10)[0] == 200
    finally:
        for f in fronts:
            loop_thread.run(f.close())


def test_every_leg_is_released_after_failovers_and_fallbacks(sims, run_proxy) -> None:
    """A prefill fails over to the other prefill backend (a leg flow control did not
    dispatch), then every prefill fails and the request is served aggregated: afterwards
    no backend counts a request, a prefill leg, prefill tokens or a reserved decode slot."""
    bad, good, dec = sims("producer", mode="fail"), sims("producer"), sims("consumer")
    proxy = run_proxy(pd_config([(bad.url, "prefill"), (good.url, "prefill"),
                                 (dec.url, "decode")]))  # fmt: skip
    pool = proxy.state.pools.pools[0]
    for prompt in (LONG, LONG + "again"):
        status, answer = asyncio.run(_post(proxy.url, prompt))
        assert status == 200 and answer["usage"]["completion_tokens"] == 3
        good.mode = "fail"  # the second one: every prefill fails, served aggregated
    assert len(bad.posts) == 2 and len(good.posts) == 2 and len(dec.posts) == 2
    ctl = pool.gate.controller

    def settled() -> bool:
        loads = [(ld.legs, ld.tokens, ld.reserved) for ld in ctl.pd_loads.values()]
        return all(ep.in_flight == 0 for ep in pool.endpoints) and set(loads) == {(0, 0, 0)}

    _wait_for(settled, "a leg or a slot was not given back")
    assert {ep.name for ep in ctl.pd_loads} >= {"prefill0", "prefill1", "decode2"}


def test_a_mixed_storm_on_a_pd_pool_gives_every_slot_and_leg_back(
    sims, run_proxy, loop_thread
) -> None:
    """Split and aggregated requests in bursts against one slot per backend, clients
    leaving while queued and mid-stream, a prefill backend failing for a while (its legs
    failed over, then served aggregated): afterwards nothing waits, and no backend counts
    a request, a prefill leg, prefill tokens or a reserved decode slot."""
    speed = 10.0  # slow enough that requests wait for a slot and clients leave meanwhile
    flaky, steady = sims("producer", speed=speed), sims("producer", speed=speed)
    dec = sims("consumer", speed=speed)
    cfg = _flow_config(
        [(flaky.url, "prefill"), (steady.url, "prefill"), (dec.url, "decode")],
        max_queue=8, max_wait=1.5,
    )  # fmt: skip
    proxy = run_proxy(cfg)
    pool = proxy.state.pools.pools[0]
    rng = random.Random(3)
    seen: Counter[str] = Counter()
    wrong: list[str] = []

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        kind = rng.choice(["plain", "stream", "leave_queued", "leave_mid"])
        prompt = (LONG if rng.random() < 0.7 else "short ") + f"#{i}"  # most are split
        stream = kind != "plain"
        body = {"model": MODEL, "prompt": prompt, "max_tokens": rng.randint(5, 40),
                "stream": stream}  # fmt: skip
        post = s.post(proxy.url + "/v1/completions", json=body)
        answer = await send_as(post, kind, seen, rng.uniform(0.01, 0.2))
        if answer is None:
            return
        status, headers, text = answer
        seen[f"{status}"] += 1
        if status not in (200, 429):
            wrong.append(f"{kind}: status {status}: {text[:200]!r}")
        elif status == 429 and "Retry-After" not in headers:
            wrong.append(f"{kind}: 429 without Retry-After")
        elif status == 200 and stream and not text.rstrip().endswith(b"data: [DONE]"):
            wrong.append(f"{kind}: a stream cut short: {text[-200:]!r}")

    async def go() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            tasks = []
            for burst in range(6):
                flaky.mode = "fail" if burst in (2, 3) else "pass"
                tasks += [asyncio.create_task(one(s, burst * 16 + k)) for k in range(16)]
                await asyncio.sleep(0.3)
            await asyncio.gather(*tasks)

    loop_thread.run(go(), timeout=90)
    ctl = pool.gate.controller

    def settled() -> bool:
        loads = [(ld.legs, ld.tokens, ld.reserved) for ld in ctl.pd_loads.values()]
        idle = all(ep.in_flight == 0 for ep in pool.endpoints) and set(loads) <= {(0, 0, 0)}
        return idle and ctl.queue.size == 0

    _wait_for(settled, f"a slot, a leg or a queue place was not given back: {seen}")
    assert wrong == []
    # The storm did what it was for: pairs waited and some were shed, prefills failed,
    # clients left while queued and mid-stream, and requests were served.
    assert seen["429"] > 0 and seen["200"] > 0, seen
    assert seen["leave_queued left"] > 0 and seen["leave_mid left"] > 0, seen
    assert any(p["path"].endswith("/completions") for p in flaky.posts)
