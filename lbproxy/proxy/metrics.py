"""lbproxy's own metrics: plain counters on the data path, Prometheus text at scrape time.

The data path never touches prometheus_client. Each request costs one `Exchange` (a slots
record of what observability needs to know about it) and, when it ends, a handful of
integer increments on the `BackendStats` of the backend that served it (resolved by a
dict lookup keyed by the Endpoint object) plus up to three histogram observations, each
a bisect into a fixed bucket list. `MetricsCollector` turns these records, the endpoints'
live state, the metrics scraper's counters and the prefix indexes' stats into metric
families when `/metrics` is scraped.

What is exact and what is estimated (also in the README):
- exact: request counts by status, retries and failures by cause, in-flight, decisions,
  end-to-end latency as lbproxy saw it, health, scrape age and errors.
- TTFT: from the request's arrival at lbproxy to the first body bytes of an SSE response
  arriving from the backend (streams only; a non-streaming body arrives all at once).
- inter-token latency: not timed per chunk. One clock read at the first chunk and one at
  the end give the stream's decode span; it is divided by the request's completion tokens
  minus one (from `usage`, when the backend sent it) or else by the number of body reads
  minus one (one read per SSE event while a backend streams at model speed; fewer when
  events arrive faster than lbproxy reads, which makes the estimate high), and counted
  once per gap at that mean, so the histogram weighs tokens as vLLM's does but cannot
  show jitter within one stream.
- tokens: read from the `usage` object in the last bytes of the response (non-streaming
  bodies, and streams asked with `stream_options.include_usage`); requests whose
  response carries no usage are not counted. Nothing is parsed per chunk.
- prefix hit blocks: the routing scorer's own estimate, counted when it routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from lbproxy import __version__
from lbproxy.credentials import without_credentials as safe_name
from lbproxy.histogram import Histogram
from lbproxy.routing.state import Decision, Endpoint

if TYPE_CHECKING:
    from lbproxy.proxy.access_log import AccessLog
    from lbproxy.proxy.pools import PoolTable
    from lbproxy.signals.scraper import MetricsScraper

__all__ = [
    "E2E_BUCKETS",
    "ITL_BUCKETS",
    "TTFT_BUCKETS",
    "BackendStats",
    "Exchange",
    "Histogram",
    "MetricsCollector",
    "ProxyMetrics",
    "parse_usage",
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


# ---------------------------------------------------------------------------- usage

_PROMPT = b'"prompt_tokens":'
_COMPLETION = b'"completion_tokens":'
_WINDOW = 2048  # usage sits in the last few hundred bytes of a vLLM response


def _usage_int(buf: bytes, key: bytes) -> int | None:
    # Plain finds and int(): a regex here cost as much as the rest of the request's metrics.
    i = buf.rfind(key, len(buf) - _WINDOW if len(buf) > _WINDOW else 0)
    if i <= 0 or buf[i - 1] == 0x5C:  # \"prompt_tokens\": inside a generated string
        return None
    i += len(key)
    comma = buf.find(b",", i, i + 24)
    brace = buf.find(b"}", i, i + 24)
    end = comma if brace < 0 or 0 <= comma < brace else brace
    if end < 0:
        return None
    try:
        return int(buf[i:end])  # int() skips the blanks around the digits
    except ValueError:  # null, or not a number
        return None


def parse_usage(last: bytes, prev: bytes = b"") -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) from a response's last two chunks, where the
    backend's `usage` object is; None for what is not there."""
    prompt = _usage_int(last, _PROMPT)
    completion = _usage_int(last, _COMPLETION)
    if prev and (prompt is None or completion is None):
        if prompt is None:
            prompt = _usage_int(prev, _PROMPT)
        if completion is None:
            completion = _usage_int(prev, _COMPLETION)
    return prompt, completion


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
            st = self._by_key[key] = BackendStats(ep.pool, safe_name(ep.name), ep.vendor)
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
        key = (pool, safe_name(prefill.name), safe_name(decode.name))
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


# ---------------------------------------------------------------------------- collector

_BACKEND = ["pool", "backend", "vendor"]


