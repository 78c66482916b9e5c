"""The prefill side ranks by prefill load: `Endpoint.prefill_tokens` (the uncached prompt
tokens of the P/D prefill legs a backend runs, and of the aggregated requests a `role:
both` backend runs until their first byte), kept by the live proxy and the simulator, and
the `prefill-load` scorer in the `pd-prefill` profile."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from lbproxy.bench.simulate import FleetSimulator
from lbproxy.bench.stats import poisson_arrivals
from lbproxy.config import FlowControl
from lbproxy.routing.disagg import DisaggRouter
from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.pipeline import Router
from lbproxy.routing.plugins.prefill_load import PrefillLoadScorer
from lbproxy.routing.profiles import ProfileSpec, build_router
from lbproxy.routing.state import Endpoint, RequestContext
from lbproxy.sim.fleet import parse_fleet
from tests.test_pd_flow import Gated, _post, _wait_for
from tests.test_pd_routing import LONG, MODEL, pd_config
from tests.test_pd_routing import sims as sims
from tests.test_sim_pd_simulate import TOK, _fleet, _workload

PROMPT_TOKENS = len(LONG) // 4  # the proxy's estimate without a tokenizer: 4 bytes a token

# ---------------------------------------------------------------------------- scorer


def _prefill_eps(tokens: list[int], in_flight: int = 0) -> list[Endpoint]:
    eps = []
    for i, t in enumerate(tokens):
        ep = Endpoint(f"p{i}", f"http://p{i}", role="prefill", in_flight=in_flight)
        ep.prefill_tokens = t
        eps.append(ep)
    return eps


def test_two_cold_long_prefills_rank_below_ten_short_cached_ones() -> None:
    """Two 8 K-token cold prefills queued on one backend, ten prefills of 300 uncached
    tokens on the other: the second has more requests and less work, and scores higher
    under both scales; equal work scores equal."""
    ctx = RequestContext(model=MODEL, body={"prompt": "x" * 4 * 8000})  # 8,000 tokens
    cold, warm = _prefill_eps([2 * 8000, 10 * 300])
    cold.in_flight, warm.in_flight = 2, 10
    for scale in ("prompt", "span"):
        s_cold, s_warm = PrefillLoadScorer(scale).score(ctx, [cold, warm], 0.0)
        assert s_warm == 1.0 and s_cold < 0.5, (scale, s_cold, s_warm)
    assert PrefillLoadScorer("prompt").score(ctx, _prefill_eps([500, 500]), 0.0) == [1.0, 1.0]
    # By prompt: 4,000 tokens ahead is half of this request's 8,000; by span it is all.
    assert PrefillLoadScorer("prompt").score(ctx, _prefill_eps([0, 4000]), 0.0) == [1.0, 0.5]
    assert PrefillLoadScorer("span").score(ctx, _prefill_eps([0, 4000]), 0.0) == [1.0, 0.0]


def test_the_scorer_is_registered_and_its_scale_checked() -> None:
    bctx = BuildContext(pool="g", model=MODEL)
    spec = ProfileSpec.model_validate({"scorers": [{"type": "prefill-load", "scale": "span"}]})
    router = build_router(spec, bctx, seed=0)
    assert isinstance(router.scorers[0].scorer, PrefillLoadScorer)
    bad = ProfileSpec.model_validate({"scorers": [{"type": "prefill-load", "scale": "tokens"}]})
    with pytest.raises(ValueError, match=r"prefill-load.*scale"):
        build_router(bad, bctx, seed=0)


# ---------------------------------------------------------------------------- profile


def _pd_prefill() -> Router:
    return build_router("pd-prefill", BuildContext(pool="g", model=MODEL), seed=0)


def test_pd_prefill_prefers_the_less_loaded_backend_when_none_caches_the_prompt() -> None:
    """Same request counts, no metrics, nothing cached: the backend with less prefill
    work wins, whichever order the candidates come in."""
    for order in (0, 1):
        router = _pd_prefill()
        busy, idle = _prefill_eps([2 * PROMPT_TOKENS, PROMPT_TOKENS // 4], in_flight=2)
        eps = [busy, idle] if order == 0 else [idle, busy]
        d = router.rank(RequestContext(model=MODEL, body={"prompt": LONG}), eps, 0.0)
        assert d is not None and d.endpoint is idle, d.scores if d else None


def test_pd_prefill_keeps_the_cached_backend_when_the_load_difference_is_small() -> None:
    """The backend holding the prompt runs a quarter of a prompt more prefill work than
    the other: the prefix saves more than that, so it keeps the request."""
    router = _pd_prefill()
    holder, other = _prefill_eps([0, 0], in_flight=1)
    router.commit(RequestContext(model=MODEL, body={"prompt": LONG}), holder, 0.0)
    holder.prefill_tokens = PROMPT_TOKENS // 4
    for eps in ([other, holder], [holder, other]):
        d = router.rank(RequestContext(model=MODEL, body={"prompt": LONG}), eps, 1.0)
        assert d is not None and d.endpoint is holder, d.scores


# ---------------------------------------------------------------------------- live proxy


@pytest.mark.parametrize("flow", [False, True], ids=["flow-off", "flow-on"])
def test_the_proxy_counts_a_prefill_legs_uncached_tokens_while_it_runs(
    sims, run_proxy, loop_thread, flow: bool
) -> None:
    """While a slow prefill backend holds a split request's prefill, that backend's
    prefill_tokens is the request's uncached prompt tokens: all of a cold prompt, part of
    one whose prefix it holds; after N split requests it is back to 0."""
    pre, dec = sims("producer"), sims("consumer")
    gate = loop_thread.run(Gated(pre.url).start())
    run = loop_thread.loop

    def held(prompt: str) -> tuple[Any, int]:
        """Send `prompt`, wait until its prefill is held; (its future, the count then)."""
        gate.event = None  # the next POST waits for open()
        fut = asyncio.run_coroutine_threadsafe(_post(proxy.url, prompt), run)
        _wait_for(lambda: gate.event is not None, "no prefill request")
        time.sleep(0.2)
        assert d_ep.prefill_tokens == 0
        n = p_ep.prefill_tokens
        run.call_soon_threadsafe(gate.open)
        assert fut.result(10)[0] == 200
        _wait_for(lambda: p_ep.prefill_tokens == 0, "prefill tokens not given back")
        return fut, n

    try:
        cfg = pd_config([(gate.url, "prefill"), (dec.url, "decode")],
                        prefill_routing="pd-prefill", min_prompt_tokens=1)  # fmt: skip
        if flow:
            cfg["flow_control"] = {"max_in_flight": 8}
        proxy = run_proxy(cfg)
        p_ep, d_ep = proxy.state.pools.pools[0].endpoints
        assert held(LONG)[1] == PROMPT_TOKENS  # cold: the whole prompt
        warm = LONG + " and a question of its own." * 20
        n = held(warm)[1]
        # LONG is cached, to within 1/8 of it (prefix-hash's growing blocks)
        assert 0 < n <= len(warm) // 4 - PROMPT_TOKENS * 7 // 8
        prompts = [f"request {i}: " + LONG for i in range(3)]
        futures = [asyncio.run_coroutine_threadsafe(_post(proxy.url, p), run) for p in prompts]
        assert [f.result(20)[0] for f in futures] == [200] * len(prompts)
        assert len(gate.posts) == 2 + len(prompts)  # every one was split
        _wait_for(lambda: p_ep.prefill_tokens == 0 == d_ep.prefill_tokens, "tokens left")
    finally:
        loop_thread.run(gate.close())


def test_the_proxy_gives_back_a_failed_prefills_tokens(sims, run_proxy) -> None:
    """A prefill fails over to the second prefill backend, then every prefill fails and
    the request is served aggregated: no backend counts prefill tokens afterwards."""
    bad, good, dec = sims("producer", mode="fail"), sims("producer"), sims("consumer")
    proxy = run_proxy(pd_config([(bad.url, "prefill"), (good.url, "prefill"),
                                 (dec.url, "decode")]))  # fmt: skip
    pool = proxy.state.pools.pools[0]
    for prompt in (LONG, LONG + "again"):
        assert asyncio.run(_post(proxy.url, prompt))[0] == 200
        good.mode = "fail"
    assert len(bad.posts) == 2 and len(good.posts) == 2
    _wait_for(lambda: all(ep.prefill_tokens == 0 for ep in pool.endpoints), "tokens left")


def _all_aggregated(backends: list[tuple[str, str]], **extra: Any) -> dict[str, Any]:
    """A P/D pool whose threshold keeps every request aggregated (a short prompt)."""
    cfg = pd_config(backends, min_prompt_tokens=10**6)
    cfg.update(extra)
    return cfg


def _held(proxy: Any, gate: Gated, run: Any, prompt: str = LONG, timeout: float = 20) -> Any:
    """Send `prompt` through the proxy and wait until `gate` holds it (its first byte
    too); returns the client's future."""
    gate.event = None  # the next POST waits for open()
    fut = asyncio.run_coroutine_threadsafe(_post(proxy.url, prompt, timeout), run)
    _wait_for(lambda: gate.event is not None, "no request reached the held backend")
    time.sleep(0.2)
    return fut


