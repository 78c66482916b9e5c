"""The data path of a prefill/decode split (pool `disaggregation`): two upstream requests.

The decision is `routing.disagg` (pure); this module sends the legs as vLLM's connector
expects them (shared/reference/pd-protocol.md) and is the one place where lbproxy changes
a request body:

- prefill: the client's body with `kv_transfer_params` asking for remote decode,
  `stream: false`, `max_tokens: 1` (and `max_completion_tokens: 1` when the client set
  it), without `stream_options`, `min_tokens`, `min_completion_tokens`; read to its end
  within `disaggregation.prefill_timeout`;
- decode: the client's body, key order and unknown fields kept, plus the
  `kv_transfer_params` object the prefill answer returned, passed through unchanged;
  relayed to the client like any response (`Forwarder._relay`).
Both legs carry the request's X-Request-Id.

Failures, none of them visible to the client while a route remains:
- a prefill that fails, times out or answers without `kv_transfer_params` is retried on
  the next prefill candidate (up to `limits.max_attempts`), then the request is served
  aggregated (`serve` returns None and the Forwarder routes it as usual);
- a decode backend that fails before its first byte: the next decode candidate with the
  same params (the producer holds the blocks until they are pulled). When two decode
  backends failed the same params after receiving them, or no candidate is left, the
  blocks may be gone (a started pull frees them): one fresh prefill, then the decode
  candidates again (all but those that could not be reached); after that, aggregated;
- the client leaves: the open upstream request is closed (a prefill in progress is
  aborted by vLLM), and no decode request is sent.

Flow control (the pool's gate, when on): a split request waits in the gate's queue as one
request and is dispatched as a pair (`FlowGate.acquire_pair`: a prefill backend and a
decode backend that can both take it, both slots counted at once), or shed as one (one
429); it is never sent half. The prefill leg uses the prefill slot, the decode leg the
decode slot (reserved until then: `FlowController.decode_started`), each freed when its
leg ends (`FlowGate.release`, a prefill leg's with the uncached tokens flow control
counted for it); a slot a leg did not use (the prefill failed over to another backend,
the request fell back to aggregated, the client left) is freed when the split ends.
Retries and failovers to other backends count there while they run, as aggregated
retries do (a prefill failover as a prefill leg). Without flow control each leg counts in
its backend's `in_flight` while it runs. Each prefill leg, flow control on or off, counts
its uncached prompt tokens on its backend (`Endpoint.prefill_tokens`, for the
`prefill-load` scorer) from when it is sent until it ends; so does each attempt of an
aggregated request on a `role: both` backend, until its first byte (`AggregatedPrefill`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from lbproxy.proxy.upstream_failure import failure_cause
from lbproxy.routing.disagg import (
    DisaggPlan,
    DisaggRouter,
    prefill_leg_ended,
    prefill_leg_started,
)
from lbproxy.routing.state import Endpoint, RequestContext

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from lbproxy.proxy.client_io import ClientRequest
    from lbproxy.proxy.forward import Forwarder, ForwardSettings, ProgressHooks
    from lbproxy.proxy.pools import PoolRuntime
    from lbproxy.proxy.request_metrics import Exchange
    from lbproxy.proxy.tracing import AttemptSpan, RequestSpan

log = logging.getLogger("lbproxy.proxy.disagg")

__all__ = [
    "PREFILL_KV_PARAMS",
    "AggregatedPrefill",
    "decode_body",
    "prefill_body",
    "serve_disaggregated",
]

# What a prefill request asks of NixlConnector: compute the KV, keep it for a remote decode.
PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
_NOT_ON_PREFILL = ("stream_options", "min_tokens", "min_completion_tokens")
_RETRYABLE = frozenset({429, 500, 502, 503, 504})


def prefill_body(client: dict[str, Any]) -> bytes:
    """The prefill leg's body (the client's keys in their order, changed as above)."""
    body = {k: v for k, v in client.items() if k not in _NOT_ON_PREFILL}
    body["kv_transfer_params"] = PREFILL_KV_PARAMS
    body["stream"] = False
    body["max_tokens"] = 1
    if "max_completion_tokens" in client:
        body["max_completion_tokens"] = 1
    return orjson.dumps(body)


def decode_body(client: dict[str, Any], kv_params: dict[str, Any]) -> bytes:
    """The decode leg's body: the client's, plus the prefill answer's params as they came."""
    body = dict(client)
    body["kv_transfer_params"] = kv_params
    return orjson.dumps(body)


