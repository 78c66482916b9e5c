"""lbproxy's request recorder: plain counters on the data path, read at scrape time.

The data path never touches prometheus_client. Each request costs one `Exchange` (a slots
record of what observability needs to know about it) and, when it ends, a handful of
integer increments on the `BackendStats` of the backend that served it (resolved by a
dict lookup keyed by the Endpoint object) plus up to three histogram observations, each
a bisect into a fixed bucket list. `metrics_collector.MetricsCollector` turns these
records into metric families when `/metrics` is scraped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from lbproxy.credentials import without_credentials
from lbproxy.histogram import Histogram
from lbproxy.proxy.usage import parse_usage
from lbproxy.routing.state import Decision, Endpoint

if TYPE_CHECKING:
    from lbproxy.proxy.access_log import AccessLog

__all__ = [
    "E2E_BUCKETS",
    "ITL_BUCKETS",
    "TTFT_BUCKETS",
    "BackendStats",
    "Exchange",
    "ProxyMetrics",
    "route_label",
]

# vLLM's bucket edges, with finer ones at the low end: a proxy sees fast embeddings too.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
               20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
               7680.0)  # fmt: skip

# Route label values are a closed set: any `POST /v1/...` is forwarded, and a label per
# client-chosen path would let clients grow the metrics without bound.
_ROUTES = {
    p: p
    for p in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/rerank",
        "/v1/score",
        "/v1/classify",
        "/v1/pooling",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    )
}


def route_label(path: str) -> str:
    return _ROUTES.get(path, "other")


# ---------------------------------------------------------------------------- records


class BackendStats:
    """What lbproxy counted for one (pool, backend); survives a reload that keeps the name."""

    __slots__ = (
        "backend",
        "client_disconnects",
        "completion_tokens",
        "decisions",
        "disconnects_before_first_byte",
        "e2e",
        "failures",
        "itl",
        "pool",
        "prompt_tokens",
        "requests",
        "retries",
        "stream_chunks",
        "ttft",
        "vendor",
    )

    def __init__(self, pool: str, backend: str, vendor: str) -> None:
        self.pool = pool
        self.backend = backend
        self.vendor = vendor
        self.requests: dict[tuple[str, int], int] = {}  # (route, status) -> count
        self.decisions = 0
        self.retries: dict[str, int] = {}  # cause -> attempts given up and retried
        self.failures: dict[str, int] = {}  # cause -> failed attempts, retried or not
        self.client_disconnects = 0
        self.disconnects_before_first_byte = 0  # also in client_disconnects
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.stream_chunks = 0

    def total_requests(self) -> int:
        return sum(self.requests.values())


class Exchange:
    """One client request as observability sees it, filled in by the data path."""

    __slots__ = (
        "causes",
        "chunks",
        "completion_tokens",
        "decision",
        "ended",
        "model",
        "path",
        "pd",
        "pool",
        "prompt_tokens",
        "queue_wait",
        "request_id",
        "status",
        "stream",
        "t0",
        "t_end",
        "t_first",
    )

    def __init__(self, t0: float, request_id: str, path: str) -> None:
        self.t0 = t0
        self.request_id = request_id
        self.path = path
        self.model = ""
        self.pool = ""
        self.decision: Decision | None = None
        self.causes: list[str] | None = None  # one per failed attempt, in order
        self.status = 0
        self.stream = False
        self.ended = ""  # ok | stream_disconnect | stream_timeout | client_disconnect
        self.t_first = 0.0  # 0: no body byte seen
        self.t_end = 0.0
        self.chunks = 0  # body reads relayed
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.queue_wait: float | None = None  # seconds held by flow control (None: off)
        self.pd: dict[str, Any] | None = None  # a P/D pool's decision (routing.disagg)


# ---------------------------------------------------------------------------- recorder


class ProxyMetrics:
    """The data path's recorder: the Forwarder calls `routed`, `attempt_failed`, `relayed`
    and `rejected`; everything else reads the records at its own pace."""

    def __init__(self, access_log: AccessLog | None = None) -> None:
        self.access_log = access_log
        self._by_ep: dict[Endpoint, BackendStats] = {}
        self._by_key: dict[tuple[str, str], BackendStats] = {}
        # Requests no backend answered: (pool or "", route, status) -> count.
        self.unrouted: dict[tuple[str, str, int], int] = {}
        # Prefill/decode pools: (pool, mode, reason) -> requests; per (pool, prefill
        # backend, decode backend): the prefill leg's seconds and the decode leg's TTFT.
        self.pd_requests: dict[tuple[str, str, str], int] = {}
        self.pd_prefill: dict[tuple[str, str, str], Histogram] = {}
        self.pd_decode_ttft: dict[tuple[str, str, str], Histogram] = {}

    def stats(self, ep: Endpoint) -> BackendStats:
        st = self._by_ep.get(ep)
        if st is None:
            st = self._resolve(ep)
        return st

    def _resolve(self, ep: Endpoint) -> BackendStats:
        # A reload builds new Endpoint objects; the same (pool, name) keeps its counters.
        key = (ep.pool, ep.name)
        st = self._by_key.get(key)
        if st is None:
            st = self._by_key[key] = BackendStats(ep.pool, without_credentials(ep.name), ep.vendor)
        st.vendor = ep.vendor
        self._by_ep[ep] = st
        return st

    def prune(self, live: Iterable[Endpoint]) -> None:
        """Forget Endpoint objects that left the pools (their counters stay by name)."""
        keep = set(live)
        for ep in [ep for ep in self._by_ep if ep not in keep]:
            del self._by_ep[ep]

    def backend_stats(
        self, endpoints: Iterable[Endpoint]
    ) -> Iterator[tuple[Endpoint, BackendStats]]:
        for ep in endpoints:
            yield ep, self.stats(ep)

    # ---- data path -----------------------------------------------------------------------

    def routed(self, ex: Exchange, decision: Decision) -> None:
        ex.decision = decision
        ep = decision.endpoint
        (self._by_ep.get(ep) or self._resolve(ep)).decisions += 1

    def attempt_failed(self, ex: Exchange, ep: Endpoint, cause: str, retried: bool) -> None:
        st = self.stats(ep)
        st.failures[cause] = st.failures.get(cause, 0) + 1
        if retried:
            st.retries[cause] = st.retries.get(cause, 0) + 1
        if ex.causes is None:
            ex.causes = [cause]
        else:
            ex.causes.append(cause)

    def pd_request(self, pool: str, mode: str, reason: str) -> None:
        """A request of a P/D pool was served `mode` (disaggregated | aggregated), why."""
        key = (pool, mode, reason)
        self.pd_requests[key] = self.pd_requests.get(key, 0) + 1

    def pd_pair(
        self, pool: str, prefill: Endpoint, decode: Endpoint, prefill_s: float, ttft: float | None
    ) -> None:
        """A split request's legs: prefill seconds, and the decode leg's send -> first
        byte of a stream (None: not a stream)."""
        key = (pool, without_credentials(prefill.name), without_credentials(decode.name))
        h = self.pd_prefill.get(key)
        if h is None:
            h = self.pd_prefill[key] = Histogram(TTFT_BUCKETS)
        h.observe(prefill_s)
        if ttft is not None:
            h = self.pd_decode_ttft.get(key)
            if h is None:
                h = self.pd_decode_ttft[key] = Histogram(TTFT_BUCKETS)
            h.observe(ttft)

    def relayed(
        self, ex: Exchange, ep: Endpoint, last: bytes, prev: bytes, request: web.Request
    ) -> None:
        """A response from `ep` was relayed (to its end or not: see `ex.ended`); `last` and
        `prev` are the body's last two chunks."""
        st = self._by_ep.get(ep) or self._resolve(ep)
        key = (_ROUTES.get(ex.path, "other"), ex.status)
        st.requests[key] = st.requests.get(key, 0) + 1
        ended = ex.ended
        if ended != "ok":
            if ended == "client_disconnect":
                st.client_disconnects += 1
                if not ex.t_first:
                    st.disconnects_before_first_byte += 1
            else:
                st.failures[ended] = st.failures.get(ended, 0) + 1
        elif ex.status < 400:
            st.e2e.observe(ex.t_end - ex.t0)
            ex.prompt_tokens, completion = parse_usage(last, prev)
            ex.completion_tokens = completion
            if ex.prompt_tokens is not None:
                st.prompt_tokens += ex.prompt_tokens
            if completion is not None:
                st.completion_tokens += completion
            if ex.stream and ex.t_first:
                st.ttft.observe(ex.t_first - ex.t0)
                st.stream_chunks += ex.chunks
                gaps = completion - 1 if completion is not None else ex.chunks - 1
                if gaps > 0:
                    st.itl.observe((ex.t_end - ex.t_first) / gaps, gaps)
        if self.access_log is not None:
            self.access_log.record(ex, ep, request.remote)

    def abandoned(self, ex: Exchange, ep: Endpoint, t: float, request: web.Request) -> None:
        """The client left at `t` while `ep` had not answered (status 499, nginx's "client
        closed request", in the log and the request counts)."""
        st = self.stats(ep)
        st.client_disconnects += 1
        st.disconnects_before_first_byte += 1
        ex.status = 499
        ex.ended = "client_disconnect"
        ex.t_end = t
        key = (route_label(ex.path), 499)
        st.requests[key] = st.requests.get(key, 0) + 1
        if self.access_log is not None:
            self.access_log.record(ex, ep, request.remote)

    def rejected(self, ex: Exchange, status: int, code: str, request: web.Request) -> None:
        """lbproxy answered the request itself (an error no backend produced)."""
        key = (ex.pool, route_label(ex.path), status)
        self.unrouted[key] = self.unrouted.get(key, 0) + 1
        ex.status = status
        ex.ended = code
        if self.access_log is not None:
            ex.t_end = asyncio.get_running_loop().time()
            self.access_log.record(ex, None, request.remote)
