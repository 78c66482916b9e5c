"""Model discovery against a real server: a garbage answer keeps the models known and is
logged once, not at every round; recovery is logged once."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from lbproxy.config import parse_config
from lbproxy.proxy.pools import PoolTable
from lbproxy.signals.discovery import ModelDiscovery

MODELS = {"object": "list", "data": [{"id": "m1", "object": "model"}]}


@pytest.fixture
async def models_server() -> AsyncIterator[tuple[str, dict[str, str]]]:
    mode = {"answer": "garbage"}

    async def models(request: web.Request) -> web.Response:
        if mode["answer"] == "good":
            return web.json_response(MODELS)
        return web.Response(body=b"{" + os.urandom(200), content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", mode
    await runner.cleanup()


async def test_garbage_is_logged_once_and_recovery_once(models_server, caplog) -> None:
    url, mode = models_server
    cfg = parse_config({"pools": [{"name": "p", "backends": [{"url": url, "name": "g"}]}]})
    pools = PoolTable(cfg, seed=0)
    async with aiohttp.ClientSession() as session:
        discovery = ModelDiscovery(lambda: pools, session, timeout=5)
        with caplog.at_level(logging.DEBUG, logger="lbproxy.discovery"):
            mode["answer"] = "good"
            await discovery.discover_once()
            assert pools.pools[0].discovered_models == {"g": {"m1"}}
            mode["answer"] = "garbage"
            for _ in range(20):
                await discovery.discover_once()
            assert pools.pools[0].discovered_models == {"g": {"m1"}}  # kept
            mode["answer"] = "good"
            await discovery.discover_once()
    records = [r for r in caplog.records if r.name == "lbproxy.discovery"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model discovery of p/g failed: " in warnings[0]
    assert sum("p/g failed" in r.getMessage() for r in records) == 20  # the rest at DEBUG
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert infos == [infos[0]] and "model discovery of p/g recovered after 20 failures" in infos[0]
    for r in records:
        assert r.getMessage().isascii() and r.getMessage().isprintable()