class _Split:
    """One split request's state across its legs."""

    def __init__(
        self,
        fwd: Forwarder,
        settings: ForwardSettings,
        request: ClientRequest,
        client: dict[str, Any],
        ctx: RequestContext,
        headers: CIMultiDict[str],
        pool: PoolRuntime,
        ex: Exchange,
        now: float,
        rs: RequestSpan | None,
    ) -> None:
        self.fwd = fwd
        self.settings = settings  # the request's runtime's (forward.handle)
        self.rs = rs  # tracing: each leg's attempt is a child span
        self.request = request
        self.client = client
        self.ctx = ctx
        self.headers = headers
        self.pool = pool
        self.ex = ex
        self.now = now
        self.url_tail = request.raw_target
        self.clock = asyncio.get_running_loop().time
        dis = pool.spec.disaggregation
        assert dis is not None and pool.disagg is not None
        self.disagg = pool.disagg
        self.prefill_timeout = aiohttp.ClientTimeout(
            total=dis.prefill_timeout, sock_connect=settings.connect_timeout
        )
        self.prefill_s = 0.0
        # Slots flow control counted for this split, until a leg uses them: the prefill
        # leg's (with its uncached tokens) and the decode leg's.
        self.reserved_prefill: Endpoint | None = None
        self.reserved_decode: Endpoint | None = None
        self.uncached = 0

    def _take_prefill(self, ep: Endpoint) -> int | None:
        """Count a prefill leg on `ep`, in the slot reserved for it if any; returns the
        uncached tokens to release it with (None: no flow control)."""
        if ep is self.reserved_prefill:
            self.reserved_prefill = None
            return self.uncached
        ep.in_flight += 1
        gate = self.pool.gate
        if gate is None:
            return None
        gate.controller.prefill_started(ep, self.uncached, self.clock())
        return self.uncached

    def _take_decode(self, ep: Endpoint) -> None:
        """Count a decode leg on `ep`: in the slot reserved for it, if any."""
        if ep is self.reserved_decode:
            self.reserved_decode = None
            gate = self.pool.gate
            if gate is not None:
                gate.controller.decode_started(ep)
            return
        ep.in_flight += 1

    def free_reserved(self) -> None:
        """Give back the slots no leg used."""
        if self.reserved_prefill is not None:
            self._leg_done(self.reserved_prefill, False, prefill=self.uncached)
            self.reserved_prefill = None
        if self.reserved_decode is not None:
            ep, self.reserved_decode = self.reserved_decode, None
            gate = self.pool.gate
            if gate is not None:
                gate.controller.decode_started(ep)
            self._leg_done(ep, False)

    def _headers(self, ep: Endpoint) -> CIMultiDict[str]:
        auth = self.pool.upstream_auth
        if auth and ep in auth:
            h = self.headers.copy()
            h["Authorization"] = auth[ep]
            return h
        return self.headers

    def _traced(
        self, ep: Endpoint, t_sent: float, leg: str
    ) -> tuple[AttemptSpan | None, CIMultiDict[str]]:
        """The leg's headers, with its span's traceparent when tracing is on."""
        if self.rs is None:
            return None, self._headers(ep)
        return self.rs.attempt(ep, self.ex, self._headers(ep), t_sent, leg)

    def _failed(self, ep: Endpoint, cause: str, retried: bool, detail: str) -> None:
        self.fwd.obs.attempt_failed(self.ex, ep, cause, retried)
        log.info("request %s: P/D leg on %s failed: %s", self.ex.request_id, ep.name, detail)

    def _leg_done(
        self,
        ep: Endpoint,
        ok: bool,
        overloaded: bool = False,
        prefill: int | None = None,
        started: float | None = None,
    ) -> None:
        ep.in_flight -= 1
        gate = self.pool.gate
        if gate is not None:
            gate.release(ep, ok, overloaded, prefill, started)

    # ------------------------------------------------------------------------ prefill
    async def prefill(self, candidates: list[Endpoint]) -> tuple[Endpoint, Any] | None:
        """The first prefill answer with kv_transfer_params, from the candidates in
        order: (endpoint, params), or None when none gave one."""
        fwd, body = self.fwd, prefill_body(self.client)
        candidates = candidates[: self.settings.max_attempts]
        for i, ep in enumerate(candidates):
            retried = i + 1 < len(candidates)
            uncached = self._take_prefill(ep)
            # What the prefill scorer reads (before commit teaches the index this prompt).
            leg_tokens = self.disagg.uncached_tokens(self.ctx, ep)
            prefill_leg_started(ep, leg_tokens)
            self.disagg.prefill.commit(self.ctx, ep, self.now)
            ok = overloaded = False
            t_sent = self.clock()
            span, headers = self._traced(ep, t_sent, "prefill")
            fwd.progress.sent(ep, t_sent)
            answered = False
            try:
                async with fwd.session.post(
                    ep.url + self.url_tail,
                    data=body,
                    headers=headers,
                    timeout=self.prefill_timeout,
                ) as r:
                    answered = True
                    fwd.progress.first_byte(ep, t_sent, self.clock())
                    try:
                        raw = await r.read()
                    except asyncio.CancelledError:
                        r.close()  # vLLM aborts the prefill on the closed connection
                        raise
                status = r.status
                overloaded = status in (429, 503)
                params = _kv_params(raw) if status == 200 else None
                if params is None:
                    fwd.record_outcome(ep, status < 500)
                    cause = f"status_{status // 100}xx" if status != 429 else "status_429"
                    if status == 200:
                        cause = "bad_response"
                    self._failed(ep, f"prefill_{cause}", retried, f"HTTP {status}")
                    if 400 <= status < 500 and status != 429:
                        return None  # the body's doing: the aggregated path answers it
                    continue
                ok = True
                fwd.record_outcome(ep, True)
                self.prefill_s = self.clock() - t_sent
                return ep, params
            except asyncio.CancelledError:  # the client left: counted as a 499 on `ep`
                t = self.clock()
                if not answered:
                    fwd.progress.unanswered(ep, t_sent, t, True)
                fwd.obs.abandoned(self.ex, ep, t, self.request)
                log.debug("request %s: the client left during the prefill", self.ex.request_id)
                raise
            except (aiohttp.ClientError, TimeoutError) as e:
                if not answered:
                    fwd.progress.unanswered(ep, t_sent, self.clock(), False)
                fwd.record_outcome(ep, False)
                cause = failure_cause(e)[0]
                self._failed(ep, f"prefill_{cause}", retried, f"{type(e).__name__}: {e}")
            finally:
                prefill_leg_ended(ep, leg_tokens)
                self._leg_done(ep, ok, overloaded, uncached, t_sent)
                if span is not None:
                    span.done(self.ex, 200 if ok else 0)
        return None

    # ------------------------------------------------------------------------- decode
    async def decode(self, ep: Endpoint, params: Any) -> tuple[Any, bool, bool]:
        """One decode attempt: (response, sent, relayed). `relayed`: the response (a
        success, or an error that is the request's own such as a 4xx) went to the client;
        else `sent` False says the backend never read the params (they are still good)."""
        fwd, ex = self.fwd, self.ex
        self._take_decode(ep)
        self.disagg.decode.commit(self.ctx, ep, self.now)
        ok = overloaded = False
        t_sent = self.clock()
        span, headers = self._traced(ep, t_sent, "decode")
        fwd.progress.sent(ep, t_sent)
        told = False
        try:
            try:
                upstream = await fwd.session.post(
                    ep.url + self.url_tail,
                    data=decode_body(self.client, params),
                    headers=headers,
                    timeout=self.settings.decode_timeout,
                )
            except asyncio.CancelledError:
                told = True
                t = self.clock()
                fwd.progress.unanswered(ep, t_sent, t, True)
                fwd.obs.abandoned(ex, ep, t, self.request)
                raise
            except (aiohttp.ClientError, TimeoutError) as e:
                told = True
                fwd.progress.unanswered(ep, t_sent, self.clock(), False)
                fwd.record_outcome(ep, False)
                cause, sent = failure_cause(e)
                self._failed(ep, f"decode_{cause}", True, f"{type(e).__name__}: {e}")
                return None, sent, False
            status = upstream.status
            overloaded = status in (429, 503)
            if status in _RETRYABLE:
                told = True
                fwd.progress.first_byte(ep, t_sent, self.clock())
                fwd.record_outcome(ep, status == 429)
                self._failed(ep, f"decode_status_{'429' if status == 429 else '5xx'}", True,
                             f"HTTP {status}")  # fmt: skip
                upstream.release()
                # A 429 never read the params: they are still good.
                return None, status != 429, False
            fwd.record_outcome(ep, True)
            told = True
            resp = await fwd._relay(
                self.settings, self.request, upstream, ep, ex.request_id, ex, t_sent
            )
            ok = ex.ended == "ok" and status < 400
            return resp, True, True
        finally:
            if not told:
                fwd.progress.unanswered(ep, t_sent, self.clock(), False)
            self._leg_done(ep, ok, overloaded, started=t_sent)
            if span is not None:
                span.done(self.ex)