@pytest.mark.parametrize("flow", [False, True], ids=["flow-off", "flow-on"])
def test_an_aggregated_request_on_a_both_backend_counts_until_its_first_byte(
    sims, run_proxy, loop_thread, flow: bool
) -> None:
    """A P/D pool keeps a request aggregated; on its `both` backend, held before its
    first byte, it counts its uncached prompt tokens (all of a cold prompt); answered,
    they are given back. The prefill-only backend never counts any."""
    pre, both = sims("producer"), sims("consumer")
    gate = loop_thread.run(Gated(both.url).start())
    try:
        cfg = _all_aggregated([(pre.url, "prefill"), (gate.url, "both")])
        if flow:
            cfg["flow_control"] = {"max_in_flight": 8}
        proxy = run_proxy(cfg)
        p_ep, b_ep = proxy.state.pools.pools[0].endpoints
        fut = _held(proxy, gate, loop_thread.loop)
        assert (b_ep.prefill_tokens, p_ep.prefill_tokens) == (PROMPT_TOKENS, 0)
        loop_thread.loop.call_soon_threadsafe(gate.open)
        assert fut.result(10)[0] == 200
        _wait_for(lambda: b_ep.prefill_tokens == 0, "prefill tokens not given back")
        assert p_ep.prefill_tokens == 0 and not pre.posts
    finally:
        loop_thread.run(gate.close())


