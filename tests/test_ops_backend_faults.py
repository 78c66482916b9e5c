"""Backend faults as a client and an operator see them: client disconnects are ordinary,
errors carry no backend internals, failures after the request was sent are labelled and
retried by policy, and bodies that make every backend fail do not eject backends."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import proxy_config
from tests.fake_backend import FakeBackend
from tests.ops_helpers import GarbageServer, RawServer, write_config
from tests.test_obs_access_log import read_lines
from tests.test_obs_metrics import scrape
from tests.test_ops_shutdown import Serve

BODY = {"model": "fake-model", "prompt": "x", "max_tokens": 2}


class ReadThenClose(RawServer):
    """Reads a request, then closes the socket without answering: the backend got it.
    `connections` counts the POSTs among them."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"POST "):  # not the scraper's or discovery's GETs
                self.connections += 1
            await asyncio.sleep(0.05)  # the body too
        writer.close()


@dataclass
class PoisonBackend(FakeBackend):
    """Answers 500 (vLLM's error shape) to bodies holding POISON, or to all with `all_500`."""

    all_500: bool = False
    poisoned: list[float] = field(default_factory=list)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.all_500 or b"POISON" in body:
            self.poisoned.append(time.monotonic())
            return web.json_response(
                {"error": {"message": "Internal Server Error: cannot decode the body",
                           "type": "InternalServerError", "param": None, "code": 500}},
                status=500,
            )  # fmt: skip
        return await super()._post(request)


@pytest.fixture
def servers(loop_thread):
    started: list[Any] = []

    def make(server: Any) -> Any:
        started.append(loop_thread.run(server.start()))
        return server

    yield make
    for s in started:
        loop_thread.run(s.close())


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# ---- 7: a client leaving mid-stream is an ordinary event --------------------------------


def _rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("loop", ["auto", "asyncio"])  # auto: uvloop, as in production
def test_client_leaving_mid_stream_logs_no_error(fake_backends, tmp_path: Path, loop) -> None:
    (fast,) = fake_backends(1)  # streams as fast as it can: writes race the disconnect
    log_path = tmp_path / "access.jsonl"
    cfg = proxy_config([fast], access_log={"enabled": True, "path": str(log_path)})
    proxy = Serve(write_config(tmp_path / "lbproxy.yaml", cfg), loop)
    try:
        body = orjson.dumps(
            {"model": "fake-model", "prompt": "x", "max_tokens": 20000, "stream": True}
        )
        n = 60  # the race with the disconnect shows within a few dozen on the old code
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", proxy.port))
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            got = b""
            while len(got) < 100_000:  # reading along: the proxy is busy writing to it
                got += sock.recv(65536)
            _rst_close(sock)
        lines = read_lines(log_path, n)
    finally:
        proxy.stop()
    assert [line["outcome"] for line in lines] == ["client_disconnect"] * n
    assert all(line["backend"] == "be0" and line["status"] == 200 for line in lines)
    stderr = "".join(proxy.lines)
    assert "ERROR" not in stderr and "Traceback" not in stderr, stderr[-3000:]


# ---- 8: no backend internals in what the client sees -------------------------------------


def test_errors_carry_the_request_id_and_no_backend_internals(
    fake_backends, run_proxy, servers
) -> None:
    garbage = servers(GarbageServer())
    closer = servers(ReadThenClose())
    proxy = run_proxy(proxy_config([garbage.url, closer.url], health={"active": False}))
    r = httpx.post(proxy.url + "/v1/completions", json=BODY, headers={"x-request-id": "rid-42"})
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "upstream_unreachable" and err["type"] == "upstream_error"
    assert "rid-42" in err["message"]
    for secret in (str(garbage.port), str(closer.port), "127.0.0.1", "aiohttp", "garbage",
                   "be0", "be1", "Error"):  # fmt: skip
        assert secret not in r.text, (secret, r.text)

    (dying,) = fake_backends(1, die_after_chunks=3)
    proxy2 = run_proxy(proxy_config([dying]))
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 10, "stream": True}
    r2 = httpx.post(proxy2.url + "/v1/completions", json=body, timeout=10)
    events = [e for e in r2.text.split("\n\n") if e]
    err2 = orjson.loads(events[3].removeprefix("data: "))["error"]
    assert err2["code"] == "upstream_disconnected"
    assert r2.headers["x-request-id"] in err2["message"]
    for secret in (str(dying.port), "be0", "ClientPayloadError", "aiohttp"):
        assert secret not in err2["message"]


