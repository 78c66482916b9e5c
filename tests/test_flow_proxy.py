"""Flow control in the live proxy, over fake backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from lbproxy.config import parse_config
from lbproxy.proxy.app import RunningProxy
from lbproxy.proxy.observability import OBS
from tests.conftest import LoopThread, proxy_config
from tests.fake_backend import FakeBackend
from tests.leaving_clients import send_as

# Client-facing: flow control answers alike on lbproxy's own server and its ASGI face.
PROXY_FACES = ("native", "asgi")


def _flow_cfg(backends: list[FakeBackend], limit: int, **flow: Any) -> dict[str, Any]:
    flow.setdefault("limit", {"type": "fixed", "initial": limit, "min": 1})
    return proxy_config(backends, flow_control=flow)


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    tag: str,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = {"model": "fake-model", "prompt": tag, "max_tokens": 2}
    async with session.post(
        url + "/v1/completions",
        json=body,
        headers=headers or {},
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as r:
        return r.status, dict(r.headers), await r.json()


def _served_tags(fb: FakeBackend) -> list[str]:
    return [orjson.loads(r.body)["prompt"] for r in fb.received]


def test_requests_wait_while_every_backend_is_full_and_none_exceeds_its_limit(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    backends = fake_backends(2, stall_before_headers=0.3)
    proxy = run_proxy(_flow_cfg(backends, limit=2))

    async def go() -> list[tuple[int, dict[str, str], dict[str, Any]]]:
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(_post(s, proxy.url, f"r{i}") for i in range(12)))

    results = loop_thread.run(go())
    assert [r[0] for r in results] == [200] * 12
    assert all(fb.max_active <= 2 for fb in backends), [fb.max_active for fb in backends]
    assert sum(len(fb.received) for fb in backends) == 12
    waits = sorted(float(r[1]["x-lbproxy-queue-wait"]) for r in results)
    assert waits[:4] == [0.0] * 4  # four went at once, the rest waited their turn
    assert waits[-1] >= 0.5
    gate = proxy.state.pools.pools[0].gate
    assert gate is not None and gate.controller.queue.size == 0
    assert gate.controller.dispatched_direct == 4 and gate.controller.dispatched_queued == 8
    assert all(ep.in_flight == 0 for ep in proxy.state.pools.pools[0].endpoints)


def test_full_queue_answers_429_with_retry_after_at_once(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    (fb,) = fake_backends(1, stall_before_headers=1.0)
    proxy = run_proxy(_flow_cfg([fb], limit=1, max_queue=2))

    async def go() -> tuple[list[Any], float, Any]:
        async with aiohttp.ClientSession() as s:
            held = [asyncio.create_task(_post(s, proxy.url, f"r{i}")) for i in range(3)]
            await asyncio.sleep(0.3)  # one running, two waiting: the queue is full
            t = time.monotonic()
            refused = await _post(s, proxy.url, "over")
            took = time.monotonic() - t
            return await asyncio.gather(*held), took, refused

    held, took, (status, headers, body) = loop_thread.run(go())
    assert status == 429 and took < 0.8
    assert int(headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"
    assert "overloaded" in body["error"]["message"]
    assert [r[0] for r in held] == [200, 200, 200]
    assert "over" not in _served_tags(fb)

    # The official client surfaces it as a RateLimitError. (Same key, same flow: a request
    # of another flow would take the place of this flow's newest.)
    async def with_openai() -> BaseException | None:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        key = {"Authorization": "Bearer k"}
        async with aiohttp.ClientSession() as s:
            held = [asyncio.create_task(_post(s, proxy.url, f"q{i}", key)) for i in range(3)]
            await asyncio.sleep(0.3)
            try:
                await client.completions.create(model="fake-model", prompt="o", max_tokens=1)
            except openai.RateLimitError as e:
                return e
            finally:
                await client.close()
                # Their answers were checked above: the held ones go (as clients that leave).
                for task in held:
                    task.cancel()
                await asyncio.gather(*held, return_exceptions=True)
            return None

    err = loop_thread.run(with_openai())
    assert isinstance(err, openai.RateLimitError) and err.status_code == 429


def test_a_request_waiting_past_max_wait_gets_429(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    (fb,) = fake_backends(1, stall_before_headers=2.0)
    proxy = run_proxy(_flow_cfg([fb], limit=1, max_wait=0.5, shed_early=False))

    async def go() -> tuple[Any, Any, float]:
        async with aiohttp.ClientSession() as s:
            first = asyncio.create_task(_post(s, proxy.url, "first"))
            await asyncio.sleep(0.2)
            t = time.monotonic()
            late = await _post(s, proxy.url, "late")
            took = time.monotonic() - t
            return await first, late, took

    first, (status, headers, body), took = loop_thread.run(go())
    assert first[0] == 200
    assert status == 429 and body["error"]["code"] == "queue_timeout"
    assert 0.4 <= took < 1.5, took
    assert "Retry-After" in headers
    assert _served_tags(fb) == ["first"]
    ctl = proxy.state.pools.pools[0].gate.controller  # type: ignore[union-attr]
    assert ctl.shed_counts["max_wait"] == 1


def test_a_waiting_client_that_leaves_is_never_dispatched(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    (fb,) = fake_backends(1, stall_before_headers=1.0)
    proxy = run_proxy(_flow_cfg([fb], limit=1))

    async def go() -> tuple[Any, bool]:
        async with aiohttp.ClientSession() as s:
            first = asyncio.create_task(_post(s, proxy.url, "first"))
            await asyncio.sleep(0.2)
            gave_up = False
            try:
                await _post(s, proxy.url, "impatient", timeout=0.3)
            except TimeoutError:
                gave_up = True
            result = await first
            await asyncio.sleep(0.3)  # room for a wrong dispatch to reach the backend
            return result, gave_up

    first, gave_up = loop_thread.run(go())
    assert gave_up and first[0] == 200
    assert _served_tags(fb) == ["first"]
    gate = proxy.state.pools.pools[0].gate
    assert gate is not None and gate.controller.queue.size == 0
    assert gate.controller.shed_counts["client_left"] == 1
    assert proxy.state.pools.pools[0].endpoints[0].in_flight == 0


def test_priority_bands_then_fair_turns_between_flows_then_arrival_order(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    (fb,) = fake_backends(1, stall_before_headers=1.5)
    proxy = run_proxy(_flow_cfg([fb], limit=1, flow_header="x-tenant", headroom=0))
    gate = proxy.state.pools.pools[0].gate
    assert gate is not None
    sends = [
        ("a1", {"x-tenant": "a"}),
        ("a2", {"x-tenant": "a"}),
        ("a3", {"x-tenant": "a"}),
        ("b1", {"x-tenant": "b"}),
        ("h1", {"x-tenant": "a", "x-lbproxy-priority": "10"}),
        ("b2", {"x-tenant": "b"}),
    ]

    async def go() -> tuple[list[int], int]:
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(_post(s, proxy.url, "blocker"))]
            while not fb.received:
                await asyncio.sleep(0.01)
            fb.stall_before_headers = 0.05  # the blocker holds the slot for 1.5 s, the rest not
            for k, (tag, headers) in enumerate(sends, 1):
                tasks.append(asyncio.create_task(_post(s, proxy.url, tag, headers)))
                for _ in range(200):  # arrival order: each waits before the next is sent
                    if gate.controller.queue.size >= k:
                        break
                    await asyncio.sleep(0.005)
            queued = gate.controller.queue.size  # all six wait behind the blocker
            return [r[0] for r in await asyncio.gather(*tasks)], queued

    statuses, queued = loop_thread.run(go())
    assert statuses == [200] * 7 and queued == 6
    assert _served_tags(fb) == ["blocker", "h1", "a1", "b1", "a2", "b2", "a3"]


def test_invalid_priority_header_is_a_400(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    (fb,) = fake_backends(1)
    proxy = run_proxy(_flow_cfg([fb], limit=4))

    async def go() -> Any:
        async with aiohttp.ClientSession() as s:
            return await _post(s, proxy.url, "p", {"x-lbproxy-priority": "high"})

    status, _, body = loop_thread.run(go())
    assert status == 400 and body["error"]["param"] == "x-lbproxy-priority"
    assert fb.received == []


def test_reload_with_requests_waiting_loses_none(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    fb, extra = fake_backends(2, stall_before_headers=0.3)
    proxy = run_proxy(_flow_cfg([fb], limit=1))
    admin = proxy.state.admin
    assert admin is not None

    async def go() -> tuple[list[int], dict[str, Any], int]:
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(_post(s, proxy.url, f"r{i}")) for i in range(6)]
            await asyncio.sleep(0.15)
            gate = proxy.state.pools.pools[0].gate
            waiting = gate.controller.queue.size if gate is not None else -1
            # A second backend and a longer max_wait, while five requests wait.
            new = _flow_cfg([fb, extra], limit=1, max_wait=60)
            answer = await admin.apply(parse_config(new, "reload"))
            return [r[0] for r in await asyncio.gather(*tasks)], answer, waiting

    statuses, answer, waiting = loop_thread.run(go())
    assert waiting == 5
    assert statuses == [200] * 6
    assert answer["pools"]["main"]["added"] == ["be1"]
    assert len(fb.received) + len(extra.received) == 6 and len(extra.received) >= 1
    assert max(fb.max_active, extra.max_active) == 1
    gate = proxy.state.pools.pools[0].gate
    assert gate is not None and gate.settings.max_wait == 60


def test_reload_switching_flow_control_off_sends_whoever_waits(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    (fb,) = fake_backends(1, stall_before_headers=0.5)
    proxy = run_proxy(_flow_cfg([fb], limit=1))
    admin = proxy.state.admin
    assert admin is not None

    async def go() -> list[int]:
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(_post(s, proxy.url, f"r{i}")) for i in range(4)]
            await asyncio.sleep(0.15)
            await admin.apply(parse_config(proxy_config([fb], flow_control={"enabled": False})))
            return [r[0] for r in await asyncio.gather(*tasks)]

    assert loop_thread.run(go()) == [200] * 4
    assert fb.max_active == 4  # the three that waited went together
    assert proxy.state.pools.pools[0].gate is None


@pytest.mark.parametrize("enabled", [False, True])
def test_flow_control_off_sends_everything_at_once(
    enabled: bool,
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    (fb,) = fake_backends(1, stall_before_headers=0.4)
    flow: dict[str, Any] = {"enabled": enabled, "limit": {"type": "fixed", "initial": 5}}
    proxy = run_proxy(proxy_config([fb], flow_control=flow))

    async def go() -> list[tuple[int, dict[str, str], dict[str, Any]]]:
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(_post(s, proxy.url, f"r{i}") for i in range(20)))

    results = loop_thread.run(go())
    assert [r[0] for r in results] == [200] * 20
    if enabled:
        assert fb.max_active == 5
        assert all("x-lbproxy-queue-wait" in r[1] for r in results)
    else:  # as before flow control existed: no hold, no header
        assert fb.max_active == 20
        assert not any("x-lbproxy-queue-wait" in r[1] for r in results)
        assert proxy.state.pools.pools[0].gate is None


def test_a_light_tenant_goes_past_a_heavy_tenants_backlog(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    (fb,) = fake_backends(1, stall_before_headers=0.5)
    proxy = run_proxy(_flow_cfg([fb], limit=4, flow_header="x-tenant", headroom=0.25))

    async def go() -> tuple[list[float], float]:
        async with aiohttp.ClientSession() as s:
            heavy = [
                asyncio.create_task(_post(s, proxy.url, f"h{i}", {"x-tenant": "heavy"}))
                for i in range(12)
            ]
            await asyncio.sleep(0.2)
            light = await _post(s, proxy.url, "l0", {"x-tenant": "light"})
            done = await asyncio.gather(*heavy)
            return [float(r[1]["x-lbproxy-queue-wait"]) for r in done], float(
                light[1]["x-lbproxy-queue-wait"]
            )

    heavy_waits, light_wait = loop_thread.run(go())
    assert light_wait < 0.1  # into the headroom at once
    assert max(heavy_waits) >= 0.9  # the heavy tenant's backlog waited its turns
    assert fb.max_active == 5  # the limit of 4 and one slot of headroom


def test_the_ramp_takes_the_lifetime_of_requests_that_ended_through_the_proxy(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    # 24 requests that ask for 1,000 tokens (a 90 s ramp at the default target_itl) and
    # each take ~6 s: once all ended, in flight is 0, and the ramp is still the ~6 s
    # they lived (measured from when each was sent), not the 5 s floor.
    (fb,) = fake_backends(1, stall_before_headers=6.0)
    proxy = run_proxy(_flow_cfg([fb], limit=32))

    async def one(s: aiohttp.ClientSession, i: int) -> int:
        body = {"model": "fake-model", "prompt": f"r{i}", "max_tokens": 1000}
        async with s.post(proxy.url + "/v1/completions", json=body) as r:
            await r.read()
            return r.status

    async def go() -> list[int]:
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(one(s, i) for i in range(24)))

    assert loop_thread.run(go()) == [200] * 24
    gate = proxy.state.pools.pools[0].gate
    assert gate is not None
    assert all(ep.in_flight == 0 for ep in proxy.state.pools.pools[0].endpoints)
    ramp = gate.controller.ramp_time()
    assert ramp is not None and 5.9 <= ramp <= 20.0, ramp


def test_flow_control_is_observable_in_metrics_admin_dashboard_and_access_log(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
    tmp_path: Any,
) -> None:
    import orjson

    (fb,) = fake_backends(1, stall_before_headers=0.4)
    cfg = _flow_cfg([fb], limit=1, max_queue=2, headroom=0)
    cfg["admin"] = {"token": "tok"}
    log_path = tmp_path / "access.jsonl"
    cfg["access_log"] = {"enabled": True, "path": str(log_path)}
    proxy = run_proxy(cfg)

    async def go() -> tuple[str, Any, Any, list[int]]:
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(_post(s, proxy.url, f"r{i}")) for i in range(3)]
            await asyncio.sleep(0.15)
            shed = await _post(s, proxy.url, "over")  # queue full: 429
            async with s.get(proxy.url + "/metrics") as r:
                during = await r.text()
            statuses = [r[0] for r in await asyncio.gather(*tasks)] + [shed[0]]
            async with s.get(proxy.url + "/metrics") as r:
                after = await r.text()
            auth = {"Authorization": "Bearer tok"}
            async with s.get(proxy.url + "/admin/backends", headers=auth) as r:
                admin = await r.json()
            async with s.get(proxy.url + "/dashboard/state.json") as r:
                dash = await r.json()
            return during + after, admin, dash, statuses

    text, admin, dash, statuses = loop_thread.run(go())
    assert statuses == [200, 200, 200, 429]
    assert 'lbproxy_flow_queue_length{pool="main",priority="0"} 2.0' in text  # during
    assert 'lbproxy_flow_dispatches_total{path="direct",pool="main"} 1.0' in text
    assert 'lbproxy_flow_dispatches_total{path="queued",pool="main"} 2.0' in text
    assert 'lbproxy_flow_shed_total{pool="main",reason="queue_full"} 1.0' in text
    assert (
        'lbproxy_backend_concurrency_limit{backend="be0",pool="main",vendor="unknown"} 1.0' in text
    )
    assert 'lbproxy_flow_queue_wait_seconds_count{pool="main"} 4.0' in text
    (be,) = admin["data"]
    assert be["flow"] == {"concurrency_limit": 1, "decode_latency_s": None}
    assert dash["backends"][0]["concurrency_limit"] == 1
    flow = dash["pools"][0]["flow"]
    assert flow["waiting"] == 0 and flow["dispatched_queued"] == 2
    assert flow["shed"]["queue_full"] == 1
    assert flow["ramp_s"] == 5.0  # max_tokens 2 x target_itl 90 ms, raised to the 5 s floor
    proxy.runner.app[OBS].access_log.flush()  # type: ignore[union-attr]
    lines = [orjson.loads(x) for x in log_path.read_bytes().splitlines()]
    waits = sorted(x["queue_wait_s"] for x in lines if x["route"] == "/v1/completions")
    assert waits[0] == 0.0 and waits[-1] >= 0.3 and len(waits) == 4
    assert [x["outcome"] for x in lines].count("queue_full") == 1


def test_a_mixed_storm_leaves_nothing_in_flight_or_waiting(
    fake_backends: Callable[..., list[FakeBackend]],
    run_proxy: Callable[[dict[str, Any]], RunningProxy],
    loop_thread: LoopThread,
) -> None:
    # Each fault has its own test; this one mixes them while requests wait, so that an
    # in-flight count or a queue slot leaked by one path under another shows: a backend
    # that dies mid-stream, one that answers 503 (retried elsewhere), clients leaving while
    # queued and mid-stream, bad input, and a reload halfway.
    (good,) = fake_backends(1, chunk_delay=0.02)
    (dying,) = fake_backends(1, chunk_delay=0.02, die_after_chunks=3)
    (failing,) = fake_backends(1, fail_status=503, health_status=200)  # healthy, answers 503
    proxy = run_proxy(_flow_cfg([good, dying, failing], limit=2, max_queue=12, max_wait=1.5))
    admin = proxy.state.admin
    assert admin is not None
    rng = random.Random(7)
    seen: Counter[str] = Counter()
    wrong: list[str] = []

    def check_error(kind: str, status: int, text: bytes, headers: Any) -> None:
        try:
            err = orjson.loads(text)["error"]
            assert err["message"] and err["type"]
        except (ValueError, KeyError, TypeError, AssertionError):
            wrong.append(f"{kind}: {status} not OpenAI-shaped: {text[:200]!r}")
        if status == 429 and "Retry-After" not in headers:
            wrong.append(f"{kind}: 429 without Retry-After")

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        kind = rng.choice(["stream", "stream", "plain", "leave_queued", "leave_mid", "bad"])
        body: dict[str, Any] = {
            "model": "fake-model",
            "prompt": f"r{i}",
            "max_tokens": rng.randint(10, 30),
            "stream": kind in ("stream", "leave_queued", "leave_mid"),
        }
        data = orjson.dumps(body) if kind != "bad" else b'{"model": "fake-model", "prompt": '
        headers = {"content-type": "application/json"}
        post = s.post(proxy.url + "/v1/completions", data=data, headers=headers)
        answer = await send_as(post, kind, seen, rng.uniform(0.05, 0.3))
        if answer is None:
            return
        status, got_headers, text = answer
        seen[f"{kind} {status}"] += 1
        if (kind == "bad") != (status == 400) or status in (500, 502, 504):
            wrong.append(f"{kind}: status {status}")
        if status >= 400:
            check_error(kind, status, text, got_headers)
        elif body["stream"]:
            if b'"error"' in text:
                seen["stream error event"] += 1  # the dying backend, after the first byte
            elif text.rstrip().endswith(b"data: [DONE]"):
                seen["stream done"] += 1
            else:
                wrong.append(f"{kind}: a stream that neither ended nor said why: {text[-200:]!r}")

    async def go() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            tasks = []
            for i in range(160):
                tasks.append(asyncio.create_task(one(s, i)))
                await asyncio.sleep(rng.expovariate(100))
                if i == 70:  # the same backends, a longer max_wait, while requests wait
                    cfg = _flow_cfg([good, dying, failing], limit=2, max_queue=12, max_wait=2.0)
                    await admin.apply(parse_config(cfg, "reload"))
            await asyncio.gather(*tasks)
            pool = proxy.state.pools.pools[0]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                gate = pool.gate
                waiting = gate.controller.queue.size if gate is not None else -1
                if waiting == 0 and all(ep.in_flight == 0 for ep in pool.endpoints):
                    return
                await asyncio.sleep(0.05)

    loop_thread.run(go(), timeout=90)
    pool = proxy.state.pools.pools[0]
    assert wrong == []
    assert pool.gate is not None and pool.gate.controller.queue.size == 0
    assert [ep.in_flight for ep in pool.endpoints] == [0, 0, 0]
    # The storm did what it was for: requests waited and were refused, streams broke
    # mid-way and others completed, clients left while waiting.
    assert seen["stream 429"] + seen["plain 429"] > 0, seen
    assert seen["stream error event"] > 0 and seen["stream done"] > 0, seen
    assert seen["leave_queued left"] > 0 and seen["leave_mid left"] > 0, seen
    assert len(failing.received) > 0