def test_an_aggregated_retry_counts_on_the_backend_it_went_to(sims, run_proxy, loop_thread) -> None:
    """Two `both` backends, one answering 500: a request sent there first is retried on
    the other, which counts its tokens while it holds it; the failed one gives them back
    at its answer. Afterwards nothing is counted anywhere."""
    pre, bad, good = sims("producer"), sims("consumer", mode="fail"), sims("consumer")
    gate = loop_thread.run(Gated(good.url).start())
    try:
        proxy = run_proxy(_all_aggregated([(pre.url, "prefill"), (bad.url, "both"),
                                           (gate.url, "both")]))  # fmt: skip
        eps = proxy.state.pools.pools[0].endpoints
        for _ in range(2):  # round-robin: one of the two goes to the failing one first
            fut = _held(proxy, gate, loop_thread.loop)
            assert [ep.prefill_tokens for ep in eps] == [0, 0, PROMPT_TOKENS]
            loop_thread.loop.call_soon_threadsafe(gate.open)
            assert fut.result(10)[0] == 200
            _wait_for(lambda: all(ep.prefill_tokens == 0 for ep in eps), "tokens left")
        assert len(bad.posts) == 1
    finally:
        loop_thread.run(gate.close())


def test_an_aggregated_request_that_times_out_gives_its_tokens_back(sims, run_proxy) -> None:
    """The `both` backend never answers: its tokens are counted until the first-byte
    timeout, then the client gets a 504 and they are given back."""
    pre, hang = sims("producer"), sims("consumer", mode="hang")
    proxy = run_proxy(_all_aggregated([(pre.url, "prefill"), (hang.url, "both")],
                                      timeouts={"first_byte": 1.5}))  # fmt: skip
    b_ep = proxy.state.pools.pools[0].endpoints[1]
    seen: list[int] = []

    async def go() -> int:
        task = asyncio.ensure_future(_post(proxy.url, LONG))
        while not task.done():
            seen.append(b_ep.prefill_tokens)
            await asyncio.sleep(0.05)
        return (await task)[0]

    assert asyncio.run(go()) == 504
    assert PROMPT_TOKENS in seen
    _wait_for(lambda: b_ep.prefill_tokens == 0, "tokens of a timed-out request left")


