"""Live prefill/decode routing through lbproxy, against simulated P/D servers on 127.0.0.1.

Producers and consumers are `lbproxy.sim` servers with `kv_role`; a `Capture` front in
front of each records what lbproxy sent (bodies, X-Request-Id, answers) and injects the
failures of each path. Clients are the official openai client or raw aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from lbproxy.config import ConfigError, parse_config
from lbproxy.routing.disagg import DisaggRouter
from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.profiles import build_router
from lbproxy.routing.state import Endpoint, RequestContext
from lbproxy.sim import side_channel
from lbproxy.sim.kv_transfer import LinkTable
from lbproxy.sim.server import SimServerHandle, start_sim_server
from tests.conftest import LoopThread

MODEL = "granite-4.1-8b"
SPEED = 100.0
LONG = "The quick brown fox jumps over the lazy dog. " * 60  # ~2,700 bytes: ~675 tokens
PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
              "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip


class Capture:
    """A front for one backend: records POSTs and forwards everything to `target`.

    mode: pass | fail (500 to POSTs) | hang (POSTs never answered) | consume (the first
    POST with kv_transfer_params pulls its blocks off the producer and answers 500, as a
    decode server that died mid-request after its read: the blocks are gone)."""

    def __init__(self, target: str, mode: str = "pass") -> None:
        self.target = target
        self.mode = mode
        self.posts: list[dict[str, Any]] = []  # {path, body (bytes), rid, answer (bytes)}
        self.cancelled = 0  # POST handlers ended by the client (lbproxy) closing
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._answer(request)
        except asyncio.CancelledError:
            if request.method == "POST":
                self.cancelled += 1
            raise

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body = await request.read()
        rec: dict[str, Any] = {}
        if request.method == "POST":
            rec = {"path": request.path, "body": body, "rid": request.headers.get("X-Request-Id")}
            self.posts.append(rec)
            if self.mode == "fail":
                return web.json_response({"error": {"message": "boom"}}, status=500)
            if self.mode == "hang":
                await asyncio.sleep(3600)
            kv = orjson.loads(body).get("kv_transfer_params") if self.mode == "consume" else None
            if kv:
                self.mode = "pass"
                host, port, rid = kv["remote_host"], kv["remote_port"], kv["remote_request_id"]
                await side_channel.pull(self.session, host, port, kv["remote_engine_id"], rid,
                                        kv["remote_block_ids"])  # fmt: skip
                await side_channel.release(self.session, host, port, rid, True)
                return web.json_response({"error": {"message": "died"}}, status=500)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type",
                   "x-request-id")}  # fmt: skip
        async with self.session.request(
            request.method, self.target + request.rel_url.raw_path_qs, data=body, headers=headers
        ) as up:
            resp = web.StreamResponse(status=up.status)
            resp.content_type = up.content_type
            await resp.prepare(request)
            chunks = []
            async for chunk in up.content.iter_any():
                chunks.append(chunk)
                await resp.write(chunk)
            rec["answer"] = b"".join(chunks)
            await resp.write_eof()
            return resp

    async def start(self) -> Capture:
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.session is not None:
            await self.session.close()


async def _sim(role: str, speed: float = SPEED) -> SimServerHandle:
    links = LinkTable(100.0) if role != "producer" else None
    return await start_sim_server(port=0, profile="vendor-b", model=MODEL, speed=speed,
                                  kv_role=role, kv_links=links)  # fmt: skip


@pytest.fixture
def sims(loop_thread: LoopThread):
    started: list[Any] = []

    def make(
        role: str, mode: str = "pass", target: str | None = None, speed: float = SPEED
    ) -> Capture:
        if target is None:
            h = loop_thread.run(_sim(role, speed))
            started.append(h)
            target = h.url
        cap = loop_thread.run(Capture(target, mode).start())
        started.append(cap)
        return cap

    yield make
    for x in reversed(started):
        loop_thread.run(x.close())


def pd_config(backends: list[tuple[str, str]], **dis: Any) -> dict[str, Any]:
    """One P/D pool over (url, role) pairs; round-robin decode so the order is known."""
    dis.setdefault("min_prompt_tokens", 512)
    dis.setdefault("decode_routing", {"picker": "round-robin"})
    dis.setdefault("prefill_routing", {"picker": "round-robin"})
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "health": {"active": False},
        "pools": [{
            "name": "granite", "models": [MODEL], "routing": "round-robin",
            "disaggregation": dis,
            "backends": [{"url": u, "name": f"{r}{i}", "role": r}
                         for i, (u, r) in enumerate(backends)],
        }],
    }  # fmt: skip


def client(proxy: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=20)


def metrics_text(proxy: Any) -> str:
    import urllib.request

    with urllib.request.urlopen(proxy.url + "/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# ---------------------------------------------------------------------------- config


def test_the_issue_yaml_works_as_written(tmp_path: Path) -> None:
    from lbproxy.config import load_config
    from lbproxy.proxy.pools import PoolTable

    path = tmp_path / "lbproxy.yaml"
    path.write_text(
        "pools:\n"
        "  - name: granite\n"
        "    models: [granite-4.1-8b]\n"
        "    routing: cache-aware\n"
        "    disaggregation: {min_prompt_tokens: 512}\n"
        "    backends:\n"
        '      - {url: "http://gpu-node-1:8000", vendor: vendor-b, role: prefill}\n'
        '      - {url: "http://gpu-node-2:8000", vendor: vendor-b, role: decode}\n'
    )
    cfg = load_config(path)
    pool = PoolTable(cfg).pools[0]
    assert pool.disagg is not None and pool.disagg.min_prompt_tokens == 512
    assert pool.disagg.prefill.profile_name == "pd-prefill"
    assert pool.disagg.decode.profile_name == "pd-decode"
    assert [ep.role for ep in pool.endpoints] == ["prefill", "decode"]
    assert [ep.name for ep in pool.serving] == ["gpu-node-2:8000"]  # aggregated: decode side


@pytest.mark.parametrize(
    ("roles", "dis", "expected"),
    [
        (["decode", "decode"], {}, "pools[0].disaggregation: no prefill-capable backend"),
        (["prefill", "prefill"], {}, "pools[0].disaggregation: no decode-capable backend"),
        (["prefill", "decode"], {"decode_routing": "nope"},
         "pools[0].disaggregation.decode_routing: unknown routing profile 'nope'"),
        (["prefill", "both"], None, "pools[0].backends: role prefill (prefill0) needs the "
         "pool's `disaggregation`"),
        (["prefill", "chef"], {}, "pools[0].backends[1].role: must be one of"),
        (["prefill", "both"], {"min_prompt_tokens": -1},
         "pools[0].disaggregation.min_prompt_tokens"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(roles: list[str], dis: Any, expected: str) -> None:
    cfg = pd_config([(f"http://h{i}:8000", r) for i, r in enumerate(roles)])
    if dis is None:
        del cfg["pools"][0]["disaggregation"]
    else:
        cfg["pools"][0]["disaggregation"] = dis
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, "pd.yaml")
    assert "pd.yaml" in str(e.value) and expected in str(e.value), str(e.value)


# ---------------------------------------------------------------------------- decision


def _eps() -> list[Endpoint]:
    return [Endpoint("p", "http://p", role="prefill"), Endpoint("d", "http://d", role="decode"),
            Endpoint("b", "http://b", role="both")]  # fmt: skip


def test_decision_uses_the_prefill_side_prefix_index() -> None:
    bctx = BuildContext(pool="g", model=MODEL)
    dr = DisaggRouter(build_router("pd-prefill", bctx, seed=0),
                      build_router("pd-decode", bctx, seed=0), 512)  # fmt: skip
    eps = _eps()
    short = RequestContext(model=MODEL, body={"prompt": "hello there"})
    plan = dr.plan(short, eps, 0.0)
    assert not plan.disaggregated and plan.reason == "short_prompt"

    long_body = {"prompt": LONG + "question one"}
    plan = dr.plan(RequestContext(model=MODEL, body=long_body), eps, 0.0)
    assert plan.disaggregated and plan.reason == "split"
    assert plan.prefill is not None and plan.decode is not None
    assert plan.prefill.endpoint.role != "decode" and plan.decode.endpoint.role != "prefill"
    assert plan.decode.endpoint is not plan.prefill.endpoint
    assert plan.uncached_tokens == plan.prompt_tokens == len(long_body["prompt"]) // 4
    # The prefill side now holds the prefix: the same long prompt is mostly cached there.
    ctx = RequestContext(model=MODEL, body=long_body)
    dr.prefill.commit(ctx, plan.prefill.endpoint, 0.0)
    again = dr.plan(RequestContext(model=MODEL, body=long_body), eps, 1.0)
    assert not again.disaggregated and again.reason == "short_prompt"
    assert again.uncached_tokens < 512 <= again.prompt_tokens
    fields = again.log_fields()
    assert fields["mode"] == "aggregated" and "prefix-hash" in fields["prefill"]["scores"]
    # Not a generation route, or the client's own P/D: not split.
    emb = RequestContext(model=MODEL, body={"input": LONG}, route="/v1/embeddings")
    assert dr.plan(emb, eps, 0.0).reason == "route"
    own = RequestContext(model=MODEL, body={"prompt": LONG, "kv_transfer_params": {}})
    assert dr.plan(own, eps, 0.0).reason == "client_kv_params"
    # Only decode-capable endpoints left after the prefill pick: no split.
    # A backend of its own (the one above may hold the prefix now, by the tie-break).
    lone = [Endpoint("solo", "http://solo", role="both")]
    plan = dr.plan(RequestContext(model=MODEL, body={"prompt": LONG}), lone, 0.0)
    assert not plan.disaggregated and plan.reason == "no_decode_backend"


# ---------------------------------------------------------------------------- protocol


def test_split_non_streaming_sends_the_protocol(sims, run_proxy, tmp_path: Path) -> None:
    pre, dec = sims("producer"), sims("consumer")
    cfg = pd_config([(pre.url, "prefill"), (dec.url, "decode")])
    log_path = tmp_path / "access.log"
    cfg["access_log"] = {"enabled": True, "path": str(log_path)}
    proxy = run_proxy(cfg)
    out = client(proxy).completions.create(
        model=MODEL, prompt=LONG, max_tokens=5, temperature=0,
        extra_body={"min_tokens": 2, "vendor_field": {"keep": [1, 2]}},
        extra_headers={"X-Request-Id": "pd-test-1"},
    )  # fmt: skip
    assert out.usage is not None and out.usage.completion_tokens == 5

    assert len(pre.posts) == 1 and len(dec.posts) == 1
    p, d = pre.posts[0], dec.posts[0]
    assert p["rid"] == d["rid"] == "pd-test-1"
    p_body = json.loads(p["body"])
    assert p_body["kv_transfer_params"] == PREFILL_KV
    assert p_body["stream"] is False and p_body["max_tokens"] == 1
    assert "min_tokens" not in p_body and "max_completion_tokens" not in p_body
    assert p_body["vendor_field"] == {"keep": [1, 2]} and p_body["prompt"] == LONG
    returned = json.loads(p["answer"])["kv_transfer_params"]
    assert returned["do_remote_prefill"] is True and returned["remote_port"]
    d_body = json.loads(d["body"])
    client_body = {k: v for k, v in d_body.items() if k != "kv_transfer_params"}
    assert client_body["min_tokens"] == 2 and client_body["max_tokens"] == 5
    assert client_body["vendor_field"] == {"keep": [1, 2]} and client_body["prompt"] == LONG
    assert d_body["kv_transfer_params"] == returned  # exactly as returned, order included
    assert list(d_body["kv_transfer_params"]) == list(returned)
    assert list(d_body)[: len(client_body)] == list(client_body)

    text = metrics_text(proxy)
    assert metric(text, "lbproxy_pd_requests_total", mode="disaggregated", reason="split") == 1
    assert metric(text, "lbproxy_pd_prefill_seconds_count", prefill_backend="prefill0",
                  decode_backend="decode1") == 1  # fmt: skip
    deadline = time.monotonic() + 5
    while not (log_path.exists() and log_path.read_text().strip()):
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.05)
    line = json.loads(log_path.read_text().splitlines()[0])
    pd = line["pd"]
    assert pd["mode"] == "disaggregated" and pd["prefill_backend"] == "prefill0"
    assert pd["decode_backend"] == "decode1" and pd["prefill_s"] > 0
    assert "prefix-hash" not in pd["prefill"]["scores"]  # the round-robin profile given
    assert line["backend"] == "decode1" and line["status"] == 200


def test_split_streaming_chat(sims, run_proxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lbproxy.proxy.disagg")
    pre, dec = sims("producer"), sims("consumer")
    proxy = run_proxy(pd_config([(pre.url, "prefill"), (dec.url, "decode")]))
    stream = client(proxy).chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": LONG},
                               {"role": "user", "content": "go"}],
        max_completion_tokens=6, stream=True, stream_options={"include_usage": True},
        extra_body={"min_tokens": 3},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    p_body, d_body = json.loads(pre.posts[0]["body"]), json.loads(dec.posts[0]["body"])
    assert p_body["stream"] is False and p_body["max_tokens"] == 1
    assert p_body["max_completion_tokens"] == 1 and p_body["kv_transfer_params"] == PREFILL_KV
    assert "stream_options" not in p_body and "min_tokens" not in p_body
    assert d_body["stream"] is True and d_body["stream_options"] == {"include_usage": True}
    assert d_body["max_completion_tokens"] == 6 and d_body["min_tokens"] == 3
    assert "max_tokens" not in d_body
    assert d_body["kv_transfer_params"] == json.loads(pre.posts[0]["answer"])["kv_transfer_params"]
    text = metrics_text(proxy)
    assert metric(text, "lbproxy_pd_decode_ttft_seconds_count", prefill_backend="prefill0",
                  decode_backend="decode1") == 1  # fmt: skip
    # The decision, both sides' scores included, in the debug log.
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pd ")]
    assert "'mode': 'disaggregated'" in line and "'prefill': {'backend': 'prefill0'" in line
    assert "'decode': {'backend': 'decode1'" in line and "'totals'" in line


def test_short_prompt_stays_aggregated_and_byte_exact(sims, run_proxy, loop_thread) -> None:
    pre, dec = sims("producer"), sims("consumer")
    proxy = run_proxy(pd_config([(pre.url, "prefill"), (dec.url, "decode")]))
    raw = b'{ "prompt":"hi there",  "model" : "granite-4.1-8b", "max_tokens":3,"zz":[1, 2] }'

    async def post() -> int:
        async with aiohttp.ClientSession() as s, s.post(
            proxy.url + "/v1/completions", data=raw,
            headers={"Content-Type": "application/json"},
        ) as r:  # fmt: skip
            await r.read()
            return r.status

    assert loop_thread.run(post()) == 200
    assert pre.posts == [] and len(dec.posts) == 1 and dec.posts[0]["body"] == raw
    text = metrics_text(proxy)
    assert metric(text, "lbproxy_pd_requests_total", mode="aggregated",
                  reason="short_prompt") == 1  # fmt: skip


# ---------------------------------------------------------------------------- failures


def test_prefill_failure_retries_then_serves_aggregated(sims, run_proxy) -> None:
    bad = sims("producer", mode="fail")
    good = sims("producer")
    dec = sims("consumer")
    cfg = pd_config([(bad.url, "prefill"), (good.url, "prefill"), (dec.url, "decode")])
    proxy = run_proxy(cfg)
    c = client(proxy)
    out = c.completions.create(model=MODEL, prompt=LONG, max_tokens=3)
    assert out.usage is not None and out.usage.completion_tokens == 3
    assert len(bad.posts) == 1 and len(good.posts) == 1  # retried on the other prefill
    assert json.loads(dec.posts[0]["body"])["kv_transfer_params"]["do_remote_prefill"] is True

    good.mode = "fail"  # every prefill fails: served aggregated on the decode side
    out = c.completions.create(model=MODEL, prompt=LONG + "again", max_tokens=3)
    assert out.usage is not None and out.usage.completion_tokens == 3
    last = json.loads(dec.posts[-1]["body"])
    assert "kv_transfer_params" not in last and last["prompt"] == LONG + "again"
    text = metrics_text(proxy)
    assert metric(text, "lbproxy_pd_requests_total", mode="aggregated",
                  reason="prefill_failed") == 1  # fmt: skip
    assert metric(text, "lbproxy_upstream_failures_total", backend="prefill0",
                  cause="prefill_status_5xx") == 2  # fmt: skip


def test_prefill_timeout_falls_back_to_aggregated(sims, run_proxy) -> None:
    slow = sims("producer", mode="hang")
    dec = sims("consumer")
    proxy = run_proxy(pd_config([(slow.url, "prefill"), (dec.url, "decode")], prefill_timeout=1.0))
    t0 = time.monotonic()
    out = client(proxy).completions.create(model=MODEL, prompt=LONG, max_tokens=2)
    assert time.monotonic() - t0 < 8  # 1 s of prefill timeout, then aggregated
    assert out.usage is not None and out.usage.completion_tokens == 2
    assert "kv_transfer_params" not in json.loads(dec.posts[-1]["body"])
    deadline = time.monotonic() + 5
    while slow.cancelled < 1:  # the timed-out prefill's connection was closed
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_unreachable_decode_retries_with_the_same_params(sims, run_proxy, loop_thread) -> None:
    pre, dec = sims("producer"), sims("consumer")
    dead = sims("consumer")
    loop_thread.run(dead.close())  # its port now refuses connections
    proxy = run_proxy(pd_config([(pre.url, "prefill"), (dead.url, "decode"), (dec.url, "decode")]))
    out = client(proxy).completions.create(model=MODEL, prompt=LONG, max_tokens=4)
    assert out.usage is not None and out.usage.completion_tokens == 4
    assert len(pre.posts) == 1  # no second prefill: the blocks were still held
    returned = json.loads(pre.posts[0]["answer"])["kv_transfer_params"]
    assert json.loads(dec.posts[0]["body"])["kv_transfer_params"] == returned
    text = metrics_text(proxy)
    assert metric(text, "lbproxy_upstream_failures_total", backend="decode1",
                  cause="decode_connect_error") == 1  # fmt: skip
    assert metric(text, "lbproxy_pd_requests_total", mode="disaggregated", reason="split") == 1


def test_decode_failure_after_the_pull_prefills_again(sims, run_proxy) -> None:
    pre = sims("producer")
    spare = sims("consumer")
    # Once it has eaten the blocks it passes requests on to a consumer.
    eater = sims("consumer", mode="consume", target=spare.target)
    dec = sims("consumer")
    proxy = run_proxy(pd_config([(pre.url, "prefill"), (eater.url, "decode"), (dec.url, "decode")]))
    out = client(proxy).completions.create(model=MODEL, prompt=LONG, max_tokens=4)
    assert out.usage is not None and out.usage.completion_tokens == 4
    # eater pulled and died; dec's pull of the same params was refused (500): a fresh
    # prefill, whose params then served the request.
    assert len(pre.posts) == 2
    first = json.loads(pre.posts[0]["answer"])["kv_transfer_params"]
    second = json.loads(pre.posts[1]["answer"])["kv_transfer_params"]
    assert first["remote_request_id"] != second["remote_request_id"]
    bodies = [json.loads(x["body"])["kv_transfer_params"] for x in (*eater.posts, *dec.posts)]
    assert bodies.count(first) == 2 and second in bodies
    text = metrics_text(proxy)
    assert metric(text, "lbproxy_pd_requests_total", mode="disaggregated",
                  reason="re_prefill") == 1  # fmt: skip


def test_client_leaving_during_prefill_closes_it(sims, run_proxy, loop_thread) -> None:
    slow = sims("producer", mode="hang")
    dec = sims("consumer")
    proxy = run_proxy(pd_config([(slow.url, "prefill"), (dec.url, "decode")]))

    async def leave_early() -> None:
        body = {"model": MODEL, "prompt": LONG, "max_tokens": 3}
        async with aiohttp.ClientSession() as s:
            with pytest.raises(TimeoutError):
                async with s.post(proxy.url + "/v1/completions", json=body,
                                  timeout=aiohttp.ClientTimeout(total=0.5)) as r:  # fmt: skip
                    await r.read()

    prefill_ep = proxy.state.pools.pools[0].endpoints[0]
    task = asyncio.run_coroutine_threadsafe(leave_early(), loop_thread.loop)
    deadline = time.monotonic() + 5
    while not slow.posts:
        assert time.monotonic() < deadline, "no prefill request"
        time.sleep(0.02)
    assert prefill_ep.in_flight == 1  # flow control sees the prefill leg
    task.result(10)
    deadline = time.monotonic() + 5
    while slow.cancelled < 1:
        assert time.monotonic() < deadline, "the prefill request was not closed"
        time.sleep(0.05)
    time.sleep(0.3)
    assert prefill_ep.in_flight == 0
    assert len(slow.posts) == 1 and dec.posts == []  # no decode request was ever made
    text = metrics_text(proxy)
    assert metric(text, "lbproxy_pd_requests_total", mode="disaggregated",
                  reason="client_left") == 1  # fmt: skip
    assert metric(text, "lbproxy_requests_total", backend="prefill0", status="499") == 1


def test_client_leaving_during_prefill_aborts_it_on_the_producer(
    sims, run_proxy, loop_thread
) -> None:
    """Against the simulated producer itself (a slow one): its running request goes away."""
    slow = loop_thread.run(_sim("producer", speed=0.01))  # a 7K-token prefill: ~25 s
    try:
        dec = sims("consumer")
        proxy = run_proxy(pd_config([(slow.url, "prefill"), (dec.url, "decode")]))

        async def running() -> float:
            async with aiohttp.ClientSession() as s, s.get(slow.url + "/metrics") as r:
                text = await r.text()
            return metric(text, "vllm:num_requests_running")

        async def leave_early() -> None:
            body = {"model": MODEL, "prompt": "tok " * 7000, "max_tokens": 3}
            async with aiohttp.ClientSession() as s:
                with pytest.raises(TimeoutError):
                    async with s.post(proxy.url + "/v1/completions", json=body,
                                      timeout=aiohttp.ClientTimeout(total=1.0)) as r:  # fmt: skip
                        await r.read()

        task = asyncio.run_coroutine_threadsafe(leave_early(), loop_thread.loop)
        deadline = time.monotonic() + 5
        while loop_thread.run(running()) < 1:
            assert time.monotonic() < deadline, "the prefill never started"
            time.sleep(0.05)
        task.result(10)
        deadline = time.monotonic() + 5
        while loop_thread.run(running()) > 0:
            assert time.monotonic() < deadline, "the producer still runs the prefill"
            time.sleep(0.05)
        assert dec.posts == []
    finally:
        loop_thread.run(slow.close())


def test_a_reload_applies_roles_and_keeps_the_split_routers() -> None:
    from lbproxy.proxy.pools import PoolTable

    urls = [("http://h0:8000", "prefill"), ("http://h1:8000", "decode"), ("http://h2:8000", "both")]
    old = PoolTable(parse_config(pd_config(urls), "a.yaml"))
    pool = old.pools[0]
    assert [ep.name for ep in pool.serving] == ["decode1", "both2"]
    same = PoolTable(parse_config(pd_config(urls), "a.yaml"), previous=old)
    same.commit()
    assert same.pools[0].disagg is pool.disagg  # unchanged: its prefix indexes carry over
    moved = [urls[0], (urls[1][0], "prefill"), urls[2]]
    cfg = pd_config(moved)
    cfg["pools"][0]["backends"][1]["name"] = "decode1"  # the same backend, a new role
    new = PoolTable(parse_config(cfg, "b.yaml"), previous=same)
    changed = new.commit()
    ep = new.pools[0].endpoints[1]
    assert ep is pool.endpoints[1] and ep.role == "prefill"
    assert changed["granite"]["changed"] == ["decode1"]
    assert [e.name for e in new.pools[0].serving] == ["both2"]
    cfg["pools"][0]["disaggregation"]["min_prompt_tokens"] = 100
    rebuilt = PoolTable(parse_config(cfg, "c.yaml"), previous=new)
    rebuilt.commit()
    assert rebuilt.pools[0].disagg is not None and rebuilt.pools[0].disagg.min_prompt_tokens == 100
