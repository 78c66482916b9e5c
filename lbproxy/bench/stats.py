"""Per-request records and the arithmetic that turns a rate step's records into figures.

Pure: no clock, no I/O. Live bench and offline simulate both produce `RequestRecord`s
(times in seconds from the step's start, in the target's time) and share this code, so
their figures mean the same thing:

- A step offers Poisson arrivals during `duration` seconds (the arrival window); every
  request then runs to completion or is cut at the step's deadline (`duration + drain`,
  status "incomplete"). A request lbproxy itself answered 429 or 503 (shed by flow
  control) is "rejected"; any other failure is an "error".
- Rates divide by the arrival window `duration`, not by the time to the last token, so a
  step below capacity whose last requests finish late is not reported as a throughput
  loss, and a perfect router on a fleet at capacity scores the fleet's bound (offered
  tokens / duration):
  - `output_tokens_per_s`: output tokens of the step's completed and cut requests /
    duration (tokens counted per chunk, so a cut request counts exactly what it received).
  - `completed_output_tokens_per_s`: output tokens of the requests that finished without
    error / duration.
  - `goodput_output_tokens_per_s`: the same, only requests that met the SLO.
  - `requests_per_s`: completed requests / duration; `prompt_tokens_per_s`: prompt tokens
    of completed requests / duration.
- `delivered_output_tokens_per_s`: output tokens of completed and cut requests /
  `elapsed_s`, from the first request's send to the end of the last served one
  (completion or cut): the rate the fleet delivered at, meaningful past capacity (before
  this key existed, `output_tokens_per_s` meant this).
- SLO (`slo_ttft`, default 5 s; `slo_itl`, default 0.1 s): a request meets it when it
  completed, its TTFT <= slo_ttft, and its mean inter-token latency
  (end - first token) / (output tokens - 1) <= slo_itl (a request with at most one output
  token meets the ITL part). TTFT runs from the request's send, so the time lbproxy's flow
  control held it counts in it.
- `slo_attainment`: requests that met the SLO / all of the step's requests (rejected,
  failed and cut requests count as not meeting it); null for an empty step.
- `rejected`: requests answered 429/503 by lbproxy; `errors`: requests that failed for any
  other reason. Neither counts in throughput or latency figures.
- `queue_wait_p50_s`, `queue_wait_p99_s`: over the requests whose queue wait (time held by
  flow control before dispatch, from the `x-lbproxy-queue-wait` header live) is known;
  null when none is.
- TTFT: first token - send time. A request cut before its first token counts with its
  wait so far (a lower bound), so an overloaded step does not look fast by leaving out
  the requests it never served. Failed and rejected requests are left out of latencies.
- ITL: every gap between two token chunks of a request (all served requests pooled).
- End-to-end latency: completed requests only.
- `classes` (only when records carry a traffic class, `klass`): per class name, the same
  figures computed by the same code on that class's records: requests, completed,
  incomplete, rejected, errors, TTFT p50/p90/p99, queue wait p50/p99, output, completed
  and goodput tokens/s (of the whole arrival window) and SLO attainment.
- Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Status = Literal["ok", "error", "incomplete", "rejected"]


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
    queue_wait: float | None = None  # seconds lbproxy's flow control held it; None: unknown
    klass: str | None = None  # traffic class name (bench/mix.py)

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


# Keys of a class's entry in `classes`, taken from the class's own summary.
CLASS_KEYS = (
    "requests",
    "completed",
    "incomplete",
    "rejected",
    "errors",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "queue_wait_p50_s",
    "queue_wait_p99_s",
    "output_tokens_per_s",
    "completed_output_tokens_per_s",
    "goodput_output_tokens_per_s",
    "slo_attainment",
)


def meets_slo(r: RequestRecord, slo_ttft: float, slo_itl: float) -> bool:
    """Completed, TTFT <= slo_ttft and mean inter-token latency <= slo_itl."""
    if r.status != "ok" or r.end is None:
        return False
    first = r.first_token if r.first_token is not None else r.end
    if first - r.start > slo_ttft:
        return False
    n = r.output_tokens
    return n <= 1 or (r.end - first) / (n - 1) <= slo_itl


def summarize_step(
    records: Sequence[RequestRecord],
    *,
    rate: float,
    duration: float,
    slo_ttft: float = 5.0,
    slo_itl: float = 0.1,
    warmup: float = 0.0,
) -> dict[str, Any]:
    """The figures of one rate step (the `steps[]` entry of results.json, see report);
    with traffic classes on the records, a `classes` entry per class as well.

    `warmup`: requests sent in the first `warmup` seconds of the arrival window are not
    counted, and per-second figures divide by the rest of the window (`duration_s` is that
    rest). A step starts on an idle fleet, which first fills: a window not much longer than
    a request's lifetime then counts more than the fleet's steady rate."""
    if warmup:
        if not 0 <= warmup < duration:
            raise ValueError(f"warmup must be within [0, duration), got {warmup}")
        records = [r for r in records if r.start >= warmup]
        duration -= warmup
    step = _summary(records, rate, duration, slo_ttft, slo_itl)
    step["warmup_s"] = float(warmup)
    by_class: dict[str, list[RequestRecord]] = {}
    for r in records:
        if r.klass is not None:
            by_class.setdefault(r.klass, []).append(r)
    if by_class:
        classes = {}
        for name in sorted(by_class):
            sub = by_class[name]
            share = rate * len(sub) / len(records)
            s = _summary(sub, share, duration, slo_ttft, slo_itl)
            classes[name] = {k: s[k] for k in CLASS_KEYS}
        step["classes"] = classes
    return step


def _summary(
    records: Sequence[RequestRecord],
    rate: float,
    duration: float,
    slo_ttft: float,
    slo_itl: float,
) -> dict[str, Any]:
    ok = [r for r in records if r.status == "ok"]
    cut = [r for r in records if r.status == "incomplete"]
    rejected = sum(1 for r in records if r.status == "rejected")
    served = ok + cut
    ends = [r.end for r in served if r.end is not None]
    elapsed = max(ends) - min(r.start for r in served) if ends else 0.0
    done_tokens = sum(r.output_tokens for r in ok)
    out_tokens = done_tokens + sum(r.output_tokens for r in cut)
    good = [r for r in ok if meets_slo(r, slo_ttft, slo_itl)]
    good_tokens = sum(r.output_tokens for r in good)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    cached_tokens = sum(r.cached_tokens for r in ok)
    ttfts = [t for r in served if (t := r.ttft) is not None]
    e2e = [r.end - r.start for r in ok if r.end is not None]
    waits = [r.queue_wait for r in records if r.queue_wait is not None]
    if served:
        itl = np.concatenate([np.asarray(r.itl, dtype=np.float64) for r in served])
    else:
        itl = np.empty(0)
    ttft50, ttft90, ttft99 = _pcts(ttfts, (50, 90, 99))
    itl50, itl90, itl99 = _pcts(itl, (50, 90, 99))
    e2e50, e2e90, e2e99 = _pcts(e2e, (50, 90, 99))
    wait50, wait99 = _pcts(waits, (50, 99))
    return {
        "rate": float(rate),
        "duration_s": float(duration),
        "requests": len(records),
        "completed": len(ok),
        "incomplete": len(cut),
        "rejected": rejected,
        "errors": len(records) - len(served) - rejected,
        "elapsed_s": elapsed,
        "requests_per_s": _rate(len(ok), duration),
        "output_tokens_per_s": _rate(out_tokens, duration),
        "output_tokens": out_tokens,
        "delivered_output_tokens_per_s": _rate(out_tokens, elapsed),
        "completed_output_tokens_per_s": _rate(done_tokens, duration),
        "goodput_output_tokens_per_s": _rate(good_tokens, duration),
        "slo_attainment": len(good) / len(records) if records else None,
        "slo_ttft_s": float(slo_ttft),
        "slo_itl_s": float(slo_itl),
        "prompt_tokens_per_s": _rate(prompt_tokens, duration),
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
        "queue_wait_p50_s": wait50,
        "queue_wait_p99_s": wait99,
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
