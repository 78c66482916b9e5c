"""Flow control across replicas: each live replica takes its share of a backend's limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest

from lbproxy.config import parse_config
from lbproxy.proxy.app import start_proxy
from tests.conftest import LoopThread, proxy_config
from tests.replicas_support import RedisServer, samples


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def _limit(url: str) -> float:
    return sum(v for _, v in samples(url, "lbproxy_backend_concurrency_limit"))


def test_each_live_replica_takes_its_share(fake_backends, loop_thread: LoopThread, redis_server):
    (b0,) = fake_backends(1, stall_before_headers=1.0)
    cfg = proxy_config(
        [b0],
        flow_control={"limit": {"type": "fixed", "initial": 4}},
        state={"redis": redis_server.url, "heartbeat": 0.2},
    )
    a = loop_thread.run(start_proxy(parse_config(cfg, "a"), seed=1))
    b = loop_thread.run(start_proxy(parse_config(cfg, "b"), seed=2))
    try:
        deadline = time.monotonic() + 10
        while _limit(a.url) != 2:  # 4 / 2 live replicas
            assert time.monotonic() < deadline, _limit(a.url)
            time.sleep(0.1)

        async def burst() -> list[int]:
            body = {"model": "fake-model", "prompt": "x", "max_tokens": 1}
            async with aiohttp.ClientSession() as s:

                async def one() -> int:
                    async with s.post(a.url + "/v1/completions", json=body) as r:
                        await r.read()
                        return r.status

                return await asyncio.gather(*(one() for _ in range(6)))

        assert loop_thread.run(burst()) == [200] * 6
        assert b0.max_active == 2  # replica a kept to its half of the backend's 4
        loop_thread.run(b.close())  # b leaves: a takes the whole limit again
        deadline = time.monotonic() + 10
        while _limit(a.url) != 4:
            assert time.monotonic() < deadline, _limit(a.url)
            time.sleep(0.1)
    finally:
        loop_thread.run(a.close())
        loop_thread.run(b.close())
