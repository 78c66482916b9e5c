"""OpenTelemetry tracing of client requests (opt-in: `tracing.enabled`, the `tracing` extra).

This is the only module that uses OpenTelemetry, and it is imported only when tracing is
enabled (lbproxy/proxy/app.py): with tracing off nothing of OpenTelemetry is loaded and the
data path's cost is a few `is not None` checks of a local.

Each client request gets a SERVER span `lbproxy.request` that continues the client's W3C
trace (`traceparent`/`tracestate`) when it sent one, and ends when the response (a stream
included) has been relayed. Each upstream attempt is a CLIENT child span
`lbproxy.upstream`, and the attempt's request to the backend carries that span's
`traceparent` (vLLM continues the trace). Attributes are set when a span ends, from the
request's `Exchange` (the record the metrics and access log are built from), so the data
path does no extra bookkeeping for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from aiohttp import web

    from lbproxy.config import Tracing
    from lbproxy.proxy.pools import PoolTable
    from lbproxy.proxy.request_metrics import Exchange
    from lbproxy.routing.state import Endpoint

log = logging.getLogger("lbproxy.tracing")

# How a relayed response ended (Exchange.ended) that is the backend's failure.
_FAILED_ENDINGS = frozenset({"stream_disconnect", "stream_timeout"})

# Seconds one export may take, and at most what shutdown waits for the last spans (the
# SDK's own wait, 30 s, would hold up lbproxy's exit when the collector is unreachable).
EXPORT_TIMEOUT = 5.0


class RequestTracer:
    """Spans for the data path (Forwarder), with their own TracerProvider: lbproxy does not
    touch OpenTelemetry's global provider, so embedding code keeps its own."""

    def __init__(self, cfg: Tracing) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
            shutdown_on_exit=False,  # `close` does it, with a bounded wait
        )
        # Batches go out from the SDK's thread, never from the event loop; when the
        # collector falls behind, its queue (2048 spans) drops new spans.
        exporter: SpanExporter | None = None
        if cfg.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Headers (auth), certificates, compression: OTEL_EXPORTER_OTLP_* variables.
            exporter = OTLPSpanExporter(endpoint=cfg.endpoint, timeout=EXPORT_TIMEOUT)
        elif cfg.exporter == "console":
            exporter = ConsoleSpanExporter()
        if exporter is not None:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        # (none: spans are made, e.g. for a processor added by embedding code or a test)
        self.tracer = self.provider.get_tracer("lbproxy")
        self.propagator = TraceContextTextMapPropagator()

    async def close(self, timeout: float = EXPORT_TIMEOUT) -> None:
        """Export what is buffered and stop, waiting `timeout` s at most (the SDK's
        shutdown blocks: it runs in a daemon thread that is left behind if it hangs)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def shutdown() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(settle)

        threading.Thread(target=shutdown, name="lbproxy-tracing-close", daemon=True).start()
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            log.warning("tracing: spans not exported within %.0f s of shutdown are lost", timeout)

    def start(self, request: web.Request, ex: Exchange) -> RequestSpan:
        """A client request's span, continuing the client's trace if it sent one."""
        span = self.tracer.start_span(
            "lbproxy.request",
            context=self.propagator.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "url.path": request.path,
                "lbproxy.request_id": ex.request_id,
            },
        )
        return RequestSpan(self, span)


class RequestSpan:
    """One client request's span: its attempts are children, it ends with `finish`."""

    __slots__ = ("attempts", "backend", "errored", "span", "tracer")

    def __init__(self, tracer: RequestTracer, span: Span) -> None:
        self.tracer = tracer
        self.span = span
        self.attempts = 0
        self.backend = ""  # the last attempt's: the one that answered, if any did
        self.errored = False

    def attempt(
        self,
        ep: Endpoint,
        ex: Exchange,
        headers: CIMultiDict[str],
        t_sent: float,
        leg: str = "",
    ) -> tuple[AttemptSpan, CIMultiDict[str]]:
        """Start an upstream attempt's span; returns it and a copy of `headers` carrying
        its traceparent (a client's own traceparent/tracestate give way to the span's, which
        continues the client's trace). `leg`: prefill or decode, in a P/D split."""
        self.attempts += 1
        self.backend = ep.name
        attrs: dict[str, str | int] = {
            "lbproxy.backend": ep.name,
            "url.full": ep.url,
            "lbproxy.attempt": self.attempts,
        }
        if leg:
            attrs["lbproxy.pd.leg"] = leg
        t = self.tracer
        span = t.tracer.start_span(
            "lbproxy.upstream",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes=attrs,
        )
        h = headers.copy()
        h.popall("traceparent", None)
        h.popall("tracestate", None)
        t.propagator.inject(h, context=trace.set_span_in_context(span))
        return AttemptSpan(span, len(ex.causes) if ex.causes else 0, t_sent), h

    def failed(self, error: BaseException) -> None:
        """The request ended in an exception (the client leaving cancels it, for one)."""
        self.span.record_exception(error)
        self.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        self.errored = True

    def finish(self, ex: Exchange, pools: PoolTable) -> None:
        """End the span (the response has been relayed, or lbproxy answered itself)."""
        span = self.span
        if span.is_recording():
            _request_attributes(span, self, ex, pools)
            if not self.errored and (ex.status >= 500 or ex.ended in _FAILED_ENDINGS):
                span.set_status(Status(StatusCode.ERROR, ex.ended or f"HTTP {ex.status}"))
        span.end()


