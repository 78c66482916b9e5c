"""MetricsScraper against real aiohttp servers on 127.0.0.1: good, slow, hanging, broken."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from lbproxy.routing.state import Endpoint
from lbproxy.signals.failure_log import sanitize
from lbproxy.signals.metrics_parser import parse_metrics
from lbproxy.signals.scraper import MetricsScraper, default_metrics_url

FIXTURES = Path(__file__).parent / "fixtures"
CAPTURE = (FIXTURES / "vllm-0.32-metrics.txt").read_text()
SMALL_KV = (FIXTURES / "vllm-0.32-metrics-small-kv.txt").read_text()
SGLANG = (FIXTURES / "sglang-metrics.txt").read_text()
HTML = "<html><body>gateway says hello</body></html>"
BROKEN = 'vllm:num_requests_running{engine="0"} not-a-number\n'


@dataclass
class MetricsServer:
    """One aiohttp server; each path prefix /<name> behaves as `modes[name]` says."""

    base: str = ""
    modes: dict[str, str] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)  # requests parked right now
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def endpoint(self, name: str, mode: str) -> Endpoint:
        self.modes[name] = mode
        return Endpoint(name=name, url=f"{self.base}/{name}")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests[name] = self.requests.get(name, 0) + 1
        mode = self.modes[name]
        if mode in ("slow", "hang"):
            self.waiting[name] = self.waiting.get(name, 0) + 1
            try:
                if mode == "slow":
                    await asyncio.wait_for(self.release.wait(), 4.0)
                else:
                    await self.release.wait()
            except TimeoutError:
                pass
            finally:
                self.waiting[name] -= 1
            return web.Response(text=CAPTURE)
        if mode == "500":
            return web.Response(status=500, text="engine dead")
        if mode == "random":  # a known metric followed by random bytes: a new error each time
            return web.Response(body=_garbage(), content_type="text/plain")
        body = {"capture": CAPTURE, "small": SMALL_KV, "sglang": SGLANG}.get(mode)
        if body is None:
            body = {"html": HTML, "broken": BROKEN}[mode]
        return web.Response(text=body, content_type="text/plain")


@pytest.fixture
async def server() -> AsyncIterator[MetricsServer]:
    srv = MetricsServer()
    app = web.Application()
    app.router.add_get("/{name}/metrics", srv.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    srv.base = f"http://{host}:{port}"
    yield srv
    srv.release.set()
    await runner.cleanup()


@pytest.fixture
async def scrapers() -> AsyncIterator[Callable[..., MetricsScraper]]:
    made: list[MetricsScraper] = []

    def make(endpoints: list[Endpoint], **kwargs: object) -> MetricsScraper:
        s = MetricsScraper(lambda: endpoints, **kwargs)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop()


def _garbage() -> bytes:
    """Random bytes after a metric's name that the parser rejects (about 1 in 1,300 such
    bodies happens to parse, which would be a success in the middle of a failing run)."""
    while True:
        body = b"vllm:num_requests_running{" + os.urandom(300)
        try:
            parse_metrics(body.decode("utf-8", errors="replace"), 0.0)
        except Exception:
            return body


def counting_clock(start: float = 1000.0) -> Callable[[], float]:
    counter = itertools.count()
    return lambda: start + next(counter)


def dead_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_scrape_once_fills_snapshots_and_geometry(server, scrapers) -> None:
    eps = [
        server.endpoint("a", "capture"),
        server.endpoint("b", "small"),
        server.endpoint("c", "sglang"),
    ]
    scraper = scrapers(eps, clock=lambda: 77.0)
    a, b, c = eps
    assert await scraper.scrape_once() == {a: True, b: True, c: True}

    assert a.metrics == parse_metrics(CAPTURE, 77.0)
    assert b.metrics == parse_metrics(SMALL_KV, 77.0)
    assert c.metrics == parse_metrics(SGLANG, 77.0)
    assert (a.block_size, a.num_gpu_blocks) == (128, 8192)
    assert (b.block_size, b.num_gpu_blocks) == (32, 128)
    assert (c.block_size, c.num_gpu_blocks) == (None, None)  # SGLang exports no geometry
    assert c.metrics is not None and c.metrics.num_waiting == 5.0
    assert scraper.successes == {a: 1, b: 1, c: 1}
    assert scraper.errors == {}
    assert scraper.last_success == {a: 77.0, b: 77.0, c: 77.0}


async def test_failures_are_counted_and_keep_the_last_snapshot(server, scrapers) -> None:
    ep = server.endpoint("x", "capture")
    scraper = scrapers([ep], clock=counting_clock())
    assert await scraper.scrape_once() == {ep: True}
    good = ep.metrics
    assert good is not None

    for mode, expect in [
        ("500", "HTTP 500"),
        ("html", "no known metrics"),
        ("broken", "not-a-number"),
    ]:
        server.modes["x"] = mode
        assert await scraper.scrape_once() == {ep: False}
        assert expect in scraper.last_error[ep]
        assert ep.metrics is good  # stale but intact: its age tells how stale

    assert scraper.errors[ep] == 3
    assert scraper.successes[ep] == 1

    server.modes["x"] = "small"
    assert await scraper.scrape_once() == {ep: True}
    assert ep.metrics is not good and ep.metrics.prefix_cache_hits == 8096.0
    assert ep.metrics.time > good.time
    assert scraper.last_success[ep] == ep.metrics.time


async def test_connection_refused_is_an_error(scrapers) -> None:
    ep = Endpoint(name="dead", url=dead_url())
    scraper = scrapers([ep])
    assert await scraper.scrape_once() == {ep: False}
    assert scraper.errors[ep] == 1
    assert "ClientConnectorError" in scraper.last_error[ep]
    assert ep.metrics is None


async def test_slow_and_hanging_endpoints_do_not_delay_others(server, scrapers) -> None:
    fast = [server.endpoint(f"f{i}", "capture") for i in range(3)]
    slow = server.endpoint("slow", "slow")
    hang = server.endpoint("hang", "hang")
    scraper = scrapers([slow, *fast, hang], timeout=1.5)

    round_task = asyncio.create_task(scraper.scrape_once())
    await until(lambda: all(ep.metrics is not None for ep in fast))
    # The fast endpoints are done while the slow and hanging requests are still parked
    # on the server: nobody waited for them.
    assert server.waiting.get("slow") == 1 and server.waiting.get("hang") == 1
    assert not round_task.done()

    result = await round_task
    assert result == {slow: False, fast[0]: True, fast[1]: True, fast[2]: True, hang: False}
    assert scraper.last_error[slow] == scraper.last_error[hang] == "timeout after 1.5s"
    assert slow.metrics is None and hang.metrics is None


async def test_background_loop_keeps_one_request_per_hanging_endpoint(server, scrapers) -> None:
    ok = server.endpoint("ok", "capture")
    hang = server.endpoint("hang", "hang")
    # Timeout longer than the interval: rounds keep coming while the hanging request is
    # outstanding, and must not pile up more requests on it.
    scraper = scrapers([ok, hang], interval=0.02, timeout=30.0)
    await scraper.start()
    await until(lambda: scraper.successes.get(ok, 0) >= 10)
    assert server.requests["hang"] == 1
    assert server.waiting["hang"] == 1
    assert hang.metrics is None
    await scraper.stop()
    assert scraper.rounds >= 10


async def test_endpoint_set_follows_the_provider(server, scrapers) -> None:
    a = server.endpoint("a", "capture")
    b = server.endpoint("b", "500")
    current = [a, b]
    scraper = scrapers([])
    scraper.endpoints_provider = lambda: current
    await scraper.scrape_once()
    assert set(scraper.errors) == {b} and set(scraper.successes) == {a}

    c = server.endpoint("c", "small")
    current = [a, c]  # hot reload: b removed, c added
    assert await scraper.scrape_once() == {a: True, c: True}
    assert b not in scraper.errors and b not in scraper.last_error
    assert c.metrics is not None and scraper.successes == {a: 2, c: 1}


async def test_provider_failure_skips_the_round(scrapers) -> None:
    def broken() -> list[Endpoint]:
        raise RuntimeError("config being reloaded")

    scraper = scrapers([])
    scraper.endpoints_provider = broken
    assert await scraper.scrape_once() == {}


async def test_a_given_session_is_used_and_left_open(server, scrapers) -> None:
    ep = server.endpoint("a", "capture")
    async with aiohttp.ClientSession() as session:
        scraper = scrapers([ep], session=session, interval=0.02)
        await scraper.start()
        await until(lambda: ep.metrics is not None)
        await scraper.stop()
        assert not session.closed
        async with session.get(f"{server.base}/a/metrics") as resp:  # still usable
            assert resp.status == 200


async def test_stop_is_clean_and_idempotent(server, scrapers) -> None:
    ep = server.endpoint("h", "hang")
    scraper = scrapers([ep], interval=0.05, timeout=5.0)
    await scraper.start()
    await until(lambda: server.waiting.get("h") == 1)
    await scraper.stop()  # cancels the in-flight request; the owned session is closed
    await scraper.stop()
    assert scraper._session is None
    assert scraper._inflight == {}


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("http://10.0.0.5:8000", "http://10.0.0.5:8000/metrics"),
        ("http://10.0.0.5:8000/", "http://10.0.0.5:8000/metrics"),
        ("http://10.0.0.5:8000/v1", "http://10.0.0.5:8000/metrics"),
        ("https://host/prefix/v1/", "https://host/prefix/metrics"),
        ("http://host:1/backend-a", "http://host:1/backend-a/metrics"),
    ],
)
def test_default_metrics_url(url: str, want: str) -> None:
    assert default_metrics_url(Endpoint(name="e", url=url)) == want


@pytest.mark.parametrize("kwargs", [{"interval": 0}, {"interval": -1}, {"timeout": 0}])
def test_invalid_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MetricsScraper(list, **kwargs)


def test_default_timeout_is_shorter_than_the_interval() -> None:
    assert MetricsScraper(list, interval=0.5).timeout == pytest.approx(0.4)


# ---- identity, clock and the on_scrape hook ------------------------------------------------


async def test_same_name_in_two_pools_is_two_endpoints(server, scrapers) -> None:
    # Names are unique only within a pool: both gpu-0 must be scraped and counted apart.
    server.modes.update({"pa": "capture", "pb": "500"})
    a = Endpoint(name="gpu-0", url=f"{server.base}/pa", pool="a")
    b = Endpoint(name="gpu-0", url=f"{server.base}/pb", pool="b")
    scraper = scrapers([a, b], clock=lambda: 5.0)
    assert await scraper.scrape_once() == {a: True, b: False}
    assert server.requests == {"pa": 1, "pb": 1}
    assert a.metrics == parse_metrics(CAPTURE, 5.0) and b.metrics is None
    assert scraper.successes == {a: 1} and scraper.errors == {b: 1}
    assert scraper.last_error == {b: "HTTP 500"}

    server.modes["pb"] = "small"
    assert await scraper.scrape_once() == {a: True, b: True}
    assert b.metrics == parse_metrics(SMALL_KV, 5.0)
    assert scraper.successes == {a: 2, b: 1} and scraper.errors == {b: 1}


class OffsetLoop(asyncio.SelectorEventLoop):
    """A loop whose clock is not time.monotonic(), as uvloop's need not be."""

    def time(self) -> float:
        return super().time() + 1e6


