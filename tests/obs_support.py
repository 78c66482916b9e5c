"""Test doubles shared by the observability tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.conftest import LoopThread
from tests.fake_backend import FakeBackend


@dataclass
class HealthyButFailing(FakeBackend):
    """Passes health checks but fails every POST: with `fail_status`, or (drop=True) by
    closing the connection before any response."""

    drop: bool = False

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _post(self, request: web.Request) -> web.StreamResponse:
        if self.drop:
            await request.read()
            self.received.append(None)  # type: ignore[arg-type]
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("dropped on purpose")
        return await super()._post(request)


def failing_backend_factory(
    loop_thread: LoopThread,
) -> Iterator[Callable[..., HealthyButFailing]]:
    """Body of a `failing_backends` fixture: yields a factory, closes what it started."""
    started: list[FakeBackend] = []

    def make(**kwargs: Any) -> HealthyButFailing:
        fb = loop_thread.run(HealthyButFailing(name=f"f{len(started)}", **kwargs).start())
        started.append(fb)
        return fb

    yield make
    for fb in started:
        loop_thread.run(fb.close())
