"""Shared fixtures: an event loop in a background thread hosting real servers.

Servers (fake backends, simulators, lbproxy) run in that loop so that tests can use the
official openai client both synchronously and asynchronously against them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lbproxy.config import parse_config
from lbproxy.proxy.app import RunningProxy, start_proxy
from tests.fake_backend import FakeBackend

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def fake_backends(loop_thread: LoopThread) -> Iterator[Callable[..., list[FakeBackend]]]:
    started: list[FakeBackend] = []

    def make(n: int, **kwargs: Any) -> list[FakeBackend]:
        out = []
        for _i in range(n):
            fb = loop_thread.run(FakeBackend(name=f"b{len(started)}", **kwargs).start())
            started.append(fb)
            out.append(fb)
        return out

    yield make
    for fb in started:
        loop_thread.run(fb.close())


def proxy_config(backends: list[FakeBackend] | list[str], **overrides: Any) -> dict[str, Any]:
    """A one-pool config over the given backends (objects or URLs) for model fake-model."""
    urls = [b if isinstance(b, str) else b.url for b in backends]
    pool: dict[str, Any] = {
        "name": "main",
        "models": ["fake-model"],
        "routing": overrides.pop("routing", "round-robin"),
        "backends": [{"url": u, "name": f"be{i}"} for i, u in enumerate(urls)],
    }
    for key in ("weights",):
        if key in overrides:
            for b, w in zip(pool["backends"], overrides.pop(key), strict=True):
                b["weight"] = w
    cfg: dict[str, Any] = {"listen": {"host": "127.0.0.1", "port": 0}, "pools": [pool]}
    cfg.update(overrides)
    return cfg


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A module that lists PROXY_FACES runs each of its tests against each face: lbproxy's
    # own server ("native") and its ASGI app under uvicorn ("asgi", lbproxy/asgi.py).
    faces = getattr(metafunc.module, "PROXY_FACES", None)
    if faces and "face" in metafunc.fixturenames:
        metafunc.parametrize("face", faces, indirect=True)


@pytest.fixture
def face(request: pytest.FixtureRequest) -> str:
    """Which server run_proxy starts: "native" unless the module lists PROXY_FACES."""
    return str(getattr(request, "param", "native"))


@pytest.fixture
def run_proxy(
    loop_thread: LoopThread, face: str
) -> Iterator[Callable[[dict[str, Any]], RunningProxy]]:
    started: list[Any] = []

    def make(cfg: dict[str, Any]) -> RunningProxy:
        config = parse_config(cfg, "test-config")
        if face == "asgi":
            from tests.asgi_face import start_asgi_proxy

            proxy: Any = loop_thread.run(start_asgi_proxy(config, seed=0))
        else:
            proxy = loop_thread.run(start_proxy(config, seed=0))
        started.append(proxy)
        return proxy  # type: ignore[no-any-return]

    yield make
    for p in started:
        loop_thread.run(p.close())


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """`workers(cfg, n=2)`: `lbproxy serve --workers n` on `cfg` (a `replicas_support.Serve`),
    stopped after the test."""
    from tests.ops_helpers import write_config
    from tests.replicas_support import Serve

    started: list[Serve] = []

    def make(cfg: dict[str, Any], n: int = 2) -> Serve:
        path = write_config(tmp_path / "lbproxy.yaml", cfg)
        s = Serve(path, "--workers", str(n), listening=n)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()
