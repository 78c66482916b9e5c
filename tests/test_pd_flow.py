"""Flow control for P/D split requests, live: a split request waits as one, is dispatched
as a pair (a prefill backend and a decode backend that can both take it, both slots
counted), is shed as one (one 429), and is never sent half. Simulated P/D servers on
127.0.0.1 behind capture fronts (tests/test_pd_routing.py), one of them gated."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import web

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
