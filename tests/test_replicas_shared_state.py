"""Two lbproxy replicas sharing routing state through a real redis-server."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lbproxy.config import parse_config
from lbproxy.proxy.app import RunningProxy, start_proxy
from tests.conftest import LoopThread, proxy_config
from tests.fake_backend import FakeBackend
from tests.replicas_support import RedisServer, samples

GROUPS = 12


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def replicas(loop_thread: LoopThread) -> Iterator[Any]:
    started: list[RunningProxy] = []

    def make(backends: list[FakeBackend], redis_url: str | None, **extra: Any) -> list[str]:
        cfg = proxy_config(backends, routing="cache-aware", **extra)
        if redis_url is not None:
            cfg["state"] = {"redis": redis_url}
        urls = []
        for seed in (1, 2):  # two replicas whose random tie-breaks differ
            p = loop_thread.run(start_proxy(parse_config(cfg, "test-config"), seed=seed))
            started.append(p)
            urls.append(p.url)
        return urls

    yield make
    for p in started:
        loop_thread.run(p.close())


def _prompt(group: int, k: int) -> str:
    # A long shared head per group (distinct from its first block on), then a question.
    return f"group {group:03d} system prompt " + "lorem ipsum " * 60 + f"question {k}"


def _served_by(backends: list[FakeBackend]) -> dict[int, set[str]]:
    """group -> the backends that served its requests."""
    out: dict[int, set[str]] = {}
    for b in backends:
        for r in b.received:
            text = r.body.decode()
            group = int(text.split("group ", 1)[1][:3])
            out.setdefault(group, set()).add(b.name)
    return out


def _alternate(urls: list[str], rounds: int, first_group: int = 0) -> list[int]:
    """Each group's requests alternate between the replicas."""
    clients = [httpx.Client(base_url=u, timeout=30) for u in urls]
    statuses = []
    try:
        for rnd in range(rounds):
            for g in range(first_group, first_group + GROUPS):
                body = {"model": "fake-model", "prompt": _prompt(g, rnd), "max_tokens": 1}
                statuses.append(
                    clients[(rnd + g) % 2].post("/v1/completions", json=body).status_code
                )
    finally:
        for c in clients:
            c.close()
    return statuses


def _metric(url: str, name: str, **labels: str) -> float:
    return sum(
        v for lab, v in samples(url, name) if all(lab.get(k) == x for k, x in labels.items())
    )


def test_shared_redis_keeps_each_prefix_on_one_backend(fake_backends, replicas, redis_server):
    backends = fake_backends(4)
    urls = replicas(backends, redis_server.url)
    assert _alternate(urls, 4) == [200] * 4 * GROUPS
    served = _served_by(backends)
    assert len(served) == GROUPS
    assert all(len(names) == 1 for names in served.values()), served
    assert {n for names in served.values() for n in names} != {backends[0].name}  # spread
    for url in urls:
        assert _metric(url, "lbproxy_shared_state_applied_total") >= 2 * GROUPS - 1
        assert _metric(url, "lbproxy_shared_state_up") == 1


def test_without_shared_state_replicas_split_prefixes(fake_backends, replicas):
    backends = fake_backends(4)
    urls = replicas(backends, None)
    assert _alternate(urls, 4) == [200] * 4 * GROUPS
    served = _served_by(backends)
    assert any(len(names) > 1 for names in served.values()), served