class AggregatedPrefill:
    """The progress hooks (`forward.ProgressHooks`) of an aggregated request in a P/D
    pool: each attempt sent to a `role: both` backend counts its uncached prompt tokens in
    that backend's `prefill_tokens` (it prefills the prompt, as a split's prefill leg
    does) until the attempt's first byte or its end without one, whichever the forwarder
    reports (exactly one per attempt); then calls the forwarder's own hooks. Per attempt,
    never per chunk: the relay reports only an attempt's first byte."""

    __slots__ = ("ctx", "disagg", "ep", "inner", "plan", "tokens")

    def __init__(
        self, inner: ProgressHooks, disagg: DisaggRouter, ctx: RequestContext, plan: DisaggPlan
    ) -> None:
        self.inner, self.disagg, self.ctx, self.plan = inner, disagg, ctx, plan
        self.ep: Endpoint | None = None  # the attempt counted, until its first byte
        self.tokens = 0

    def sent(self, ep: Endpoint, t: float) -> None:
        self._give_back()  # (the previous attempt was reported already: never twice)
        if ep.role == "both":
            plan = self.plan
            pre = plan.prefill
            # The decision's figure when it ranked this backend first (made before any
            # leg taught the prefill index this prompt), else the same estimate now.
            if pre is not None and pre.endpoint is ep:
                tokens = plan.uncached_tokens
            else:
                tokens = self.disagg.uncached_tokens(self.ctx, ep)
            prefill_leg_started(ep, tokens)
            self.ep, self.tokens = ep, tokens
        self.inner.sent(ep, t)

    def first_byte(self, ep: Endpoint, t_sent: float, t: float) -> None:
        self._give_back()
        self.inner.first_byte(ep, t_sent, t)

    def unanswered(self, ep: Endpoint, t_sent: float, t: float, abandoned: bool) -> None:
        self._give_back()
        self.inner.unanswered(ep, t_sent, t, abandoned)

    def _give_back(self) -> None:
        ep = self.ep
        if ep is not None:
            self.ep = None
            prefill_leg_ended(ep, self.tokens)


