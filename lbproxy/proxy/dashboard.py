"""The live dashboard: a self-contained page and the JSON it polls every second.

`DashboardSampler` reads lbproxy's counters once per `interval` (never per request) and
keeps a ring buffer of recent samples: requests/s, completion tokens/s and mean TTFT, in
total and per backend. `state()` adds the live state of every backend (health, in-flight,
queue, KV use, prefix-hit estimates, scrape age). The page (`static/dashboard.html`) has no
external resource: its charts are inline SVG drawn by its own script.

`GET /dashboard/state.json` (all rates per second, times in seconds, unknown -> null):

    {"version", "time" (unix), "uptime_s", "interval_s", "window_s",
     "totals": {"requests", "in_flight", "retries", "errors_5xx", "completion_tokens",
                "rps", "tokens_per_s", "ttft_s"},           # rates over the last window_s
     "pools": [{"name", "profile", "backends", "healthy",
                "prefix_index": {index name: {"entries", "keys", "memory_bytes"}}}],
     "backends": [{"id" ("pool/name"), "pool", "name", "vendor", "healthy", "draining",
                   "in_flight", "queue", "running", "kv_cache_usage",
                   "prefix_hit_est",       # the router's estimate: hit / routed blocks
                   "backend_prefix_hit",   # the backend's prefix-cache hits / queries, window
                   "ttft_s", "rps", "tokens_per_s",         # over the last window_s
                   "requests", "errors_5xx", "scrape_age_s", "scrape_error"}],
     "series": {"t": [unix...], "rps": [...], "tokens_per_s": [...], "ttft_s": [...],
                "backends": {id: {"rps": [...], "ttft_s": [...]}}}}
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from importlib.resources import files
from typing import Any

from lbproxy import __version__
from lbproxy.aio import PeriodicTask, loop_time
from lbproxy.credentials import without_credentials
from lbproxy.proxy.request_metrics import ProxyMetrics
from lbproxy.routing.state import Endpoint

__all__ = ["DashboardSampler", "dashboard_html"]

_HTML: bytes | None = None


def dashboard_html() -> bytes:
    global _HTML
    if _HTML is None:
        _HTML = files("lbproxy.proxy").joinpath("static/dashboard.html").read_bytes()
    return _HTML


def _key(ep: Endpoint) -> str:
    return f"{ep.pool}/{without_credentials(ep.name)}"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


# Cumulative counters of one backend at one sample.
_T, _REQ, _TOK, _TTFT_SUM, _TTFT_N, _ERR, _HITS, _QUERIES = range(8)


class DashboardSampler:
    """Samples counters every `interval` seconds; keeps `keep` samples."""

    def __init__(
        self,
        metrics: ProxyMetrics,
        state: Any,
        *,
        interval: float = 1.0,
        keep: int = 300,
        window: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.state = state  # has .runtime, .scraper, .started
        self.interval = interval
        self.window = window  # samples the table's rates are computed over
        self.clock = clock
        self.series: deque[dict[str, Any]] = deque(maxlen=keep)
        self._hist: dict[str, deque[tuple[float, ...]]] = {}
        self._sampler = PeriodicTask("dashboard-sampler", self.sample, lambda: self.interval)

    async def start(self) -> None:
        if not self._sampler.running:
            self.sample()
            self._sampler.start()

    async def stop(self) -> None:
        await self._sampler.stop()

    # ---- sampling ------------------------------------------------------------------------

    def _counters(self, ep: Endpoint, now: float) -> tuple[float, ...]:
        st = self.metrics.stats(ep)
        errors = sum(n for (_r, status), n in st.requests.items() if status >= 500)
        snap = ep.metrics
        hits = snap.prefix_cache_hits if snap is not None else None
        queries = snap.prefix_cache_queries if snap is not None else None
        return (
            now,
            st.total_requests(),
            st.completion_tokens,
            st.ttft.sum,
            st.ttft.count,
            errors,
            -1.0 if hits is None else hits,
            -1.0 if queries is None else queries,
        )

    def sample(self) -> None:
        """Take one sample of every current backend (called by the background task)."""
        now = self.clock()
        live: set[str] = set()
        point: dict[str, Any] = {"t": time.time(), "backends": {}}
        tot_req = tot_tok = tot_ttft = tot_n = 0.0
        dt_any = 0.0
        for ep in self.state.runtime.pools.endpoints():
            key = _key(ep)
            live.add(key)
            hist = self._hist.get(key)
            if hist is None:
                hist = self._hist[key] = deque(maxlen=self.window + 1)
            cur = self._counters(ep, now)
            prev = hist[-1] if hist else None
            hist.append(cur)
            if prev is None:
                continue
            dt = cur[_T] - prev[_T]
            if dt <= 0:
                continue
            dt_any = dt
            d_req = cur[_REQ] - prev[_REQ]
            d_n = cur[_TTFT_N] - prev[_TTFT_N]
            d_sum = cur[_TTFT_SUM] - prev[_TTFT_SUM]
            d_tok = cur[_TOK] - prev[_TOK]
            point["backends"][key] = {"rps": d_req / dt, "ttft_s": _ratio(d_sum, d_n)}
            tot_req += d_req
            tot_tok += d_tok
            tot_ttft += d_sum
            tot_n += d_n
        for key in [k for k in self._hist if k not in live]:
            del self._hist[key]
        if dt_any > 0:
            point["rps"] = tot_req / dt_any
            point["tokens_per_s"] = tot_tok / dt_any
            point["ttft_s"] = _ratio(tot_ttft, tot_n)
            self.series.append(point)

    # ---- the JSON ------------------------------------------------------------------------

    def _window(self, key: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        hist = self._hist.get(key)
        if not hist or len(hist) < 2:
            return None
        return hist[0], hist[-1]

    def state_json(self) -> dict[str, Any]:
        st = self.state
        scraper = st.scraper
        scrape_now = loop_time()  # the clock snapshots are stamped with agrees with it
        backends = []
        totals = {"requests": 0, "in_flight": 0, "retries": 0, "errors_5xx": 0,
                  "completion_tokens": 0}  # fmt: skip
        w_req = w_tok = w_ttft = w_n = 0.0
        w_dt = 0.0
        pools = st.runtime.pools  # one snapshot for the whole answer
        for ep in pools.endpoints():
            key = _key(ep)
            stats = self.metrics.stats(ep)
            cur = self._counters(ep, self.clock())
            win = self._window(key)
            rps = tps = ttft = hit = None
            if win is not None:
                a, b = win
                dt = b[_T] - a[_T]
                if dt > 0:
                    rps = (b[_REQ] - a[_REQ]) / dt
                    tps = (b[_TOK] - a[_TOK]) / dt
                    ttft = _ratio(b[_TTFT_SUM] - a[_TTFT_SUM], b[_TTFT_N] - a[_TTFT_N])
                    w_req += b[_REQ] - a[_REQ]
                    w_tok += b[_TOK] - a[_TOK]
                    w_ttft += b[_TTFT_SUM] - a[_TTFT_SUM]
                    w_n += b[_TTFT_N] - a[_TTFT_N]
                    w_dt = max(w_dt, dt)
                if a[_QUERIES] >= 0 and b[_QUERIES] >= 0:
                    hit = _ratio(b[_HITS] - a[_HITS], b[_QUERIES] - a[_QUERIES])
            snap = ep.metrics
            retries = sum(stats.retries.values())
            backends.append(
                {
                    "id": key,
                    "pool": ep.pool,
                    "name": stats.backend,
                    "vendor": ep.vendor,
                    "healthy": ep.healthy,
                    "draining": ep.draining,
                    "in_flight": ep.in_flight,
                    "queue": snap.num_waiting if snap else None,
                    "running": snap.num_running if snap else None,
                    "kv_cache_usage": snap.kv_cache_usage if snap else None,
                    "prefix_hit_est": self._prefix_estimate(ep),
                    "backend_prefix_hit": hit,
                    "ttft_s": ttft,
                    "rps": rps,
                    "tokens_per_s": tps,
                    "requests": int(cur[_REQ]),
                    "errors_5xx": int(cur[_ERR]),
                    "scrape_age_s": scrape_now - snap.time if snap else None,
                    "scrape_error": scraper.last_error.get(ep) if scraper else None,
                    "concurrency_limit": (
                        gate.controller.limit_of(ep) if (gate := pools.gate_of(ep)) else None
                    ),
                }
            )
            totals["requests"] += int(cur[_REQ])
            totals["in_flight"] += ep.in_flight
            totals["retries"] += retries
            totals["errors_5xx"] += int(cur[_ERR])
            totals["completion_tokens"] += stats.completion_tokens
        for (_pool, _route, status), n in self.metrics.unrouted.items():
            totals["requests"] += n
            if status >= 500:
                totals["errors_5xx"] += n
        out_totals: dict[str, Any] = dict(totals)
        out_totals["rps"] = w_req / w_dt if w_dt else None
        out_totals["tokens_per_s"] = w_tok / w_dt if w_dt else None
        out_totals["ttft_s"] = _ratio(w_ttft, w_n)

        series = list(self.series)
        keys = [b["id"] for b in backends]
        return {
            "version": __version__,
            "time": time.time(),
            "uptime_s": time.time() - st.started,
            "interval_s": self.interval,
            "window_s": self.interval * self.window,
            "totals": out_totals,
            "pools": [self._pool_json(p) for p in pools.pools],
            "backends": backends,
            "series": {
                "t": [p["t"] for p in series],
                "rps": [p["rps"] for p in series],
                "tokens_per_s": [p["tokens_per_s"] for p in series],
                "ttft_s": [p["ttft_s"] for p in series],
                "backends": {
                    k: {
                        "rps": [p["backends"].get(k, {}).get("rps") for p in series],
                        "ttft_s": [p["backends"].get(k, {}).get("ttft_s") for p in series],
                    }
                    for k in keys
                },
            },
        }

    def _prefix_estimate(self, ep: Endpoint) -> float | None:
        """Hit blocks / routed blocks for `ep`, summed over its pool's prefix scorers."""
        for pool in self.state.runtime.pools.pools:
            if pool.name != ep.pool:
                continue
            hit = total = 0
            for sc in pool.router.index_stats:
                hit += sc.hit_blocks.get(ep.name, 0)
                total += sc.query_blocks.get(ep.name, 0)
            return _ratio(hit, total)
        return None

    @staticmethod
    def _pool_json(pool: Any) -> dict[str, Any]:
        index: dict[str, Any] = {}
        for router in pool.routers():
            for sc in router.index_stats:
                if sc.name not in index:  # P/D routers share the pool's precise index
                    st = sc.index_stats()
                    index[sc.name] = {
                        "entries": st["entries"],
                        "keys": st["keys"],
                        "memory_bytes": st["approx_bytes"],
                    }
        return {
            "name": pool.name,
            "profile": pool.router.profile_name,
            "backends": len(pool.endpoints),
            "healthy": sum(1 for ep in pool.endpoints if ep.healthy and not ep.draining),
            "prefix_index": index,
            "flow": pool.gate.pool_json() if pool.gate is not None else None,
        }