class AttemptSpan:
    """One upstream attempt's span. `causes`: the request's failures before it (a failure
    of this attempt is the one appended after)."""

    __slots__ = ("causes", "span", "t_sent")

    def __init__(self, span: Span, causes: int, t_sent: float) -> None:
        self.span = span
        self.causes = causes
        self.t_sent = t_sent

    def done(self, ex: Exchange, answered: int = 0) -> None:
        """End the span; the outcome is read from the Exchange: a failure cause appended
        since it started, else the relayed response (or the client leaving, a 499).
        `answered`: the status of an answer that was not relayed (a P/D prefill)."""
        span = self.span
        if span.is_recording():
            causes = ex.causes
            if causes and len(causes) > self.causes:
                outcome = causes[-1]
                span.set_status(Status(StatusCode.ERROR, outcome))
            elif answered:
                outcome = "ok"
                span.set_attribute("http.response.status_code", answered)
            elif ex.status:
                outcome = ex.ended or "ok"
                span.set_attribute("http.response.status_code", ex.status)
                if ex.t_first:
                    span.set_attribute("lbproxy.ttfb_s", ex.t_first - self.t_sent)
                if ex.status >= 500 or outcome in _FAILED_ENDINGS:
                    span.set_status(Status(StatusCode.ERROR, outcome))
            else:  # an exception the data path did not expect
                outcome = "error"
                span.set_status(Status(StatusCode.ERROR, outcome))
            span.set_attribute("lbproxy.outcome", outcome)
        span.end()


def _request_attributes(span: Span, rs: RequestSpan, ex: Exchange, pools: PoolTable) -> None:
    attrs: dict[str, str | bool | int | float | list[str] | list[float]] = {
        "http.response.status_code": ex.status,
        "lbproxy.attempts": rs.attempts,
    }
    if rs.backend:
        attrs["lbproxy.backend"] = rs.backend
    if ex.model:
        attrs["lbproxy.model"] = ex.model
    if ex.pool:
        attrs["lbproxy.pool"] = ex.pool
        pool = pools.for_model(ex.model)
        if pool is not None:
            attrs["lbproxy.route.profile"] = pool.router.profile_name
    if ex.ended:
        attrs["lbproxy.ended"] = ex.ended
    attrs["lbproxy.stream"] = ex.stream
    if ex.queue_wait is not None:
        attrs["lbproxy.queue_wait_s"] = ex.queue_wait
    if ex.causes:
        attrs["lbproxy.failures"] = list(ex.causes)
    d = ex.decision
    if d is not None:
        chosen = d.endpoint
        i = d.candidates.index(chosen) if chosen in d.candidates else -1
        attrs["lbproxy.route.backend"] = chosen.name
        attrs["lbproxy.route.candidates"] = [ep.name for ep in d.candidates]
        attrs["lbproxy.route.totals"] = list(d.total_list)
        if i >= 0:
            attrs["lbproxy.route.total"] = d.total_list[i]
            for scorer, values in d.score_lists:
                attrs[f"lbproxy.route.score.{scorer}"] = values[i]
        if d.reason:
            attrs["lbproxy.route.reason"] = d.reason
    if ex.pd is not None:
        for k, v in ex.pd.items():
            if isinstance(v, str | bool | int | float):
                attrs[f"lbproxy.pd.{k}"] = v
            elif isinstance(v, dict) and "backend" in v:  # a leg's decision
                attrs[f"lbproxy.pd.{k}.backend"] = v["backend"]
    if ex.t_first:
        attrs["lbproxy.ttft_s"] = ex.t_first - ex.t0
        # The first byte as an event at its time (loop time -> wall clock, in ns).
        ago = asyncio.get_running_loop().time() - ex.t_first
        span.add_event("first_byte", timestamp=time.time_ns() - int(ago * 1e9))
    span.set_attributes(attrs)