def _kv_params(raw: bytes) -> Any:
    """The prefill answer's top-level kv_transfer_params (an object), else None."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    return params if isinstance(params, dict) else None


async def serve_disaggregated(
    fwd: Forwarder,
    settings: ForwardSettings,
    request: ClientRequest,
    client: dict[str, Any],
    ctx: RequestContext,
    headers: CIMultiDict[str],
    pool: PoolRuntime,
    ex: Exchange,
    now: float,
    rs: RequestSpan | None = None,
) -> tuple[Any, AggregatedPrefill | None]:
    """Serve the request split if the pool's P/D decision says so: (the response, None).
    (None, hooks): serve it aggregated (a short prompt, no route for a side, or every
    split route failed), reporting its attempts' progress to `hooks` (None: the client
    runs its own P/D, its request is not a prefill of ours to count)."""
    disagg = pool.disagg
    assert disagg is not None
    plan = disagg.plan(ctx, pool.endpoints, now)
    obs = fwd.obs
    ex.pd = plan.log_fields()
    if log.isEnabledFor(logging.DEBUG):
        log.debug("pd %s pool=%s %s", ex.request_id, pool.name, ex.pd)
    if not plan.disaggregated:
        obs.pd_request(pool.name, "aggregated", plan.reason)
        if plan.reason == "client_kv_params":
            return None, None
        return None, AggregatedPrefill(fwd.progress, disagg, ctx, plan)
    assert plan.prefill is not None and plan.decode is not None
    gate = pool.gate
    split = _Split(fwd, settings, request, client, ctx, headers, pool, ex, now, rs)
    split.uncached = plan.uncached_tokens
    if gate is not None:  # held and dispatched as a pair, or shed as one (Overloaded)
        priority, flow = gate.classify(request.headers)
        try:
            pre, dec, ex.queue_wait, uncached = await gate.acquire_pair(
                ctx, plan, priority, flow, now
            )
        except asyncio.CancelledError:
            obs.pd_request(pool.name, "disaggregated", "client_left")
            raise
        plan.prefill, plan.decode = pre, dec
        split.reserved_prefill, split.reserved_decode = pre.endpoint, dec.endpoint
        split.uncached = uncached
        split.now = now = now + ex.queue_wait
    ex.decision = plan.decode  # the access log's scores/totals: the decode side's
    try:
        resp = await _serve(split, plan)
    except asyncio.CancelledError:
        obs.pd_request(pool.name, "disaggregated", "client_left")
        raise
    finally:
        split.free_reserved()
    if resp is None:
        log.warning(
            "request %s: no P/D route served it (%s); serving it aggregated",
            ex.request_id, ", ".join(ex.causes or []),
        )  # fmt: skip
        ex.pd["fallback"] = True
        return None, AggregatedPrefill(fwd.progress, disagg, ctx, plan)
    return resp, None


async def _serve(split: _Split, plan: DisaggPlan) -> Any:
    assert plan.prefill is not None and plan.decode is not None
    fwd, pool, ex = split.fwd, split.pool, split.ex
    obs = fwd.obs
    pd = ex.pd
    assert pd is not None
    got = await split.prefill(plan.prefill.ranked)
    if got is None:
        obs.pd_request(pool.name, "aggregated", "prefill_failed")
        return None
    p_ep, params = got
    max_attempts = split.settings.max_attempts
    ranked = plan.decode.ranked
    queue = list(ranked[:max_attempts])
    unreachable: set[int] = set()
    failed_same_params = 0
    refreshed = False
    while True:
        if not queue or failed_same_params >= 2:
            # The blocks may be gone (a started pull frees them): prefill once more.
            if refreshed or not failed_same_params:
                break
            refreshed = True
            # Best first, the one whose blocks went missing last.
            ranked_p = split.disagg.rank_prefill(split.ctx, pool.endpoints, split.now)
            got = await split.prefill([ep for ep in ranked_p if ep is not p_ep] + [p_ep])
            if got is None:
                break
            p_ep, params = got
            failed_same_params = 0
            queue = [ep for ep in ranked if id(ep) not in unreachable and ep is not p_ep]
            queue = queue[:max_attempts]
            continue
        d_ep = queue.pop(0)
        t_sent = split.clock()
        # Set before the relay, which writes the access log line.
        pd["prefill_backend"], pd["decode_backend"] = p_ep.name, d_ep.name
        pd["prefill_s"] = round(split.prefill_s, 6)
        resp, sent, final = await split.decode(d_ep, params)
        if final:
            assert resp is not None
            ttft = ex.t_first - t_sent if ex.stream and ex.t_first else None
            obs.routed(ex, plan.decode)
            obs.pd_request(pool.name, "disaggregated", "re_prefill" if refreshed else "split")
            obs.pd_pair(pool.name, p_ep, d_ep, split.prefill_s, ttft)
            return resp
        if sent:
            failed_same_params += 1
        else:
            unreachable.add(id(d_ep))
    for key in ("prefill_backend", "decode_backend", "prefill_s"):
        pd.pop(key, None)
    obs.pd_request(pool.name, "aggregated", "decode_failed")
    return None
