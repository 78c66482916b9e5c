"""The plain data routing reads: request context, endpoint state, metrics snapshot, decision.

Everything here is a value or a mutable record owned by someone else (the proxy or the
offline simulator); routing code only reads endpoint state and never performs I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from lbproxy.routing.prompt import prompt_bytes_from_body

# Changes to what is scraped (a snapshot or a KV-cache geometry assigned to an endpoint,
# a snapshot's field written) take a fresh number from _EPOCHS into _LOAD_EPOCH[0], so that
# plugins can reuse what they computed from them until the next change
# (`routing.load_cache`). Numbers are never reused (`next` on a count is atomic), so a
# change made on another thread (the scraper's) is never mistaken for none.
_EPOCHS = count(1)
_LOAD_EPOCH = [0]
_SCRAPED_FIELDS = frozenset({"metrics", "block_size", "num_gpu_blocks"})
_set = object.__setattr__


def load_epoch() -> int:
    """A number that changes whenever any endpoint's metrics or KV geometry change."""
    return _LOAD_EPOCH[0]


@dataclass(slots=True)
class MetricsSnapshot:
    """One scrape of a backend's /metrics, reduced to what routing uses.

    `time` is when the scrape completed (the caller's clock). Fields a backend did not
    report are None so that "unknown" is never mistaken for "zero".
    """

    time: float
    num_running: float | None = None
    num_waiting: float | None = None
    kv_cache_usage: float | None = None  # 0..1
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    prefix_cache_queries: float | None = None  # tokens, cumulative
    prefix_cache_hits: float | None = None  # tokens, cumulative
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    num_preemptions: float | None = None
    # vllm:inter_token_latency_seconds' _sum and _count: mean ITL over an interval.
    itl_sum: float | None = None  # seconds, cumulative
    itl_count: float | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Snapshots are written once per scrape (and edited in place by tests and tools):
        # every write counts as a load change.
        _set(self, name, value)
        _LOAD_EPOCH[0] = next(_EPOCHS)


@dataclass(slots=True)
class Progress:
    """Whether an endpoint answers: first bytes of its responses, for stall detection.

    Written by the forwarder (a few attribute writes per attempt, none per chunk) and read
    by the health checker, which owns the rules (see `signals.health`).
    """

    waiting: int = 0  # attempts sent that have had no first body byte yet
    owing: bool = False  # requests were sent and no first byte came back since `since`
    since: float = 0.0
    last_unanswered: float = 0.0  # when an attempt last ended without a first byte
    # Recent send -> first body byte latencies (seconds): what "overdue" is relative to.
    ttfb: deque[float] = field(default_factory=lambda: deque(maxlen=32))
    generated: float | None = None  # the scraped generation-token counter, last seen
    probe: int = 0  # half-open after a stall: 1 a probe is wanted, 2 it is out


@dataclass(slots=True, eq=False)
class Endpoint:
    """A backend as routing sees it. Identity is the object itself (eq=False)."""

    name: str
    url: str
    vendor: str = "unknown"
    labels: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    pool: str = ""
    role: str = "both"  # prefill | decode | both: its side in a P/D split (routing.disagg)
    # Live state, written by the proxy (in-flight) and by signals (metrics, health).
    healthy: bool = True
    draining: bool = False
    in_flight: int = 0
    # Uncached prompt tokens of the P/D prefill legs it runs (`routing.disagg.prefill_leg_*`).
    prefill_tokens: int = 0
    metrics: MetricsSnapshot | None = None
    progress: Progress = field(default_factory=Progress)
    # Known KV-cache geometry (from vllm:cache_config_info or configuration).
    block_size: int | None = None
    num_gpu_blocks: int | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # A new snapshot or geometry is a change (see load_epoch). Other writes (in-flight
        # counts, twice per request) pay only this call: routing reads them live.
        _set(self, name, value)
        if name in _SCRAPED_FIELDS:
            _LOAD_EPOCH[0] = next(_EPOCHS)

    def fresh_metrics(self, now: float, max_age: float) -> MetricsSnapshot | None:
        """The last snapshot if it is at most `max_age` seconds old, else None."""
        m = self.metrics
        if m is None or now - m.time > max_age:
            return None
        return m


@dataclass(slots=True)
class RequestContext:
    """What routing knows of one request.

    `prompt_bytes()` is the raw text used by approximate prefix hashing (completions:
    the prompt; chat: a canonical rendering of the messages), derived from the body on
    first use unless the caller set `raw_prompt`. Token ids are given by the caller
    before routing (`set_token_ids`: the proxy computes them off the event loop when the
    pool's scorers read them), or computed on first use by `_tokenize` (tests, tools).
    `scratch` holds what a plugin's score() computed for this request for its later hooks
    (on_routed, cached_tokens), keyed by the plugin object: such state belongs to the
    request, since several requests may be ranked before any is committed.
    """

    model: str
    body: dict[str, Any] = field(default_factory=dict)
    raw_prompt: bytes | None = None
    route: str = "/v1/completions"
    session_key: str | None = None
    request_id: str = ""
    max_tokens: int | None = None
    prompt_token_estimate: int = 0
    _tokenize: Callable[[RequestContext], Sequence[int]] | None = None
    _token_ids: Sequence[int] | None = None
    scratch: dict[object, Any] = field(default_factory=dict)

    def prompt_bytes(self) -> bytes:
        if self.raw_prompt is None:
            self.raw_prompt = prompt_bytes_from_body(self.body)
        return self.raw_prompt

    def token_ids(self) -> Sequence[int] | None:
        """Token ids of the prompt (a list or an `array('I')`), or None if unknown."""
        if self._token_ids is None and self._tokenize is not None:
            self._token_ids = self._tokenize(self)
        return self._token_ids

    def set_token_ids(self, ids: Sequence[int]) -> None:
        self._token_ids = ids


@dataclass(slots=True)
class Decision:
    """The outcome of routing one request.

    `ranked` lists the candidates best first (the retry order). Each scorer's clamped
    scores and the weighted totals are kept as lists aligned with `candidates`; the
    `scores` and `totals` views by endpoint name are built only when someone asks (logs,
    explanations), so a decision costs no dictionaries on the hot path.
    """

    endpoint: Endpoint
    ranked: list[Endpoint]
    candidates: list[Endpoint]
    score_lists: list[tuple[str, list[float]]]
    total_list: list[float]
    reason: str = ""

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        """Scorer name -> endpoint name -> clamped score."""
        names = [ep.name for ep in self.candidates]
        return {scorer: dict(zip(names, vals, strict=True)) for scorer, vals in self.score_lists}

    def total_of(self, endpoint: Endpoint) -> float:
        return self.total_list[self.candidates.index(endpoint)]

    def choose(self, endpoint: Endpoint) -> None:
        """Send the request to `endpoint` (a candidate) instead; the rest keep their order."""
        self.endpoint = endpoint
        self.ranked = [endpoint, *(ep for ep in self.ranked if ep is not endpoint)]

    @property
    def totals(self) -> dict[str, float]:
        """Endpoint name -> weighted total."""
        return {ep.name: t for ep, t in zip(self.candidates, self.total_list, strict=True)}