def test_redis_slow_then_gone_then_back(fake_backends, replicas, redis_server):
    backends = fake_backends(4)
    urls = replicas(backends, redis_server.url)
    assert redis_server.proc is not None
    # Slow: Redis stopped (SIGSTOP). Requests go on at once, on local state.
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert _alternate(urls, 2) == [200] * 2 * GROUPS
        assert time.monotonic() - t0 < 20  # 24 requests; each waits 5 ms for Redis at most
        timeouts = sum(
            _metric(u, "lbproxy_shared_state_errors_total", reason="timeout") for u in urls
        )
        assert timeouts >= 1
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    # Gone: killed under load. No client error; the errors counter grows; up is 0.
    redis_server.stop()
    assert _alternate(urls, 2, first_group=100) == [200] * 2 * GROUPS
    errors = sum(_metric(u, "lbproxy_shared_state_errors_total", reason="error") for u in urls)
    assert errors >= 1
    assert all(_metric(u, "lbproxy_shared_state_up") == 0 for u in urls)
    # Back (empty, same port): sharing resumes within a few retries.
    redis_server.start()
    deadline = time.monotonic() + 15
    while not all(_metric(u, "lbproxy_shared_state_up") == 1 for u in urls):
        assert time.monotonic() < deadline, "sharing did not resume"
        _alternate(urls, 1, first_group=900)
        time.sleep(0.3)
    # `up` follows the reads; a write caught by the outage may still be timing out, and
    # writes resume after its retry delay: wait until both replicas learn from each other.
    name = "lbproxy_shared_state_applied_total"
    applied = [_metric(u, name) for u in urls]
    while not all(_metric(u, name) > a for u, a in zip(urls, applied, strict=True)):
        assert time.monotonic() < deadline, "sharing did not resume"
        _alternate(urls, 1, first_group=900)
        time.sleep(0.3)
    for b in backends:
        b.received.clear()
    assert _alternate(urls, 4, first_group=200) == [200] * 4 * GROUPS
    served = _served_by(backends)
    assert all(len(names) == 1 for names in served.values()), served


def test_a_restarted_replica_rejoins_with_the_shared_index(
    fake_backends, replicas, redis_server, loop_thread
):
    backends = fake_backends(4)
    urls = replicas(backends, redis_server.url)
    assert _alternate(urls, 2) == [200] * 2 * GROUPS
    before = _served_by(backends)
    assert all(len(names) == 1 for names in before.values()), before
    # A new replica (as after a restart) reads the stream when it starts.
    cfg = proxy_config(backends, routing="cache-aware", state={"redis": redis_server.url})
    fresh = loop_thread.run(start_proxy(parse_config(cfg, "test-config"), seed=3))
    try:
        for b in backends:
            b.received.clear()
        with httpx.Client(base_url=fresh.url, timeout=30) as c:
            for g in range(GROUPS):
                body = {"model": "fake-model", "prompt": _prompt(g, 9), "max_tokens": 1}
                assert c.post("/v1/completions", json=body).status_code == 200
        assert _served_by(backends) == before
    finally:
        loop_thread.run(fresh.close())


def test_a_shared_decision_carries_the_requests_footprint() -> None:
    """What one replica routed is charged to the other's index as to its own: the hashed
    blocks and the rest of the request's KV (its prompt past the span, its max_tokens)."""
    from types import SimpleNamespace

    from lbproxy.replicas.shared_state import _RouterShare
    from lbproxy.routing.plugins.prefix_hash import Params, PrefixHashScorer
    from lbproxy.routing.state import Endpoint, RequestContext

    published: list[dict[bytes, bytes]] = []
    owner = SimpleNamespace(publish=published.append)
    mine, theirs = PrefixHashScorer(Params()), PrefixHashScorer(Params())
    eps = [Endpoint(name="a", url="http://127.0.0.1:1")]
    share = _RouterShare(owner, b"k", SimpleNamespace(scorers=[SimpleNamespace(scorer=mine)]), eps)  # type: ignore[arg-type]
    other = _RouterShare(
        owner, b"k", SimpleNamespace(scorers=[SimpleNamespace(scorer=theirs)]), eps
    )  # type: ignore[arg-type]
    ctx = RequestContext(model="m", raw_prompt=b"shared system prompt " * 1_400, max_tokens=500)
    mine.score(ctx, eps, 0.0)
    mine.on_routed(ctx, eps[0], 0.0)
    share.on_routed(ctx, eps[0], 0.0)
    assert other.apply(published[0], 0.0)
    assert theirs.index.size("a") == mine.index.size("a") > mine._units[-1]
    assert theirs.score(RequestContext(model="m", raw_prompt=ctx.raw_prompt), eps, 0.0) == [1.0]