# ---- 12: failures after the request was sent ---------------------------------------------


@pytest.mark.parametrize("retry_after_send", [True, False])
def test_failure_after_send_is_labelled_and_retried_by_policy(
    fake_backends, run_proxy, servers, retry_after_send: bool
) -> None:
    closer = servers(ReadThenClose())
    (good,) = fake_backends(1)
    cfg = proxy_config([closer.url, good], health={"active": False, "failure_threshold": 100})
    cfg["limits"] = {"retry_after_send": retry_after_send}
    proxy = run_proxy(cfg)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        statuses = [c.post("/v1/completions", json=BODY).status_code for _ in range(6)]
    tried = closer.connections
    assert tried >= 3  # round-robin: every other request starts there
    m = scrape(proxy.url)
    assert m.value("lbproxy_upstream_failures_total", backend="be0", cause="reset_after_send") == (
        tried
    )
    assert not [s for s in m.labelsets("lbproxy_upstream_failures_total")
                if s["cause"] == "connect_error"]  # fmt: skip
    if retry_after_send:
        assert statuses == [200] * 6
        assert len(good.received) == 6
        assert m.value("lbproxy_retries_total", cause="reset_after_send") == tried
    else:
        assert sorted(statuses) == [200] * (6 - tried) + [502] * tried
        assert len(good.received) == 6 - tried  # never re-run elsewhere
        assert not m.labelsets("lbproxy_retries_total")


def test_refused_connections_are_retried_even_without_retry_after_send(
    fake_backends, run_proxy
) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    (good,) = fake_backends(1)
    cfg = proxy_config([dead, good], health={"active": False, "failure_threshold": 100})
    cfg["limits"] = {"retry_after_send": False}
    proxy = run_proxy(cfg)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert [c.post("/v1/completions", json=BODY).status_code for _ in range(4)] == [200] * 4
    m = scrape(proxy.url)
    assert m.value("lbproxy_retries_total", backend="be0", cause="connect_error") == 2


# ---- 1b: a body that makes backends fail does not eject them -----------------------------


def _poison_pool(loop_thread, run_proxy, *, all_500: tuple[bool, ...]) -> tuple[Any, list]:
    backends = [
        loop_thread.run(PoisonBackend(name=f"p{i}", all_500=bad).start())
        for i, bad in enumerate(all_500)
    ]
    cfg = proxy_config(backends, health={"failure_threshold": 3, "open_seconds": 30})
    return run_proxy(cfg), backends


def test_poison_bodies_do_not_open_circuits(loop_thread, run_proxy) -> None:
    proxy, backends = _poison_pool(loop_thread, run_proxy, all_500=(False, False, False))
    try:
        poison = {**BODY, "prompt": "POISON"}
        with httpx.Client(base_url=proxy.url, timeout=10) as c:
            answers = [c.post("/v1/completions", json=poison) for _ in range(10)]
            assert [a.status_code for a in answers] == [500] * 10
            # the backend's own OpenAI error is relayed
            assert answers[0].json()["error"]["message"].startswith("Internal Server Error")
            assert sum(len(b.poisoned) for b in backends) == 20  # tried twice, never 3 times
            health = proxy.state.health
            assert health is not None
            eps = proxy.state.pools.pools[0].endpoints
            assert [health.circuit_state(ep) for ep in eps] == ["closed"] * 3
            assert all(ep.healthy for ep in eps)
            assert [c.post("/v1/completions", json=BODY).status_code for _ in range(3)] == [200] * 3
    finally:
        for b in backends:
            loop_thread.run(b.close())


def test_a_backend_failing_everything_is_still_ejected(loop_thread, run_proxy) -> None:
    proxy, backends = _poison_pool(loop_thread, run_proxy, all_500=(False, False, True))
    try:
        with httpx.Client(base_url=proxy.url, timeout=10) as c:
            statuses = [c.post("/v1/completions", json=BODY).status_code for _ in range(15)]
        assert statuses == [200] * 15  # each 500 was retried on a good one
        health = proxy.state.health
        assert health is not None
        eps = proxy.state.pools.pools[0].endpoints
        assert [health.circuit_state(ep) for ep in eps] == ["closed", "closed", "open"]
        assert len(backends[2].poisoned) == 3  # failure_threshold, then no more
        m = scrape(proxy.url)
        assert m.value("lbproxy_backend_ejections_total", backend="be2", reason="failures") == 1
    finally:
        for b in backends:
            loop_thread.run(b.close())