def test_a_client_that_leaves_gives_an_aggregated_requests_tokens_back(
    sims, run_proxy, loop_thread
) -> None:
    """The client leaves while its request is held before the first byte: the tokens
    are given back without any answer from the backend."""
    pre, both = sims("producer"), sims("consumer")
    gate = loop_thread.run(Gated(both.url).start())
    try:
        proxy = run_proxy(_all_aggregated([(pre.url, "prefill"), (gate.url, "both")]))
        b_ep = proxy.state.pools.pools[0].endpoints[1]
        fut = _held(proxy, gate, loop_thread.loop, timeout=1.5)
        assert b_ep.prefill_tokens == PROMPT_TOKENS
        with pytest.raises(TimeoutError):
            fut.result(10)
        _wait_for(lambda: b_ep.prefill_tokens == 0, "tokens of a client that left")
        # The held request was closed, never answered.
        _wait_for(lambda: gate.cancelled == 1, "the held request was not closed")
    finally:
        loop_thread.loop.call_soon_threadsafe(gate.open)
        loop_thread.run(gate.close())


def test_an_aggregated_pool_never_counts_prefill_tokens(sims, run_proxy, loop_thread) -> None:
    """A pool without `disaggregation` pays nothing: a request held before its first byte
    leaves prefill_tokens at 0."""
    both = sims("consumer")
    gate = loop_thread.run(Gated(both.url).start())
    try:
        cfg = pd_config([(gate.url, "both")])
        del cfg["pools"][0]["disaggregation"]
        proxy = run_proxy(cfg)
        (ep,) = proxy.state.pools.pools[0].endpoints
        fut = _held(proxy, gate, loop_thread.loop)
        assert ep.in_flight == 1 and ep.prefill_tokens == 0
        loop_thread.loop.call_soon_threadsafe(gate.open)
        assert fut.result(10)[0] == 200
        assert ep.prefill_tokens == 0
    finally:
        loop_thread.run(gate.close())


# ---------------------------------------------------------------------------- simulator