class MetricsCollector:
    """A prometheus_client collector that renders everything at scrape time.

    `state` is anything with `pools` (PoolTable) and `scraper` (MetricsScraper or None)
    attributes, read on every collect so that a reload's new objects are seen.
    """

    def __init__(self, metrics: ProxyMetrics, state: Any, clock: Any) -> None:
        self.metrics = metrics
        self.state = state
        self.clock = clock  # routing's clock (the proxy loop's), for scrape ages

    def describe(self) -> list[Metric]:
        return []  # registered with auto_describe off: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        pools: PoolTable = self.state.runtime.pools
        scraper: MetricsScraper | None = self.state.scraper
        m = self.metrics
        endpoints = list(pools.endpoints())
        m.prune(endpoints)
        rows = list(m.backend_stats(endpoints))

        info = GaugeMetricFamily("lbproxy_info", "lbproxy build information", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        # -- requests, retries, failures ------------------------------------------------
        req = CounterMetricFamily(
            "lbproxy_requests",
            "Client requests by the backend that answered (backend '' when lbproxy answered "
            "itself: bad request, unknown model, no backend, every attempt failed) and status",
            labels=[*_BACKEND, "route", "status"],
        )
        for _ep, st in rows:
            for (route, status), n in st.requests.items():
                req.add_metric([st.pool, st.backend, st.vendor, route, str(status)], n)
        for (pool, route, status), n in m.unrouted.items():
            req.add_metric([pool, "", "", route, str(status)], n)
        yield req

        retries = CounterMetricFamily(
            "lbproxy_retries",
            "Attempts given up on this backend and retried on another, by cause "
            "(connect_error, timeout, reset_after_send, bad_response, status_5xx, status_429; "
            "P/D legs: the same prefixed prefill_ or decode_)",
            labels=[*_BACKEND, "cause"],
        )
        failures = CounterMetricFamily(
            "lbproxy_upstream_failures",
            "Failed attempts on a backend, retried or not, by cause (the retry causes, and "
            "stream_disconnect / stream_timeout after the response started; P/D legs: "
            "prefill_<cause>, decode_<cause>)",
            labels=[*_BACKEND, "cause"],
        )
        disconnects = CounterMetricFamily(
            "lbproxy_client_disconnects",
            "Responses cut short because the client went away",
            labels=_BACKEND,
        )
        early = CounterMetricFamily(
            "lbproxy_client_disconnects_before_first_byte",
            "Clients that went away before the backend sent a body byte (also counted in "
            "lbproxy_client_disconnects)",
            labels=_BACKEND,
        )
        ejections = CounterMetricFamily(
            "lbproxy_backend_ejections",
            "Times the backend was taken out of rotation, by reason (failures: consecutive "
            "failed requests; stall: no first byte while requests waited; health_check)",
            labels=[*_BACKEND, "reason"],
        )
        health = getattr(self.state, "health", None)
        ejected: dict[tuple[str, str, str], int] = health.ejections if health else {}
        decisions = CounterMetricFamily(
            "lbproxy_routing_decisions",
            "Routing decisions by the pool's profile and the backend chosen first",
            labels=["pool", "profile", "backend", "vendor"],
        )
        profiles = {p.name: p.router.profile_name for p in pools.pools}
        for _ep, st in rows:
            lv = [st.pool, st.backend, st.vendor]
            for cause, n in st.retries.items():
                retries.add_metric([*lv, cause], n)
            for cause, n in st.failures.items():
                failures.add_metric([*lv, cause], n)
            disconnects.add_metric(lv, st.client_disconnects)
            early.add_metric(lv, st.disconnects_before_first_byte)
            decisions.add_metric(
                [st.pool, profiles.get(st.pool, ""), st.backend, st.vendor], st.decisions
            )
        for ep in endpoints:
            st = m.stats(ep)
            for reason in ("failures", "stall", "health_check"):
                n = ejected.get((ep.pool, ep.name, reason))
                if n:
                    ejections.add_metric([st.pool, st.backend, st.vendor, reason], n)
        yield from (retries, failures, disconnects, early, ejections, decisions)

        # -- latency and tokens ----------------------------------------------------------
        hists = (
            ("lbproxy_time_to_first_token_seconds", "ttft",
             "Request arrival at lbproxy to the first bytes of the backend's SSE stream"),
            ("lbproxy_inter_token_latency_seconds", "itl",
             "Mean gap between output tokens of each stream, counted once per gap "
             "(decode span / (completion tokens - 1), or / (body reads - 1))"),
            ("lbproxy_e2e_request_latency_seconds", "e2e",
             "Request arrival at lbproxy to the last byte relayed, successful requests"),
        )  # fmt: skip
        for name, attr, doc in hists:
            fam = HistogramMetricFamily(name, doc, labels=_BACKEND)
            for _ep, st in rows:
                h: Histogram = getattr(st, attr)
                fam.add_metric([st.pool, st.backend, st.vendor], h.buckets(), h.sum)
            yield fam
        for name, attr, doc in (
            ("lbproxy_prompt_tokens", "prompt_tokens", "Prompt tokens from responses' usage"),
            (
                "lbproxy_completion_tokens",
                "completion_tokens",
                "Completion tokens from responses' usage",
            ),
            (
                "lbproxy_stream_chunks",
                "stream_chunks",
                "Body reads relayed for SSE responses (about one per event at model speed)",
            ),
        ):
            fam = CounterMetricFamily(name, doc, labels=_BACKEND)
            for _ep, st in rows:
                fam.add_metric([st.pool, st.backend, st.vendor], getattr(st, attr))
            yield fam

        # -- live backend state ------------------------------------------------------------
        gauges = {
            "in_flight": GaugeMetricFamily(
                "lbproxy_in_flight_requests",
                "Requests lbproxy has in flight on the backend",
                labels=_BACKEND,
            ),
            "healthy": GaugeMetricFamily(
                "lbproxy_backend_healthy", "1 while the backend passes health checks",
                labels=_BACKEND,
            ),
            "draining": GaugeMetricFamily(
                "lbproxy_backend_draining", "1 while the backend is draining", labels=_BACKEND
            ),
            "waiting": GaugeMetricFamily(
                "lbproxy_backend_waiting_requests",
                "The backend's queue (vllm:num_requests_waiting) at its last scrape",
                labels=_BACKEND,
            ),
            "running": GaugeMetricFamily(
                "lbproxy_backend_running_requests",
                "The backend's running requests at its last scrape",
                labels=_BACKEND,
            ),
            "kv": GaugeMetricFamily(
                "lbproxy_backend_kv_cache_usage_ratio",
                "The backend's KV-cache usage (0-1) at its last scrape",
                labels=_BACKEND,
            ),
            "age": GaugeMetricFamily(
                "lbproxy_backend_scrape_age_seconds",
                "Seconds since the backend's last good /metrics scrape (+Inf: never)",
                labels=_BACKEND,
            ),
        }  # fmt: skip
        scrapes = CounterMetricFamily(
            "lbproxy_backend_scrapes", "Good /metrics scrapes of the backend", labels=_BACKEND
        )
        scrape_errors = CounterMetricFamily(
            "lbproxy_backend_scrape_errors",
            "Failed /metrics scrapes of the backend",
            labels=_BACKEND,
        )
        now = self.clock()
        for ep, st in rows:
            lv = [st.pool, st.backend, st.vendor]
            gauges["in_flight"].add_metric(lv, ep.in_flight)
            gauges["healthy"].add_metric(lv, 1.0 if ep.healthy else 0.0)
            gauges["draining"].add_metric(lv, 1.0 if ep.draining else 0.0)
            snap = ep.metrics
            if snap is not None:
                for key, value in (
                    ("waiting", snap.num_waiting),
                    ("running", snap.num_running),
                    ("kv", snap.kv_cache_usage),
                ):
                    if value is not None:
                        gauges[key].add_metric(lv, value)
            gauges["age"].add_metric(lv, now - snap.time if snap else float("inf"))
            if scraper is not None:
                scrapes.add_metric(lv, scraper.successes.get(ep, 0))
                scrape_errors.add_metric(lv, scraper.errors.get(ep, 0))
        yield from gauges.values()
        yield from (scrapes, scrape_errors)

        # -- flow control --------------------------------------------------------------------
        yield from self._flow_families(pools, rows)

        # -- prefill/decode disaggregation --------------------------------------------------
        yield from self._pd_families()

        # -- prefix indexes ------------------------------------------------------------------
        yield from self._prefix_families(pools)

    def _pd_families(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "lbproxy_pd_requests",
            "Requests of prefill/decode pools by how they were served (disaggregated, "
            "aggregated) and why (split, re_prefill, client_left; short_prompt, "
            "no_prefill_backend, no_decode_backend, route, client_kv_params, prefill_failed, "
            "decode_failed)",
            labels=["pool", "mode", "reason"],
        )
        for (pool, mode, reason), n in m.pd_requests.items():
            requests.add_metric([pool, mode, reason], n)
        pair = ["pool", "prefill_backend", "decode_backend"]
        prefill = HistogramMetricFamily(
            "lbproxy_pd_prefill_seconds",
            "Split requests: the prefill leg, sent to answer read, by backend pair",
            labels=pair,
        )
        for key, h in m.pd_prefill.items():
            prefill.add_metric(list(key), h.buckets(), h.sum)
        ttft = HistogramMetricFamily(
            "lbproxy_pd_decode_ttft_seconds",
            "Split streaming requests: the decode leg, sent to its first body bytes (KV "
            "pull included), by backend pair",
            labels=pair,
        )
        for key, h in m.pd_decode_ttft.items():
            ttft.add_metric(list(key), h.buckets(), h.sum)
        yield from (requests, prefill, ttft)

    def _flow_families(
        self, pools: PoolTable, rows: list[tuple[Endpoint, BackendStats]]
    ) -> Iterator[Metric]:
        queued = GaugeMetricFamily(
            "lbproxy_flow_queue_length",
            "Requests waiting in lbproxy for a backend that can take them, by priority",
            labels=["pool", "priority"],
        )
        waited = HistogramMetricFamily(
            "lbproxy_flow_queue_wait_seconds",
            "Time requests waited in lbproxy before being dispatched or shed (0: at once)",
            labels=["pool"],
        )
        dispatches = CounterMetricFamily(
            "lbproxy_flow_dispatches",
            "Requests dispatched to a backend: at once (direct) or after waiting (queued)",
            labels=["pool", "path"],
        )
        shed = CounterMetricFamily(
            "lbproxy_flow_shed",
            "Requests flow control refused or gave up (queue_full, max_wait, expected_wait; "
            "client_left: the client went away while waiting)",
            labels=["pool", "reason"],
        )
        limit = GaugeMetricFamily(
            "lbproxy_backend_concurrency_limit",
            "Requests flow control lets the backend have in flight (adaptive)",
            labels=_BACKEND,
        )
        decode = GaugeMetricFamily(
            "lbproxy_backend_decode_latency_seconds",
            "The backend's inter-token latency as flow control's limiter last measured it",
            labels=_BACKEND,
        )
        gates = {p.name: p.gate for p in pools.pools if p.gate is not None}
        for name, gate in gates.items():
            ctl = gate.controller
            for prio, n in sorted(ctl.queue.lengths().items()):
                queued.add_metric([name, str(prio)], n)
            if not ctl.queue.size:
                queued.add_metric([name, "0"], 0)
            waited.add_metric([name], gate.waited.buckets(), gate.waited.sum)
            dispatches.add_metric([name, "direct"], ctl.dispatched_direct)
            dispatches.add_metric([name, "queued"], ctl.dispatched_queued)
            for reason, n in ctl.shed_counts.items():
                shed.add_metric([name, reason], n)
        for ep, st in rows:
            gate = gates.get(ep.pool)
            if gate is None:
                continue
            lv = [st.pool, st.backend, st.vendor]
            limit.add_metric(lv, gate.controller.limit_of(ep))
            itl = gate.controller.limiter(ep).itl
            if itl is not None:
                decode.add_metric(lv, itl)
        yield from (queued, waited, dispatches, shed, limit, decode)

    def _prefix_families(self, pools: PoolTable) -> Iterator[Metric]:
        idx = ["pool", "index"]
        entries = GaugeMetricFamily(
            "lbproxy_prefix_index_entries", "(backend, block) entries held", labels=idx
        )
        keys = GaugeMetricFamily(
            "lbproxy_prefix_index_keys",
            "Distinct keys: prompt heads (prefix-hash), block hashes (precise-prefix)",
            labels=idx,
        )
        memory = GaugeMetricFamily(
            "lbproxy_prefix_index_memory_bytes", "Estimated memory of the index", labels=idx
        )
        hits = CounterMetricFamily(
            "lbproxy_prefix_index_hit_blocks",
            "Leading prompt blocks the index believed the chosen backend held, when routing",
            labels=[*idx, "backend"],
        )
        queries = CounterMetricFamily(
            "lbproxy_prefix_index_query_blocks",
            "Prompt blocks looked up for requests routed to the backend",
            labels=[*idx, "backend"],
        )
        events = CounterMetricFamily(
            "lbproxy_prefix_index_kv_events",
            "KV-cache event outcomes applied to the precise index",
            labels=["pool", "event"],
        )
        for pool in pools.pools:
            for ws in pool.router.scorers:
                sc = ws.scorer
                if not hasattr(sc, "hit_blocks"):
                    continue
                name = sc.name
                for backend, n in sc.hit_blocks.items():
                    hits.add_metric([pool.name, name, safe_name(backend)], n)
                for backend, n in sc.query_blocks.items():
                    queries.add_metric([pool.name, name, safe_name(backend)], n)
                if name == "prefix-hash":
                    s = sc.index.stats()
                    entries.add_metric([pool.name, name], s["entries"])
                    keys.add_metric([pool.name, name], s["hashes"])
                    memory.add_metric([pool.name, name], s["approx_bytes"])
            precise = pool.bctx.shared.get("precise_index")
            if precise is not None:
                s = precise.stats()
                entries.add_metric([pool.name, "precise-prefix"], s["entries"])
                keys.add_metric([pool.name, "precise-prefix"], s["keys"])
                memory.add_metric([pool.name, "precise-prefix"], s["approx_bytes"])
                for event, n in precise.counters.items():
                    events.add_metric([pool.name, event], n)
        yield from (entries, keys, memory, hits, queries, events)
