"""The Prometheus collector of `/metrics`: everything rendered at scrape time.

It reads the request recorder's records (`request_metrics`), the endpoints' live state,
the metrics scraper's counters, flow control, and the routing plugins' own statistics
(through the protocols of `routing.interfaces`, labelled by the plugin's name).

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

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from lbproxy import __version__
from lbproxy.credentials import without_credentials
from lbproxy.histogram import Histogram
from lbproxy.proxy.request_metrics import BackendStats, ProxyMetrics
from lbproxy.routing.pipeline import TIME_EVERY
from lbproxy.routing.plugins.precise_prefix import SHARED_KEY as PRECISE_INDEX_KEY

if TYPE_CHECKING:
    from lbproxy.proxy.pools import PoolTable
    from lbproxy.routing.state import Endpoint
    from lbproxy.signals.scraper import MetricsScraper

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
        yield self._plugin_seconds(pools)

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
            routers = pool.routers()
            # Hit/query counters of the pool's own router (as the dashboard shows them);
            # index sizes of every router, once per plugin name (P/D routers share the
            # precise index with the pool's router).
            for sc in routers[0].index_stats:
                for backend, n in sc.hit_blocks.items():
                    hits.add_metric([pool.name, sc.name, without_credentials(backend)], n)
                for backend, n in sc.query_blocks.items():
                    queries.add_metric([pool.name, sc.name, without_credentials(backend)], n)
            seen: set[str] = set()
            for router in routers:
                for sc in router.index_stats:
                    if sc.name in seen:
                        continue
                    seen.add(sc.name)
                    s = sc.index_stats()
                    entries.add_metric([pool.name, sc.name], s["entries"])
                    keys.add_metric([pool.name, sc.name], s["keys"])
                    memory.add_metric([pool.name, sc.name], s["approx_bytes"])
            precise = pool.bctx.shared.get(PRECISE_INDEX_KEY)  # fed by the KV-event feed
            if precise is not None:
                for event, n in precise.counters.items():
                    events.add_metric([pool.name, event], n)
        yield from (entries, keys, memory, hits, queries, events)

    @staticmethod
    def _plugin_seconds(pools: PoolTable) -> Metric:
        fam = HistogramMetricFamily(
            "lbproxy_routing_plugin_seconds",
            f"Time of one routing plugin's filter, score or pick call, sampled: one "
            f"decision in {TIME_EVERY} is timed (P/D routers of a pool counted together)",
            labels=["pool", "plugin"],
        )
        for pool in pools.pools:
            merged: dict[str, Histogram] = {}
            for router in pool.routers():
                for name, h in router.plugin_seconds.items():
                    m = merged.get(name)
                    if m is None:
                        m = merged[name] = Histogram(h.bounds)
                    m.counts = [a + b for a, b in zip(m.counts, h.counts, strict=True)]
                    m.sum += h.sum
            for name, h in merged.items():
                fam.add_metric([pool.name, name], h.buckets(), h.sum)
        return fam
