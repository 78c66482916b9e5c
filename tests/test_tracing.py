"""OpenTelemetry tracing: a span per request, one child span per upstream attempt, W3C
traceparent to the backend; with tracing off, no OpenTelemetry at all.

A real lbproxy (tracing enabled, exporter `none`) in front of fake backends; the spans are
collected by the SDK's in-memory exporter added to the proxy's own TracerProvider.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from lbproxy.config import ConfigError, parse_config
from lbproxy.proxy.app import RunningProxy, start_proxy
from tests.conftest import proxy_config
from tests.fake_backend import FakeBackend
from tests.ops_helpers import RawServer
from tests.test_pd_routing import LONG, pd_config, sims  # noqa: F401 (sims: a fixture)
from tests.test_pd_routing import MODEL as PD_MODEL

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
TRACING = {"enabled": True, "exporter": "none", "service_name": "lbproxy-test"}
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"


def _traced_proxy(
    run_proxy: Callable[[dict[str, Any]], RunningProxy], cfg: dict[str, Any]
) -> tuple[RunningProxy, InMemorySpanExporter]:
    proxy = run_proxy(cfg)
    forwarder = proxy.state.forwarder
    assert forwarder is not None and forwarder.tracer is not None
    exporter = InMemorySpanExporter()
    forwarder.tracer.provider.add_span_processor(SimpleSpanProcessor(exporter))
    return proxy, exporter


def _request_spans(exporter: InMemorySpanExporter, n: int = 1) -> list[ReadableSpan]:
    """The finished request spans, once `n` of them are there (a span ends just after the
    response's last byte is written: poll, with a deadline for a busy machine)."""
    deadline = time.monotonic() + 5
    while True:
        spans = [s for s in exporter.get_finished_spans() if s.name == "lbproxy.request"]
        if len(spans) >= n or time.monotonic() > deadline:
            assert len(spans) == n, [s.name for s in exporter.get_finished_spans()]
            return spans


def _children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    out = [
        s
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]
    return sorted(out, key=lambda s: s.attributes["lbproxy.attempt"])  # type: ignore[index]


def _traceparent(backend: FakeBackend, i: int = -1) -> tuple[str, str, str]:
    """(trace id, parent span id, flags) of the traceparent the backend received."""
    headers = {k.lower(): v for k, v in backend.received[i].headers.items()}
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16
    return trace_id, span_id, flags


def test_non_stream_request_span_and_attempt(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    cfg = proxy_config([backend], routing="least-request", tracing=TRACING)
    proxy, exporter = _traced_proxy(run_proxy, cfg)
    r = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert r.status_code == 200

    (span,) = _request_spans(exporter)
    assert span.kind == SpanKind.SERVER
    assert span.resource.attributes["service.name"] == "lbproxy-test"
    a = span.attributes
    assert a is not None
    assert a["http.response.status_code"] == 200
    assert a["url.path"] == "/v1/chat/completions"
    assert a["lbproxy.pool"] == "main"
    assert a["lbproxy.model"] == "fake-model"
    assert a["lbproxy.route.profile"] == "least-request"
    assert a["lbproxy.route.backend"] == "be0"
    assert a["lbproxy.route.candidates"] == ("be0",)
    assert a["lbproxy.route.total"] == a["lbproxy.route.totals"][0]  # type: ignore[index]
    assert "lbproxy.route.score.least-request" in a
    assert a["lbproxy.attempts"] == 1
    assert a["lbproxy.stream"] is False
    assert a["lbproxy.ended"] == "ok"
    assert 0 < a["lbproxy.ttft_s"] < 5  # type: ignore[operator]
    assert a["lbproxy.queue_wait_s"] == 0  # flow control (on by default) let it go at once
    assert span.status.status_code == StatusCode.UNSET
    assert [e.name for e in span.events] == ["first_byte"]

    (attempt,) = _children(exporter, span)
    assert attempt.kind == SpanKind.CLIENT
    assert attempt.attributes is not None
    assert attempt.attributes["lbproxy.backend"] == "be0"
    assert attempt.attributes["lbproxy.outcome"] == "ok"
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.attributes["lbproxy.ttfb_s"] > 0  # type: ignore[operator]
    # The backend got the attempt span's context: same trace, the attempt as parent.
    trace_id, parent_id, flags = _traceparent(backend)
    assert span.context is not None and attempt.context is not None
    assert trace_id == f"{span.context.trace_id:032x}"
    assert parent_id == f"{attempt.context.span_id:016x}"
    assert int(flags, 16) & 1 == 1  # sampled


def test_stream_span_ends_with_the_stream(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1, chunk_delay=0.05)
    proxy, exporter = _traced_proxy(run_proxy, proxy_config([backend], tracing=TRACING))
    body = {**CHAT, "stream": True, "max_tokens": 6}
    t0 = time.monotonic()
    with (
        httpx.Client(timeout=10) as c,
        c.stream("POST", proxy.url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        text = r.read().decode()
    assert "[DONE]" in text
    elapsed = time.monotonic() - t0

    (span,) = _request_spans(exporter)
    a = span.attributes
    assert a is not None
    assert a["lbproxy.stream"] is True
    assert a["lbproxy.ended"] == "ok"
    assert a["lbproxy.route.profile"] == "round-robin"
    # The span covers the stream (6 chunks 50 ms apart), not only its headers.
    assert span.end_time is not None and span.start_time is not None
    duration = (span.end_time - span.start_time) / 1e9
    assert 0.25 < duration <= elapsed + 1
    assert 0 < a["lbproxy.ttft_s"] < duration  # type: ignore[operator]


def test_backend_dying_mid_stream_is_an_error_span(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1, die_after_chunks=2)
    proxy, exporter = _traced_proxy(run_proxy, proxy_config([backend], tracing=TRACING))
    body = {**CHAT, "stream": True, "max_tokens": 20}
    with (
        httpx.Client(timeout=10) as c,
        c.stream("POST", proxy.url + "/v1/chat/completions", json=body) as r,
    ):
        text = r.read().decode()
    assert "upstream_disconnected" in text  # the SSE error event lbproxy wrote
    (span,) = _request_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["lbproxy.ended"] == "stream_disconnect"
    assert span.status.status_code == StatusCode.ERROR
    (attempt,) = _children(exporter, span)
    assert attempt.attributes is not None
    assert attempt.attributes["lbproxy.outcome"] == "stream_disconnect"
    assert attempt.status.status_code == StatusCode.ERROR


def test_retry_is_two_attempt_spans(fake_backends, run_proxy) -> None:
    failing = fake_backends(1, fail_status=503)[0]
    good = fake_backends(1)[0]
    cfg = proxy_config([failing, good], health={"active": False}, tracing=TRACING)
    proxy, exporter = _traced_proxy(run_proxy, cfg)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for _ in range(2):  # round-robin: one of two starts at the failing backend
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
    spans = _request_spans(exporter, 2)
    (retried,) = [s for s in spans if s.attributes and s.attributes["lbproxy.attempts"] == 2]
    assert retried.attributes is not None
    assert retried.attributes["lbproxy.failures"] == ("status_5xx",)
    assert retried.attributes["http.response.status_code"] == 200
    assert retried.attributes["lbproxy.backend"] == "be1"  # the one that answered
    first, second = _children(exporter, retried)
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["lbproxy.backend"] == "be0"
    assert first.attributes["lbproxy.outcome"] == "status_5xx"
    assert first.status.status_code == StatusCode.ERROR
    assert second.attributes["lbproxy.backend"] == "be1"
    assert second.attributes["lbproxy.outcome"] == "ok"
    # Each backend saw its own attempt's span as the parent, in the request's trace.
    assert retried.context is not None
    for backend, attempt in ((failing, first), (good, second)):
        assert attempt.context is not None
        sent = [_traceparent(backend, i)[:2] for i in range(len(backend.received))]
        assert (f"{retried.context.trace_id:032x}", f"{attempt.context.span_id:016x}") in sent


def test_queue_wait_of_flow_control(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1, stall_before_headers=0.5)
    flow = {"limit": {"type": "fixed", "initial": 1, "min": 1}}
    cfg = proxy_config([backend], flow_control=flow, tracing=TRACING)
    proxy, exporter = _traced_proxy(run_proxy, cfg)

    def post(_: int) -> int:
        return httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code

    with ThreadPoolExecutor(2) as pool:  # one waits for the other (limit 1)
        assert list(pool.map(post, range(2))) == [200, 200]
    waits = sorted(s.attributes["lbproxy.queue_wait_s"] for s in _request_spans(exporter, 2))  # type: ignore[index]
    assert waits[0] < 0.3
    assert waits[1] >= 0.3


def test_client_traceparent_is_continued(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    proxy, exporter = _traced_proxy(run_proxy, proxy_config([backend], tracing=TRACING))
    headers = {
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01",
        "tracestate": "vendor=abc",
    }
    r = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
    assert r.status_code == 200
    (span,) = _request_spans(exporter)
    assert span.context is not None and span.parent is not None
    assert f"{span.context.trace_id:032x}" == CLIENT_TRACE
    assert f"{span.parent.span_id:016x}" == CLIENT_PARENT
    (attempt,) = _children(exporter, span)
    assert attempt.context is not None
    trace_id, parent_id, _ = _traceparent(backend)
    assert trace_id == CLIENT_TRACE
    assert parent_id == f"{attempt.context.span_id:016x}"  # lbproxy's hop, not the client's
    got = {k.lower(): v for k, v in backend.received[-1].headers.items()}
    assert got["tracestate"] == "vendor=abc"


def test_unsampled_trace_still_propagates(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1)
    tracing = {**TRACING, "sample_ratio": 0.0}
    proxy, exporter = _traced_proxy(run_proxy, proxy_config([backend], tracing=tracing))
    r = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert r.status_code == 200
    time.sleep(0.2)
    assert exporter.get_finished_spans() == ()
    _trace_id, _parent, flags = _traceparent(backend)
    assert int(flags, 16) & 1 == 0  # the backend learns the trace is not sampled


def test_lbproxy_errors_end_the_span_with_their_status(fake_backends, run_proxy) -> None:
    (backend,) = fake_backends(1, fail_status=503)
    proxy, exporter = _traced_proxy(run_proxy, proxy_config([backend], tracing=TRACING))
    r = httpx.post(proxy.url + "/v1/chat/completions", json={**CHAT, "model": "x"}, timeout=10)
    assert r.status_code == 404
    r = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert r.status_code == 503  # the last backend's answer is relayed
    missing, failed = sorted(
        _request_spans(exporter, 2),
        key=lambda s: s.attributes["http.response.status_code"],  # type: ignore[index]
    )
    assert missing.status.status_code == StatusCode.UNSET  # a client error is not ours
    assert missing.attributes is not None and missing.attributes["lbproxy.attempts"] == 0
    assert failed.status.status_code == StatusCode.ERROR


class HangingCollector(RawServer):
    """An OTLP endpoint that reads the export and never answers (the connection is closed
    when the exporter gives up, or when the collector closes)."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            while await reader.read(1 << 20):
                pass  # never answered: the exporter gives up and closes


def test_otlp_export_and_a_hanging_collector_do_not_hold_up_shutdown(
    fake_backends, loop_thread
) -> None:
    (backend,) = fake_backends(1)
    collector = loop_thread.run(HangingCollector().start())
    tracing = {"enabled": True, "endpoint": collector.url + "/v1/traces"}  # exporter: otlp
    cfg = proxy_config([backend], tracing=tracing)
    proxy = loop_thread.run(start_proxy(parse_config(cfg, "t.yaml"), seed=0))
    try:
        r = httpx.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200  # the request does not wait for the export
        t0 = time.monotonic()
        loop_thread.run(proxy.close(), timeout=60)
        closed_in = time.monotonic() - t0
    finally:
        loop_thread.run(collector.close())
    assert collector.connections >= 1  # the span went out over OTLP/HTTP at shutdown
    # The SDK alone would wait 30 s (its exporter: 10 s); lbproxy waits 5 s at most.
    assert closed_in < 9


def test_bad_tracing_endpoint_is_a_config_error(fake_backends) -> None:
    cfg = proxy_config(["http://127.0.0.1:1"], tracing={"enabled": True, "endpoint": "nope"})
    with pytest.raises(ConfigError, match=r"tracing\.endpoint: must start with http://"):
        parse_config(cfg, "t.yaml")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_enabled_without_opentelemetry_says_what_to_install() -> None:
    out = _run(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if it were not installed
        from lbproxy.config import ConfigError, parse_config
        cfg = {"pools": [{"name": "p", "models": ["m"], "backends": [{"url": "http://h:1"}]}],
               "tracing": {"enabled": True}}
        try:
            parse_config(cfg, "t.yaml")
        except ConfigError as e:
            print(e)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "tracing.enabled" in out.stdout
    assert "pip install 'lbproxy[tracing]'" in out.stdout


def test_off_imports_no_opentelemetry_and_adds_no_traceparent() -> None:
    """Tracing off (the default), in a fresh interpreter: a request through lbproxy loads
    no opentelemetry module and the backend gets no traceparent; a client's own one passes
    through unchanged."""
    out = _run(
        """
        import asyncio, sys
        import httpx
        from lbproxy.config import parse_config
        from lbproxy.proxy.app import start_proxy
        from tests.conftest import proxy_config
        from tests.fake_backend import FakeBackend

        async def main():
            backend = await FakeBackend(name="b").start()
            proxy = await start_proxy(parse_config(proxy_config([backend]), "t"), seed=0)
            assert proxy.state.forwarder.tracer is None
            body = {"model": "fake-model", "prompt": "x", "max_tokens": 2}
            async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as c:
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200
                tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                r = await c.post("/v1/completions", json=body, headers={"traceparent": tp})
                assert r.status_code == 200
            await proxy.close()
            await backend.close()
            first = {k.lower(): v for k, v in backend.received[0].headers.items()}
            second = {k.lower(): v for k, v in backend.received[1].headers.items()}
            print("traceparent" in first, second.get("traceparent") == tp)
            otel = ("opentelemetry", "lbproxy.proxy.tracing")
            loaded = [m for m in sys.modules if m.startswith(otel)]
            print(sorted(loaded))

        asyncio.run(main())
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["False True", "[]"]


def test_pd_legs_are_attempt_spans(sims, run_proxy) -> None:  # noqa: F811
    pre, dec = sims("producer"), sims("consumer")
    cfg = pd_config([(pre.url, "prefill"), (dec.url, "decode")])
    proxy, exporter = _traced_proxy(run_proxy, {**cfg, "tracing": TRACING})
    body = {"model": PD_MODEL, "prompt": LONG, "max_tokens": 3}
    r = httpx.post(proxy.url + "/v1/completions", json=body, timeout=20)
    assert r.status_code == 200
    (span,) = _request_spans(exporter)
    a = span.attributes
    assert a is not None
    assert a["lbproxy.pd.mode"] == "disaggregated"
    assert a["lbproxy.pd.prefill.backend"] == "prefill0"
    assert a["lbproxy.pd.decode.backend"] == "decode1"
    assert a["lbproxy.attempts"] == 2
    prefill, decode = _children(exporter, span)
    assert prefill.attributes is not None and decode.attributes is not None
    assert prefill.attributes["lbproxy.pd.leg"] == "prefill"
    assert prefill.attributes["lbproxy.backend"] == "prefill0"
    assert prefill.attributes["lbproxy.outcome"] == "ok"
    assert decode.attributes["lbproxy.pd.leg"] == "decode"
    assert decode.attributes["lbproxy.outcome"] == "ok"
    assert decode.attributes["http.response.status_code"] == 200