class _Counted(FleetSimulator):
    """Checks after every engine step that each backend's prefill_tokens is the sum of the
    uncached tokens of the prefill legs it runs and, on a `both` backend, of the
    aggregated requests it runs without a first token yet."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peak = 0
        self.agg_peak = 0  # the most aggregated tokens counted on a backend at once
        self.first_leg: tuple[int, int] | None = None  # (uncached, prompt tokens)
        self.agg: dict[int, int] = {}  # id(record) -> the tokens its prefill counts
        self.first_agg: tuple[int, int] | None = None  # (counted, prompt tokens), both

    def _start(self, a: Any, t: float, ep: Endpoint) -> None:
        tokens = 0
        if ep.role == "both":  # the estimate the decision made for it, if it made one
            plan = a.plan
            if plan is not None and plan.prefill is not None and plan.prefill.endpoint is ep:
                tokens = plan.uncached_tokens
            else:
                tokens = self.disagg.uncached_tokens(a.ctx, ep)
            if self.first_agg is None:
                self.first_agg = (tokens, len(a.ids))
        self.agg[id(a.rec)] = tokens
        super()._start(a, t, ep)

    def _start_split(self, a: Any, t: float, p_ep: Endpoint, d_ep: Endpoint, reserved: bool,
                     uncached: int = 0) -> None:  # fmt: skip
        if self.first_leg is None:
            self.first_leg = (uncached, len(a.ids))
        super()._start_split(a, t, p_ep, d_ep, reserved, uncached)

    def _on_step(self, i: int, t: float) -> None:
        super()._on_step(i, t)
        want = [0] * len(self.endpoints)
        for pd in self._prefills.values():
            want[pd.p] += pd.uncached
        agg = [0] * len(self.endpoints)
        for st in self._live.values():
            if st.pd is None and st.last < 0:  # aggregated, no first token yet
                agg[st.ep] += self.agg[id(st.rec)]
        want = [w + n for w, n in zip(want, agg, strict=True)]
        assert [ep.prefill_tokens for ep in self.endpoints] == want
        self.peak = max(self.peak, *want)
        self.agg_peak = max(self.agg_peak, *agg)


@pytest.mark.parametrize("flow", [None, FlowControl(max_in_flight=4, max_wait=2.0)],
                         ids=["flow-off", "flow-on"])  # fmt: skip
def test_the_simulator_counts_prefill_tokens_exactly(flow: FlowControl | None) -> None:
    sim = _Counted(_fleet(min_prompt_tokens=0), "cache-aware", tokenizer=TOK, flow=flow)
    assert isinstance(sim.disagg, DisaggRouter)
    records = sim.run_step(_workload(output_len=16), poisson_arrivals(6.0, 30, 0),
                           first_index=0, deadline=200)  # fmt: skip
    assert any(r.status == "ok" for r in records)
    assert sim.first_leg is not None and sim.first_leg[0] == sim.first_leg[1] > 0  # cold
    assert sim.peak > 0
    assert [ep.prefill_tokens for ep in sim.endpoints] == [0, 0, 0]


def _mixed_fleet(min_prompt_tokens: int = 512) -> Any:
    """A prefill, two `both` and a decode backend; warm prompts (~300 uncached tokens of
    1,800) stay aggregated, cold ones are split."""
    return parse_fleet({
        "model": "m",
        "backends": [
            {"name": "p", "profile": "vendor-b", "port": 0, "role": "prefill"},
            {"name": "b", "profile": "vendor-a", "port": 0, "role": "both", "count": 2},
            {"name": "d", "profile": "vendor-a", "port": 0, "role": "decode"},
        ],
        "disaggregation": {"min_prompt_tokens": min_prompt_tokens},
    })  # fmt: skip


@pytest.mark.parametrize("flow", [None, FlowControl(max_in_flight=4, max_wait=2.0)],
                         ids=["flow-off", "flow-on"])  # fmt: skip
def test_the_simulator_counts_aggregated_prefills_on_both_backends_exactly(
    flow: FlowControl | None,
) -> None:
    """Split legs and aggregated requests on `both` backends, counted after every step
    (a deadline that aborts some of them included), and nothing left at the end."""
    sim = _Counted(_mixed_fleet(), "cache-aware", tokenizer=TOK, flow=flow)
    records = sim.run_step(_workload(output_len=16), poisson_arrivals(8.0, 40, 0),
                           first_index=0, deadline=200)  # fmt: skip
    assert sum(r.status == "ok" for r in records) > len(records) // 2
    assert sim.pd.reasons["split"] > 0 and sim.pd.reasons["short_prompt"] > 0
    assert sim.first_agg is not None and 0 < sim.first_agg[0] <= sim.first_agg[1]
    assert sim.agg_peak > 0 and sim.peak >= sim.agg_peak
    assert [ep.prefill_tokens for ep in sim.endpoints] == [0, 0, 0, 0]
    # A deadline that cuts aggregated requests before their first token gives their
    # tokens back (every request aggregated here).
    cut = _Counted(_mixed_fleet(10**6), "cache-aware", tokenizer=TOK, flow=flow)
    records = cut.run_step(_workload(output_len=16), poisson_arrivals(40.0, 40, 0),
                           first_index=0, deadline=0.5)  # fmt: skip
    assert cut.agg_peak > 0
    assert any(r.status == "incomplete" and not r.first_token for r in records)
    assert [ep.prefill_tokens for ep in cut.endpoints] == [0, 0, 0, 0]
