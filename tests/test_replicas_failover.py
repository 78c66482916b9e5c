"""Two `lbproxy serve` processes sharing Redis: one is killed (SIGKILL) under load, the
other keeps serving and takes the whole backend limit back; the killed one, started
again, rejoins with the shared index."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import proxy_config
from tests.ops_helpers import write_config
from tests.replicas_support import RedisServer, Serve, samples

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def _value(url: str, name: str) -> float:
    return sum(v for _, v in samples(url, name))


def _until(check: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_kill_one_replica_under_load(fake_backends, redis_server, tmp_path: Path) -> None:
    backends = fake_backends(2)
    cfg = proxy_config(
        backends,
        routing="cache-aware",
        flow_control={"limit": {"type": "fixed", "initial": 4}},
        state={"redis": redis_server.url, "heartbeat": 0.2},
    )
    path = write_config(tmp_path / "lbproxy.yaml", cfg)
    a, b = Serve(path), Serve(path)
    started = [a, b]
    try:
        limit = "lbproxy_backend_concurrency_limit"
        assert _until(lambda: _value(b.url, limit) == 2 * 2)  # 4 / 2 replicas, 2 backends
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=b.url, timeout=30) as c:
                k = 0
                while not stop.is_set():
                    body = {"model": "fake-model", "prompt": f"p{k % 7} " * 100, "max_tokens": 1}
                    statuses.append(c.post("/v1/completions", json=body).status_code)
                    k += 1

        t = threading.Thread(target=load)
        t.start()
        time.sleep(1.0)
        a.proc.kill()  # no drain, no goodbye to Redis: its heartbeat just stops
        a.proc.wait(10)
        # b takes the whole limit back once a's heartbeat is three beats old.
        assert _until(lambda: _value(b.url, limit) == 4 * 2, 10)
        time.sleep(0.5)
        stop.set()
        t.join(30)
        assert len(statuses) > 10 and set(statuses) == {200}
        published = _value(b.url, "lbproxy_shared_state_published_total")
        assert published > 0
        # Started again, a reads what b shared while it was gone.
        a2 = Serve(path)
        started.append(a2)
        assert _value(a2.url, "lbproxy_shared_state_applied_total") >= 1
        assert _until(lambda: _value(b.url, limit) == 2 * 2)
    finally:
        for s in started:
            s.stop()
