"""Per-request records and the arithmetic that turns a rate step's records into figures.

Pure: no clock, no I/O. Live bench and offline simulate both produce `RequestRecord`s
(times in seconds from the step's start, in the target's time) and share this code, so
their figures mean the same thing:

- A step offers Poisson arrivals during `duration` seconds; every request then runs to
  completion or is cut at the step's deadline ("incomplete").
- `elapsed_s`: from the first request's send to the end of the last one (completion or
  cut); requests and tokens per second divide by it (as vLLM's benchmark and
  inference-perf do).
- `output_tokens_per_s`: output tokens streamed to completed and cut requests / elapsed_s.
  This is what the fleet delivered, and it depends little on where the deadline falls
  (with no deadline every request completes and it is inference-perf's figure).
- `completed_output_tokens_per_s`: output tokens of completed requests only / elapsed_s,
  a goodput within the step's deadline: under overload it drops as concurrency rises.
- `requests_per_s`: completed requests / elapsed_s.
- TTFT: first token - send time. A request cut before its first token counts with its
  wait so far (a lower bound), so an overloaded step does not look fast by leaving out
  the requests it never served. Failed requests are left out of latencies.
- ITL: every gap between two token chunks of a request (all requests pooled).
- End-to-end latency: completed requests only.
- Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Status = Literal["ok", "error", "incomplete"]


@dataclass(slots=True)
class RequestRecord:
    start: float  # sent, seconds from the step's start
    status: Status = "ok"
    first_token: float | None = None  # seconds from the step's start
    end: float | None = None  # finished, failed or cut
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    itl: Sequence[float] = field(default_factory=list)  # gaps between token chunks
    error: str | None = None
    backend: str | None = None

    @property
    def ttft(self) -> float | None:
        if self.first_token is not None:
            return self.first_token - self.start
        if self.status == "incomplete" and self.end is not None:
            return self.end - self.start  # lower bound: still waiting when cut
        return None


def percentile(values: Sequence[float] | np.ndarray, p: float) -> float | None:
    """The p-th percentile (0-100) with linear interpolation; None for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {p}")
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return None
    return float(np.percentile(arr, p))


def _pcts(values: Sequence[float] | np.ndarray, ps: Iterable[float]) -> list[float | None]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return [None for _ in ps]
    return [float(v) for v in np.percentile(arr, list(ps))]


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def summarize_step(
    records: Sequence[RequestRecord], *, rate: float, duration: float
) -> dict[str, Any]:
    """The figures of one rate step (the `steps[]` entry of results.json, see report)."""
    ok = [r for r in records if r.status == "ok"]
    cut = [r for r in records if r.status == "incomplete"]
    served = ok + cut
    ends = [r.end for r in served if r.end is not None]
    elapsed = max(ends) - min(r.start for r in served) if ends else 0.0
    done_tokens = sum(r.output_tokens for r in ok)
    out_tokens = done_tokens + sum(r.output_tokens for r in cut)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached_tokens = sum(r.cached_tokens for r in ok)
    ttfts = [t for r in served if (t := r.ttft) is not None]
    e2e = [r.end - r.start for r in ok if r.end is not None]
    if served:
        itl = np.concatenate([np.asarray(r.itl, dtype=np.float64) for r in served])
    else:
        itl = np.empty(0)
    ttft50, ttft90, ttft99 = _pcts(ttfts, (50, 90, 99))
    itl50, itl90, itl99 = _pcts(itl, (50, 90, 99))
    e2e50, e2e90, e2e99 = _pcts(e2e, (50, 90, 99))
    return {
        "rate": float(rate),
        "duration_s": float(duration),
        "requests": len(records),
        "completed": len(ok),
        "incomplete": len(cut),
        "errors": len(records) - len(served),
        "elapsed_s": elapsed,
        "requests_per_s": _rate(len(ok), elapsed),
        "output_tokens_per_s": _rate(out_tokens, elapsed),
        "output_tokens": out_tokens,
        "completed_output_tokens_per_s": _rate(done_tokens, elapsed),
        "prompt_tokens_per_s": _rate(prompt_tokens, elapsed),
        "prefix_cache_hit_rate": cached_tokens / prompt_tokens if prompt_tokens else None,
        "ttft_mean_s": float(np.mean(ttfts)) if ttfts else None,
        "ttft_p50_s": ttft50,
        "ttft_p90_s": ttft90,
        "ttft_p99_s": ttft99,
        "itl_mean_s": float(itl.mean()) if itl.size else None,
        "itl_p50_s": itl50,
        "itl_p90_s": itl90,
        "itl_p99_s": itl99,
        "e2e_p50_s": e2e50,
        "e2e_p90_s": e2e90,
        "e2e_p99_s": e2e99,
    }


def poisson_arrivals(
    rate: float, duration: float, seed: int, *, max_requests: int | None = None
) -> list[float]:
    """Open-loop arrival times in [0, duration): exponential gaps of mean 1/rate.

    The same (rate, duration, seed) always gives the same times, so a live run and a
    simulated one offer identical traffic.
    """
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number, got {rate!r}")
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration!r}")
    rng = np.random.default_rng([seed, int(rate * 1000)])
    cap = max_requests if max_requests is not None else 1 << 62
    out: list[float] = []
    t = 0.0
    while len(out) < cap:
        # Draw in chunks: a 200 req/s, 60 s step needs ~12K draws.
        gaps = rng.exponential(1.0 / rate, size=max(64, int(rate * duration * 0.25)))
        for g in gaps.tolist():
            t += g
            if t >= duration or len(out) >= cap:
                return out
            out.append(t)
    return out
