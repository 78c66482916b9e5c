"""The data path: read the body once, route, forward byte-for-byte, relay as it arrives.

The request body is parsed (orjson) only to learn what routing needs and is forwarded
as the exact bytes the client sent. Response bytes, SSE included, are relayed as they
arrive, never re-framed. Before the first byte reaches the client a failed backend is
retried on the next one in the decision's ranking; after it, a failure ends an SSE
stream with an error event (any other body is cut by closing the connection, so the
client sees a truncated body rather than a complete-looking one).

With client keys configured (`auth`), a request is admitted before its body is read (one
constant-time check, and a per-key in-flight count when limited). Every attempt's outcome
goes to the circuit breaker (`record_outcome`, see `signals.health`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from lbproxy.config import Config
from lbproxy.proxy.auth import Authenticator
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
from lbproxy.proxy.metrics import Exchange, ProxyMetrics
from lbproxy.proxy.pools import PoolTable
from lbproxy.proxy.request_id import client_request_id
from lbproxy.routing.state import Endpoint, RequestContext

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
        )


def _no_breaker(ep: Endpoint, ok: bool) -> None:
    pass


def _dot_segment(path: str) -> bool:
    # `/v1/../x` (or %2e%2e) would reach a backend's non-OpenAI routes once the client
    # library normalises the URL: never forward one.
    return any(seg in (".", "..") for seg in path.split("/"))


class Forwarder:
    """Holds what the data path needs; `handle` is the aiohttp handler for /v1/* POSTs."""

    def __init__(
        self,
        pools: PoolTable,
        session: aiohttp.ClientSession,
        settings: ForwardSettings,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.pools = pools
        self.obs = metrics if metrics is not None else ProxyMetrics()
        self.session = session
        self.configure(settings)
        self.retries = 0  # attempts beyond the first, all requests
        self.auth: Authenticator | None = None  # client keys; None: /v1/* is open
        # The circuit breaker's `record(ep, ok)`, told the outcome of every attempt.
        self.record_outcome: Callable[[Endpoint, bool], None] = _no_breaker

    def configure(self, settings: ForwardSettings) -> None:
        """Apply settings (at start and on a hot reload)."""
        self.settings = settings
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout,
            sock_read=settings.first_byte_timeout,
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        s = self.settings
        request_id = client_request_id(request.headers.get(s.request_id_header))
        # The request's one clock read before its response: latency origin and routing's now.
        ex = Exchange(asyncio.get_running_loop().time(), request_id, request.path)
        id_header = {s.request_id_header: request_id}
        auth = self.auth
        slot = None
        try:
            if auth is not None:
                slot = auth.admit(request)
            return await self._handle(request, request_id, ex)
        except ProxyError as e:
            if isinstance(e, Overloaded):
                ex.queue_wait = e.waited
            self.obs.rejected(ex, e.status, e.code, request)
            return e.response(id_header)
        finally:
            if slot is not None and auth is not None:
                auth.release(slot)

    async def _handle(
        self, request: web.Request, request_id: str, ex: Exchange
    ) -> web.StreamResponse:
        s = self.settings
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
        pool = self.pools.for_model(model)
        if pool is None:
            served = self.pools.served_models()
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
            _tokenize=pool.tokenize,
        )
        headers = upstream_headers(request.headers, s.request_id_header, request_id)
        if self.auth is not None and not self.auth.forward_client_key:
            headers.popall("Authorization", None)  # the client's key is lbproxy's business
        now = ex.t0
        gate = pool.gate
        if gate is None:
            decision = pool.router.route(ctx, pool.endpoints, now)
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
        url_tail = request.rel_url.raw_path_qs
        failures: list[str] = []
        timed_out = False
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
            try:
                try:
                    upstream = await self.session.post(
                        ep.url + url_tail, data=body, headers=h, timeout=self._timeout
                    )
                except (TimeoutError, aiohttp.ServerTimeoutError) as e:
                    timed_out = True
                    failures.append(f"{ep.name}: timed out ({type(e).__name__})")
                    self.obs.attempt_failed(ex, ep, "timeout", not last)
                    self.record_outcome(ep, False)
                    continue
                except aiohttp.ClientError as e:
                    failures.append(f"{ep.name}: {type(e).__name__}: {e}")
                    self.obs.attempt_failed(ex, ep, "connect_error", not last)
                    self.record_outcome(ep, False)
                    continue
                # 429 is a busy backend, not a broken one: retried but not held against it.
                self.record_outcome(ep, upstream.status < 500)
                overloaded = upstream.status in (429, 503)
                if upstream.status in _RETRYABLE_STATUS and not last:
                    failures.append(f"{ep.name}: HTTP {upstream.status}")
                    cause = "status_429" if upstream.status == 429 else "status_5xx"
                    self.obs.attempt_failed(ex, ep, cause, True)
                    upstream.release()
                    continue
                resp = await self._relay(request, upstream, ep, request_id, ex)
                ok = ex.ended == "ok" and upstream.status < 400
                return resp
            finally:
                ep.in_flight -= 1
                if gate is not None:
                    gate.release(ep, ok, overloaded)

        detail = "; ".join(failures)
        log.warning("request %s failed on every backend tried: %s", request_id, detail)
        if timed_out:
            raise UpstreamTimeout(f"no backend answered in time ({detail})")
        raise UpstreamUnreachable(f"no backend could be reached ({detail})")

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        ep: Endpoint,
        request_id: str,
        ex: Exchange,
    ) -> web.StreamResponse:
        s = self.settings
        # Headers are in: from now on the gap between body chunks is what is bounded.
        conn = upstream.connection
        if conn is not None and conn.protocol is not None:
            conn.protocol.read_timeout = s.idle_timeout

        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        resp.headers.extend(downstream_headers(upstream.headers))
        resp.headers[s.request_id_header] = request_id
        if s.expose_backend_header:
            resp.headers["x-lbproxy-backend"] = ep.name
        if ex.queue_wait is not None:
            resp.headers["x-lbproxy-queue-wait"] = f"{ex.queue_wait:.3f}"
        length = upstream.content_length
        if length is not None and "chunked" not in upstream.headers.get("transfer-encoding", ""):
            resp.content_length = length
        is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
        ex.stream = is_sse

        loop = asyncio.get_running_loop()
        clean = False  # the upstream body was read to its end
        last_chunk = b"\n\n"
        prev_chunk = b""  # with last_chunk: where a response's usage is, read at the end
        t_first = 0.0
        chunks = 0  # body reads, for the inter-token estimate (counting events cost 1 ns/byte)
        ex.ended = "client_disconnect"  # unless the body ends or the backend fails first
        try:
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    if not t_first:
                        t_first = loop.time()
                    await resp.write(chunk)
                    chunks += 1
                    prev_chunk, last_chunk = last_chunk, chunk
                clean = True
                ex.ended = "ok"
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as e:
                if request.transport is None or request.transport.is_closing():
                    raise  # the client left; nothing to tell it
                reason = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
                self.record_outcome(ep, False)
                ex.ended = "stream_timeout" if reason == "timed out" else "stream_disconnect"
                log.warning(
                    "request %s: backend %s failed mid-response (%s)", request_id, ep.name, reason
                )
                if not is_sse:
                    request.transport.close()  # a cut body, never a complete-looking one
                    return resp
                sep = b"" if last_chunk.endswith(b"\n\n") else b"\n\n"
                await resp.write(
                    sep
                    + sse_error_event(
                        f"backend '{ep.name}' failed mid-stream: {reason}",
                        "upstream_timeout" if reason == "timed out" else "upstream_disconnected",
                    )
                )
            await resp.write_eof()
            return resp
        finally:
            ex.t_end = loop.time()
            ex.t_first = t_first
            ex.chunks = chunks
            ex.status = resp.status
            if clean:
                upstream.release()
            else:
                # Closing the connection is what makes vLLM abort the request.
                upstream.close()
            self.obs.relayed(ex, ep, last_chunk, prev_chunk, request)