def test_snapshots_are_stamped_with_the_loop_clock() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        srv = MetricsServer()
        app = web.Application()
        app.router.add_get("/{name}/metrics", srv.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        srv.base = f"http://{host}:{port}"
        injected, default = srv.endpoint("i", "capture"), srv.endpoint("d", "capture")
        with_clock = MetricsScraper(lambda: [injected], clock=loop.time)
        no_clock = MetricsScraper(lambda: [default])  # default: the running loop's clock
        try:
            before = loop.time()
            await with_clock.scrape_once()
            await no_clock.scrape_once()
            after = loop.time()
        finally:
            await with_clock.stop()
            await no_clock.stop()
            await runner.cleanup()
        for ep, scraper in ((injected, with_clock), (default, no_clock)):
            assert ep.metrics is not None
            assert before <= ep.metrics.time <= after
            assert scraper.last_success[ep] == ep.metrics.time
            # what routing does with its `now`: the snapshot counts as fresh
            assert ep.fresh_metrics(loop.time(), 2.0) is ep.metrics

    with asyncio.Runner(loop_factory=OffsetLoop) as runner:
        runner.run(scenario())


async def test_on_scrape_follows_each_good_scrape(server, scrapers) -> None:
    good = server.endpoint("good", "capture")
    bad = server.endpoint("bad", "500")
    seen: list[tuple[Endpoint, object, int]] = []
    scraper = scrapers([good, bad], clock=counting_clock())
    # What the hook sees: the new snapshot already in place, the success already counted.
    scraper.on_scrape = lambda ep: seen.append((ep, ep.metrics, scraper.successes.get(ep, 0)))

    await scraper.scrape_once()
    assert seen == [(good, good.metrics, 1)]
    assert good.metrics is not None and good.metrics.time == scraper.last_success[good]
    first = good.metrics

    server.modes["good"] = "small"
    await scraper.scrape_once()
    assert len(seen) == 2 and seen[1][0] is good and seen[1][2] == 2
    assert seen[1][1] is good.metrics and good.metrics is not first
    assert good.metrics.block_size == 32 and good.block_size == 32  # geometry set before it

    server.modes["good"] = "500"  # a failed scrape: no call
    await scraper.scrape_once()
    assert len(seen) == 2 and bad not in [ep for ep, _, _ in seen]


async def test_a_failing_on_scrape_hook_is_logged_and_scraping_goes_on(
    server, scrapers, caplog
) -> None:
    ep = server.endpoint("a", "capture")
    calls: list[Endpoint] = []

    def broken(e: Endpoint) -> None:
        calls.append(e)
        raise RuntimeError("hook bug")

    scraper = scrapers([ep], interval=0.02, on_scrape=broken)
    with caplog.at_level("ERROR", logger="lbproxy.signals.scraper"):
        await scraper.start()
        await until(lambda: len(calls) >= 3)
    assert scraper.successes[ep] >= 3 and ep in scraper.successes
    assert scraper._task is not None and not scraper._task.done()
    assert ep not in scraper.errors  # a hook failure is not a scrape failure
    failures = [r for r in caplog.records if "on_scrape hook failed" in r.getMessage()]
    assert len(failures) >= 3 and failures[0].exc_info is not None
    assert "hook bug" in str(failures[0].exc_info[1])


async def test_a_garbage_speaking_backend_does_not_flood_the_log(server, scrapers, caplog) -> None:
    ep = server.endpoint("junk", "random")
    scraper = scrapers([ep], interval=0.02, timeout=2.0)
    with caplog.at_level("DEBUG", logger="lbproxy.signals.scraper"):
        await scraper.start()
        await until(lambda: scraper.errors.get(ep, 0) >= 60, timeout=30)
        await scraper.stop()
        failures = scraper.errors[ep]
        # Every failure is counted (the exported counter), the one cancelled by stop() aside.
        assert failures >= server.requests["junk"] - 1
        failed = [r for r in caplog.records if "of junk failed" in r.getMessage()]
        assert len({r.getMessage() for r in failed}) > 10  # the text changes every time ...
        warnings = [
            r for r in caplog.records if r.levelno >= logging.WARNING and "junk" in r.getMessage()
        ]
        assert 1 <= len(warnings) <= 3, [r.getMessage() for r in warnings]  # ... yet no flood
        for r in caplog.records:  # what the backend sent is quoted only short and printable
            if r.name != "lbproxy.signals.scraper":
                continue
            assert len(r.getMessage()) < 250 and r.getMessage().isascii()
            assert r.getMessage().isprintable()
        assert scraper.last_error[ep] == sanitize(scraper.last_error[ep])

        server.modes["junk"] = "capture"
        caplog.clear()
        await scraper.start()
        await until(lambda: scraper.successes.get(ep, 0) >= 1)
    recovered = [r for r in caplog.records if "of junk recovered" in r.getMessage()]
    assert len(recovered) == 1 and recovered[0].levelno == logging.INFO
    assert f"after {failures} failures" in recovered[0].getMessage()


async def test_a_failing_backend_is_summarised_once_per_period(server, scrapers, caplog) -> None:
    ep = server.endpoint("junk", "random")
    scraper = scrapers([ep], interval=0.02, timeout=2.0)
    scraper.failure_log.every = 0.5
    with caplog.at_level("WARNING", logger="lbproxy.signals.scraper"):
        await scraper.start()
        await until(lambda: len(caplog.records) >= 3, timeout=20)  # 1 + 2 summaries
        await scraper.stop()
    first, *summaries = [r.getMessage() for r in caplog.records if "junk" in r.getMessage()]
    assert "of junk failed: " in first
    assert all("of junk still failing: " in m and " in all; last: " in m for m in summaries)


def test_sanitize_keeps_a_short_printable_line() -> None:
    assert sanitize("HTTP 500") == "HTTP 500"
    assert sanitize("a\x00\x1b[31mb\nc\ufffd d") == "a??[31mb c? d"
    long = sanitize("x" * 1000)
    assert len(long) == 120 and long.endswith("...")
