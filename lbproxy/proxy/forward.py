"""The data path: read the body once, route, forward byte-for-byte, relay as it arrives.

The request body is parsed (orjson) only to learn what routing needs and is forwarded
as the exact bytes the client sent. Response bytes, SSE included, are relayed as they
arrive, never re-framed. Before the first byte reaches the client a failed backend is
retried on the next one in the decision's ranking; after it, a failure ends an SSE
stream with an error event (any other body is cut by closing the connection, so the
client sees a truncated body rather than a complete-looking one).

The upstream leg is lbproxy/proxy/upstream.py (asyncio.Protocol, httptools, keep-alive
pools): the body bytes of each read from a backend are written to the client's transport
from the protocol's callback (`_BodyRelay`), with no coroutine per chunk; while the
client's write buffer is over its high-water mark, reading from the backend is paused.

With client keys configured (`auth`), a request is admitted before its body is read (one
constant-time check, and a per-key in-flight count when limited). Every attempt's outcome
goes to the circuit breaker (`record_outcome`, see `signals.health`), and when it got its
first body byte (or none) to stall detection (`progress`).

What counts against a backend: failures to connect, failures after the request was sent
(reset, garbage, no answer in time) and a 5xx that another backend does not repeat. A 5xx
answered by two backends to the same body is the request's doing: the second answer is
relayed, neither is counted and nothing more is tried (a client must not be able to eject
backends with bodies that make them fail). A failure after the request was sent is
retried only with `limits.retry_after_send` (the backend may have run it).

Clients see no backend internals: errors lbproxy writes carry a generic message and the
request id; which backend failed, and how, goes to the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from lbproxy.config import Config
from lbproxy.proxy.client_io import ClientRequest, ResponseSink
from lbproxy.proxy.disagg import serve_disaggregated
from lbproxy.proxy.errors import (
    BadRequest,
    BodyTooLarge,
    ModelNotFound,
    NoBackend,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
    sse_error_event,
)
from lbproxy.proxy.flow_gate import Overloaded
from lbproxy.proxy.headers import downstream_headers, upstream_headers
from lbproxy.proxy.prompt_ids import prepare_token_ids
from lbproxy.proxy.request_id import client_request_id
from lbproxy.proxy.request_metrics import Exchange, ProxyMetrics
from lbproxy.proxy.upstream import UpstreamClient, UpstreamResponse
from lbproxy.proxy.upstream_failure import failure_cause as _failure_cause
from lbproxy.routing.prompt import asked_output_tokens
from lbproxy.routing.state import Endpoint, RequestContext

if TYPE_CHECKING:  # imported only when tracing is on (it loads OpenTelemetry)
    from lbproxy.proxy.runtime import HasRuntime, Runtime
    from lbproxy.proxy.tracing import AttemptSpan, RequestSpan, RequestTracer

log = logging.getLogger("lbproxy.proxy")

_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(slots=True)
class ForwardSettings:
    max_attempts: int = 3
    connect_timeout: float = 5.0
    first_byte_timeout: float = 600.0
    idle_timeout: float = 300.0
    request_id_header: str = "x-request-id"
    session_header: str = "x-session-id"
    expose_backend_header: bool = False
    retry_after_send: bool = True
    # The P/D decode leg's (disagg.py), made from the above.
    decode_timeout: aiohttp.ClientTimeout = field(init=False)

    def __post_init__(self) -> None:
        self.decode_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout, sock_read=self.first_byte_timeout
        )

    @classmethod
    def from_config(cls, cfg: Config) -> ForwardSettings:
        return cls(
            max_attempts=cfg.limits.max_attempts,
            connect_timeout=cfg.timeouts.connect,
            first_byte_timeout=cfg.timeouts.first_byte,
            idle_timeout=cfg.timeouts.idle,
            request_id_header=cfg.request_id_header,
            session_header=cfg.session_header,
            expose_backend_header=cfg.expose_backend_header,
            retry_after_send=cfg.limits.retry_after_send,
        )


def _no_breaker(ep: Endpoint, ok: bool) -> None:
    pass


class ProgressHooks:
    """Where first bytes are reported (`signals.health.HealthChecker` in the proxy): one
    `sent` per attempt, then exactly one of `first_byte` and `unanswered`."""

    def sent(self, ep: Endpoint, t: float) -> None:
        pass

    def first_byte(self, ep: Endpoint, t_sent: float, t: float) -> None:
        pass

    def unanswered(self, ep: Endpoint, t_sent: float, t: float, abandoned: bool) -> None:
        pass


def _dot_segment(path: str) -> bool:
    # `/v1/../x` (or %2e%2e) would reach a backend's non-OpenAI routes once the client
    # library normalises the URL: never forward one.
    return any(seg in (".", "..") for seg in path.split("/"))


class Forwarder:
    """Holds what the data path needs; `handle` serves a /v1/* POST, read by either
    server (client_io.ClientRequest). What comes from the config (pools, settings, client
    keys) is read from `state.runtime` once per request (lbproxy/proxy/runtime.py)."""

    def __init__(
        self,
        state: HasRuntime,
        session: UpstreamClient,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.state = state
        self.obs = metrics if metrics is not None else ProxyMetrics()
        # The upstream client (lbproxy/proxy/upstream.py); `session.post` has aiohttp's
        # shape for the P/D legs (disagg.py).
        self.session = session
        self.configure_upstream(state.runtime.settings)
        self.retries = 0  # attempts beyond the first, all requests
        # The circuit breaker's `record(ep, ok)`, told the outcome of every attempt.
        self.record_outcome: Callable[[Endpoint, bool], None] = _no_breaker
        self.progress: ProgressHooks = ProgressHooks()
        # OpenTelemetry spans (lbproxy/proxy/tracing.py); None: tracing is off.
        self.tracer: RequestTracer | None = None

    def configure_upstream(self, settings: ForwardSettings) -> None:
        """The upstream client's timeouts (at start and when a reload swaps the runtime)."""
        up = self.session
        up.connect_timeout = settings.connect_timeout
        up.first_byte_timeout = settings.first_byte_timeout
        up.idle_timeout = settings.idle_timeout

    async def handle(self, request: ClientRequest) -> Any:
        """Serve `request`; returns an unsent web.Response (an error lbproxy answers) or
        the result of the response sink the body went through."""
        rt = self.state.runtime  # this request's snapshot, to its end
        s = rt.settings
        request_id = client_request_id(request.headers.get(s.request_id_header))
        # The request's one clock read before its response: latency origin and routing's now.
        ex = Exchange(asyncio.get_running_loop().time(), request_id, request.path)
        id_header = {s.request_id_header: request_id}
        auth = rt.auth
        slot = None
        tracer = self.tracer
        rs = None if tracer is None else tracer.start(request, ex)
        try:
            if auth is not None:
                slot = auth.admit(request)
            return await self._handle(request, rt, request_id, ex, rs)
        except ProxyError as e:
            if isinstance(e, Overloaded):
                ex.queue_wait = e.waited
            self.obs.rejected(ex, e.status, e.code, request)
            return e.response(id_header)
        except BaseException as e:  # for the span only (costs nothing unless raised)
            if rs is not None:
                rs.failed(e)
            raise
        finally:
            if slot is not None and auth is not None:
                auth.release(slot)
            if rs is not None:
                rs.finish(ex, rt.pools)

    async def _handle(
        self,
        request: ClientRequest,
        rt: Runtime,
        request_id: str,
        ex: Exchange,
        rs: RequestSpan | None,
    ) -> Any:
        s = rt.settings
        if "/." in request.path and _dot_segment(request.path):
            raise BadRequest("the request path must not contain '.' or '..' segments")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(
                f"request body exceeds the limit of {request.client_max_size} bytes"
            ) from None
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise BadRequest("request body must be a JSON object")
        model = parsed.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required and must be a non-empty string", param="model")
        ex.model = model
        pool = rt.pools.for_model(model)
        if pool is None:
            served = rt.pools.served_models()
            raise ModelNotFound(
                f"The model '{model}' does not exist. Served models: {', '.join(served) or 'none'}",
                param="model",
            )
        ex.pool = pool.name

        ctx = RequestContext(
            model=model,
            body=parsed,
            route=request.path,
            session_key=request.headers.get(s.session_header),
            request_id=request_id,
            # flow control's ramp and prefix-hash's footprint read it
            max_tokens=asked_output_tokens(parsed) or None,
        )
        if pool.routing_tokenizer is not None:  # precise-prefix: token ids, off the loop
            await prepare_token_ids(pool.routing_tokenizer, ctx)
        headers = upstream_headers(request.headers, s.request_id_header, request_id)
        if rt.auth is not None and not rt.auth.forward_client_key:
            headers.popall("Authorization", None)  # the client's key is lbproxy's business
        now = ex.t0
        progress = self.progress
        if pool.disagg is not None:  # a P/D pool: split, unless the decision says not to
            pd_resp, pd_progress = await serve_disaggregated(
                self, s, request, parsed, ctx, headers, pool, ex, now, rs
            )
            if pd_resp is not None:
                return pd_resp
            if pd_progress is not None:  # counts its prefill on a role-both backend
                progress = pd_progress
        gate = pool.gate
        if gate is None:
            decision = pool.router.route(ctx, pool.serving, now)
            if decision is None:
                raise NoBackend(f"no healthy backend in pool '{pool.name}' for model '{model}'")
            decision.endpoint.in_flight += 1
        else:  # flow control: may wait; the chosen backend comes counted in in_flight
            priority, flow = gate.classify(request.headers)
            # ~4 bytes of body per prompt token: an upper bound of the KV it takes at once.
            tokens = len(body) >> 2
            decision, ex.queue_wait = await gate.acquire(ctx, priority, flow, now, tokens)
        self.obs.routed(ex, decision)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "route %s model=%s pool=%s profile=%s -> %s totals=%s scores=%s %s",
                request_id,
                model,
                pool.name,
                pool.router.profile_name,
                decision.endpoint.name,
                decision.totals,
                decision.scores,
                decision.reason,
            )

        upstream_auth = pool.upstream_auth  # per-backend keys, usually none
        url_tail = request.raw_target
        failures: list[str] = []  # for the log only, never for the client
        timed_out = False
        clock = asyncio.get_running_loop().time
        # A backend that answered a 5xx: held against it unless the next one agrees.
        suspect: Endpoint | None = None
        suspect_status = 0
        candidates = decision.ranked[: s.max_attempts]
        for attempt, ep in enumerate(candidates):
            if attempt:
                self.retries += 1
                pool.router.routed_elsewhere(ctx, ep, now)
                ep.in_flight += 1  # the first one was counted when it was chosen
            last = attempt == len(candidates) - 1
            h = headers
            if upstream_auth and ep in upstream_auth:
                h = headers.copy()
                h["Authorization"] = upstream_auth[ep]
            ok = overloaded = False  # this attempt's outcome, for flow control's limit
            t_sent = clock()
            span: AttemptSpan | None = None
            if rs is not None:  # a child span, whose traceparent goes upstream
                span, h = rs.attempt(ep, ex, h, t_sent)
            progress.sent(ep, t_sent)
            told = False  # progress heard how this attempt ended (or _relay will tell it)
            try:
                try:
                    upstream = await self.session.request(ep.url, url_tail, body, h)
                except asyncio.CancelledError:  # the client left before any answer
                    t = clock()
                    told = True
                    progress.unanswered(ep, t_sent, t, True)
                    self.obs.abandoned(ex, ep, t, request)
                    log.debug("request %s: the client left before an answer", request_id)
                    raise
                except (aiohttp.ClientError, TimeoutError) as e:
                    told = True
                    progress.unanswered(ep, t_sent, clock(), False)
                    cause, sent = _failure_cause(e)
                    timed_out = timed_out or isinstance(e, TimeoutError)
                    retry = not last and (s.retry_after_send or not sent)
                    failures.append(f"{ep.name}: {cause}: {type(e).__name__}: {e}")
                    self.obs.attempt_failed(ex, ep, cause, retry)
                    self.record_outcome(ep, False)
                    if retry:
                        continue
                    break
                status = upstream.status
                overloaded = status in (429, 503)
                if status >= 500 and status in _RETRYABLE_STATUS:
                    if suspect is not None and status == suspect_status:
                        # Two backends fail this body alike: the request's doing, not theirs.
                        log.info(
                            "request %s: %s and %s both answered HTTP %d: relayed, held "
                            "against neither",
                            request_id, suspect.name, ep.name, status,
                        )  # fmt: skip
                        suspect = None
                    elif not last:
                        if suspect is not None:  # a different failure: the first stands alone
                            self.record_outcome(suspect, False)
                        suspect, suspect_status = ep, status
                        told = True
                        progress.first_byte(ep, t_sent, clock())  # it answered: not stalled
                        failures.append(f"{ep.name}: HTTP {status}")
                        self.obs.attempt_failed(ex, ep, "status_5xx", True)
                        upstream.release()
                        continue
                    else:  # nobody left to ask: it stands
                        if suspect is not None:
                            self.record_outcome(suspect, False)
                            suspect = None
                        self.record_outcome(ep, False)
                elif status < 500:
                    if suspect is not None:
                        # A 4xx to the same body says the body is bad; anything else that
                        # the first backend failed counts against it.
                        if not (400 <= status < 500 and status != 429):
                            self.record_outcome(suspect, False)
                        suspect = None
                    # 429 is a busy backend, not a broken one: retried, not held against it.
                    self.record_outcome(ep, True)
                    if status == 429 and not last:
                        failures.append(f"{ep.name}: HTTP 429")
                        told = True
                        progress.first_byte(ep, t_sent, clock())
                        self.obs.attempt_failed(ex, ep, "status_429", True)
                        upstream.release()
                        continue
                # (a 5xx that is never retried, e.g. 501, answers the request: not counted)
                told = True
                resp = await self._relay(s, request, upstream, ep, request_id, ex, t_sent, progress)
                ok = ex.ended == "ok" and status < 400
                return resp
            finally:
                ep.in_flight -= 1
                if not told:  # an unexpected error: never leave the attempt waiting
                    progress.unanswered(ep, t_sent, clock(), False)
                if span is not None:
                    span.done(ex)
                if gate is not None:
                    gate.release(ep, ok, overloaded, started=t_sent)

        if suspect is not None:
            self.record_outcome(suspect, False)
        log.warning("request %s failed on every backend tried: %s", request_id, "; ".join(failures))
        if timed_out:
            raise UpstreamTimeout(f"no backend answered in time (request id {request_id})")
        raise UpstreamUnreachable(f"no backend could serve the request (request id {request_id})")

    async def _relay(
        self,
        s: ForwardSettings,
        request: ClientRequest,
        upstream: UpstreamResponse,
        ep: Endpoint,
        request_id: str,
        ex: Exchange,
        t_sent: float,
        progress: ProgressHooks | None = None,
    ) -> Any:
        """Relay `upstream` to the client; `progress` (default the forwarder's) hears of
        the attempt's first byte, or of its end without one."""
        if progress is None:
            progress = self.progress
        extra = {s.request_id_header: request_id}
        if s.expose_backend_header:
            extra["x-lbproxy-backend"] = ep.name
        if ex.queue_wait is not None:
            extra["x-lbproxy-queue-wait"] = f"{ex.queue_wait:.3f}"
        length = upstream.content_length
        te = upstream.te
        if length is not None and te is not None and b"chunked" in te.lower():
            length = None
        ctype = upstream.ctype
        is_sse = ctype is not None and ctype.startswith(b"text/event-stream")
        ex.stream = is_sse

        loop = asyncio.get_running_loop()
        body = _BodyRelay(progress, ep, t_sent, loop.time)
        ex.ended = "client_disconnect"  # unless the body ends or the backend fails first
        status = upstream.status
        out: ResponseSink | None = None
        try:
            # Held when the body (or its start) is here already: one write for both.
            out = await request.start_response(
                status,
                upstream.reason,
                downstream_headers(upstream.raw_headers),
                extra,
                length,
                upstream.buffered or upstream.ended,
                is_sse,
            )
            transport = out.transport
            if transport is None:  # the client left before the head
                return out.result()
            body.start(upstream, out, transport)
            while True:
                await upstream.wait()
                if upstream.ended:
                    break
                # Paused: the client's buffer is full; resume once it drained.
                await out.drain()
                upstream.resume()
            if body.client_left:
                log.debug("request %s: the client left mid-response", request_id)
                return out.result()
            if upstream.error is None:
                ex.ended = "ok"
            else:
                if transport.is_closing():
                    log.debug("request %s: the client left mid-response", request_id)
                    return out.result()
                timeout = isinstance(upstream.error, TimeoutError)
                self.record_outcome(ep, False)
                ex.ended = "stream_timeout" if timeout else "stream_disconnect"
                log.warning(
                    "request %s: backend %s failed mid-response (%s)",
                    request_id, ep.name, "timed out" if timeout else type(upstream.error).__name__,
                )  # fmt: skip
                if not is_sse:
                    transport.close()  # a cut body, never a complete-looking one
                    return out.result()
                sep = b"" if body.last.endswith(b"\n\n") else b"\n\n"
                what = "stopped answering" if timeout else "failed"
                await out.write(
                    sep
                    + sse_error_event(
                        f"the backend {what} mid-stream (request id {request_id})",
                        "upstream_timeout" if timeout else "upstream_disconnected",
                    )
                )
            await out.write_eof()
            return out.result()
        except ConnectionError:  # the client left while lbproxy wrote to it
            log.debug("request %s: the client left mid-response", request_id)
            if upstream.ended and upstream.error is None:  # a backend failure stays one
                ex.ended = "client_disconnect"
            return None if out is None else out.result()
        finally:
            clean = upstream.ended and upstream.error is None
            ex.t_end = loop.time()
            ex.t_first = t_first = body.t_first
            ex.chunks = body.chunks
            ex.status = status
            if not t_first:  # no body byte: an empty body is an answer, a cut one is not
                if clean:
                    progress.first_byte(ep, t_sent, ex.t_end)
                else:
                    abandoned = ex.ended == "client_disconnect"
                    progress.unanswered(ep, t_sent, ex.t_end, abandoned)
            # A complete body gives the connection back; anything else closes it, which
            # is what makes vLLM abort the request.
            upstream.release()
            self.obs.relayed(ex, ep, body.last, body.prev, request)


class _BodyRelay:
    """The sink of an upstream body: each piece goes to the client's transport as it
    arrives, from the upstream protocol's callback (no coroutine per chunk)."""

    __slots__ = (
        "chunks",
        "client_left",
        "clock",
        "ep",
        "framed",
        "high",
        "last",
        "out",
        "prev",
        "progress",
        "send",
        "t_first",
        "t_sent",
        "transport",
        "upstream",
    )  # fmt: skip

    def __init__(
        self, progress: ProgressHooks, ep: Endpoint, t_sent: float, clock: Callable[[], float]
    ) -> None:
        self.progress, self.ep, self.t_sent, self.clock = progress, ep, t_sent, clock
        self.t_first = 0.0
        self.chunks = 0  # body pieces, for the inter-token estimate
        self.last = b"\n\n"  # with prev: where a response's usage is, read at the end
        self.prev = b""
        self.client_left = False

    def start(self, upstream: UpstreamResponse, out: ResponseSink, transport: Any) -> None:
        self.upstream, self.out, self.transport = upstream, out, transport
        self.high = transport.get_write_buffer_limits()[1]
        # Once the head is out: the client's transport when the relay frames each piece
        # itself (lbproxy's own server, chunked: one frame per piece less, measured), else
        # the sink's sender if it has one.
        self.framed: asyncio.Transport | None = None
        self.send: Callable[[bytes], None] | None = None
        upstream.relay_to(self)

    def __call__(self, chunk: bytes) -> None:
        self.chunks += 1
        self.prev, self.last = self.last, chunk
        t = self.framed
        if t is not None:  # the hot case, every piece after the first: no call per piece
            if self.out.eof or t.is_closing():
                self._client_gone()
                return
            t.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            try:
                if self.send is not None:
                    self.send(chunk)
                elif not self.t_first:
                    self._first(chunk)
                else:
                    self.out.write_first(chunk)  # a sink with neither: its one way in
            except ConnectionError:
                self._client_gone()
                return
        if self.transport.get_write_buffer_size() > self.high:
            self.upstream.pause()

    def _first(self, chunk: bytes) -> None:
        self.t_first = self.clock()
        self.progress.first_byte(self.ep, self.t_sent, self.t_first)
        self.out.write_first(chunk)  # the first piece takes the head along
        self.framed = self.out.chunk_transport()
        if self.framed is None:
            self.send = self.out.sender()

    def _client_gone(self) -> None:  # so is the upstream request
        self.client_left = True
        self.upstream.close()
