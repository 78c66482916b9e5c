"""Each scorer and filter on hand-built endpoint states, built through the registry as from YAML."""

from __future__ import annotations

import random
from typing import Any

import pytest

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.pipeline import Router, WeightedScorer
from lbproxy.routing.plugins.max_score import MaxScorePicker
from lbproxy.routing.precise_index import PreciseIndex
from lbproxy.routing.registry import lookup
from lbproxy.routing.state import Endpoint, MetricsSnapshot, RequestContext

NOW = 100.0
STALE = "stale"  # metrics older than metrics_max_age
NONE = "none"  # never scraped


def bctx(**kw: Any) -> BuildContext:
    return BuildContext(pool="p", model=kw.pop("model", "m"), metrics_max_age=2.0, **kw)


def ep(
    name: str,
    waiting: float | str | None = 0.0,
    kv: float | None = 0.0,
    *,
    in_flight: int = 0,
    **kw: Any,
) -> Endpoint:
    e = Endpoint(name=name, url=f"http://{name}", in_flight=in_flight, **kw)
    if waiting == NONE:
        return e
    age = 10.0 if waiting == STALE else 0.5
    e.metrics = MetricsSnapshot(
        time=NOW - age,
        num_waiting=None if isinstance(waiting, str) else waiting,
        kv_cache_usage=kv,
    )
    return e


def build(kind: str, type_: str, **params: Any) -> Any:
    b = params.pop("_bctx", None) or bctx()
    return lookup(type_, kind).build(params, b)  # type: ignore[arg-type]


def ctx(prompt: bytes | str = b"", **kw: Any) -> RequestContext:
    raw = prompt.encode() if isinstance(prompt, str) else prompt
    return RequestContext(model=kw.pop("model", "m"), raw_prompt=raw, **kw)


# ---- queue -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("waiting", "stale_as", "expected"),
    [
        ([0, 5, 10], "worst", [1.0, 0.5, 0.0]),
        ([3, 3], "worst", [1.0, 1.0]),
        ([7], "worst", [1.0]),
        ([0, STALE, 10], "worst", [1.0, 0.0, 0.0]),
        ([0, STALE, 10], "neutral", [1.0, 0.5, 0.0]),
        ([0, NONE, 10], "worst", [1.0, 0.0, 0.0]),
        ([2, None, 4], "neutral", [1.0, 0.5, 0.0]),  # fresh snapshot without the metric
        ([STALE, NONE], "worst", [0.0, 0.0]),
        ([STALE, NONE], "neutral", [0.5, 0.5]),
        ([4, STALE], "worst", [1.0, 0.0]),
    ],
)
def test_queue_scorer(waiting: list[Any], stale_as: str, expected: list[float]) -> None:
    scorer = build("scorer", "queue", stale_as=stale_as)
    eps = [ep(f"e{i}", w) for i, w in enumerate(waiting)]
    assert scorer.score(ctx(), eps, NOW) == pytest.approx(expected)


def test_queue_scorer_defaults_to_worst() -> None:
    scorer = build("scorer", "queue")
    assert scorer.score(ctx(), [ep("a", 1), ep("b", STALE)], NOW) == [1.0, 0.0]


# ---- kv-cache-util -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("states", "stale_as", "expected"),
    [
        ([(0, 0.2), (0, 0.9)], "worst", [0.8, 0.1]),
        ([(0, 0.0), (0, 1.0)], "worst", [1.0, 0.0]),
        ([(0, 0.5), (STALE, 0.1)], "worst", [0.5, 0.0]),
        ([(0, 0.5), (STALE, 0.1)], "neutral", [0.5, 0.5]),
        ([(0, None), (NONE, None)], "worst", [0.0, 0.0]),
        ([(0, None)], "neutral", [0.5]),
    ],
)
def test_kv_cache_util_scorer(
    states: list[tuple[Any, float | None]], stale_as: str, expected: list[float]
) -> None:
    scorer = build("scorer", "kv-cache-util", stale_as=stale_as)
    eps = [ep(f"e{i}", w, kv) for i, (w, kv) in enumerate(states)]
    assert scorer.score(ctx(), eps, NOW) == pytest.approx(expected)


# ---- saturation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "state", "kept"),
    [
        ({}, {"waiting": 5, "kv": 0.8}, True),  # thresholds are "greater than"
        ({}, {"waiting": 6, "kv": 0.1}, False),
        ({}, {"waiting": 0, "kv": 0.81}, False),
        ({}, {"waiting": STALE}, False),
        ({}, {"waiting": NONE}, False),
        ({"stale_as": "available"}, {"waiting": STALE}, True),
        ({"stale_as": "available"}, {"waiting": NONE}, True),
        ({}, {"waiting": None, "kv": 0.1}, False),  # metric not reported: unknown
        ({"stale_as": "available"}, {"waiting": None, "kv": 0.1}, True),
        ({"stale_as": "available"}, {"waiting": None, "kv": 0.9}, False),
        ({"stale_as": "available"}, {"waiting": 9, "kv": None}, False),
        ({"queue_depth": 0}, {"waiting": 1}, False),
        ({"kv_cache_util": 0.95}, {"kv": 0.9}, True),
        ({"max_in_flight": 3}, {"in_flight": 3}, True),
        ({"max_in_flight": 3}, {"in_flight": 4}, False),
        ({"max_in_flight": 3, "stale_as": "available"}, {"waiting": NONE, "in_flight": 4}, False),
    ],
)
def test_saturation_filter(params: dict[str, Any], state: dict[str, Any], kept: bool) -> None:
    f = build("filter", "saturation", **params)
    e = ep("a", **state)
    assert f.filter(ctx(), [e], NOW) == ([e] if kept else [])


def test_saturation_filter_keeps_order_and_unsaturated_endpoints() -> None:
    f = build("filter", "saturation")
    a, b, c = ep("a", 0), ep("b", 9), ep("c", 1)
    assert f.filter(ctx(), [a, b, c], NOW) == [a, c]


def test_pipeline_keeps_all_when_saturation_would_drop_all() -> None:
    router = Router(
        [build("filter", "saturation")],
        [WeightedScorer(build("scorer", "queue"), 1.0)],
        MaxScorePicker(),
        seed=1,
    )
    eps = [ep("a", 10), ep("b", 8)]
    decision = router.route(ctx(), eps, NOW)
    assert decision is not None
    assert decision.endpoint.name == "b"
    assert "saturation would drop all" in decision.reason


# ---- session-affinity ------------------------------------------------------------------------


def test_session_affinity_learns_and_sticks() -> None:
    scorer = build("scorer", "session-affinity")
    a, b, c = ep("a"), ep("b"), ep("c")
    first = ctx(session_key="s1")
    assert scorer.score(first, [a, b, c], NOW) == [0.0, 0.0, 0.0]
    scorer.on_routed(first, b, NOW)
    assert scorer.score(ctx(session_key="s1"), [a, b, c], NOW) == [0.0, 1.0, 0.0]
    assert scorer.score(ctx(session_key="s2"), [a, b, c], NOW) == [0.0, 0.0, 0.0]
    assert scorer.score(ctx(), [a, b, c], NOW) == [0.0, 0.0, 0.0]  # no session key


def test_session_affinity_follows_a_failover() -> None:
    scorer = build("scorer", "session-affinity")
    a, b = ep("a"), ep("b")
    scorer.on_routed(ctx(session_key="s"), a, NOW)
    assert scorer.score(ctx(session_key="s"), [b], NOW) == [0.0]  # a is not a candidate
    scorer.on_routed(ctx(session_key="s"), b, NOW)
    assert scorer.score(ctx(session_key="s"), [a, b], NOW) == [0.0, 1.0]


def test_session_affinity_lru_is_bounded() -> None:
    scorer = build("scorer", "session-affinity", max_sessions=2)
    a = ep("a")
    for key in ("s1", "s2", "s1", "s3"):  # s1 refreshed, so s2 is the oldest
        scorer.on_routed(ctx(session_key=key), a, NOW)
    assert len(scorer) == 2
    assert scorer.endpoint_of("s2") is None
    assert scorer.endpoint_of("s1") == scorer.endpoint_of("s3") == "a"


def test_session_affinity_end_to_end_beats_load() -> None:
    router = Router(
        [],
        [
            WeightedScorer(build("scorer", "session-affinity"), 10.0),
            WeightedScorer(build("scorer", "least-request"), 1.0),
        ],
        MaxScorePicker(),
        seed=3,
    )
    eps = [ep("a"), ep("b"), ep("c")]
    chosen = router.route(ctx(session_key="s"), eps, NOW)
    assert chosen is not None
    chosen.endpoint.in_flight = 50
    for _ in range(5):
        d = router.route(ctx(session_key="s"), eps, NOW)
        assert d is not None and d.endpoint is chosen.endpoint


# ---- prefix-hash -------------------------------------------------------------------------------

BLOCK = 64  # default block_size 16 tokens x 4 bytes
PROMPT = bytes(range(256)) * 3  # 12 blocks


def test_prefix_hash_full_partial_and_no_match() -> None:
    scorer = build("scorer", "prefix-hash", spread_unmatched=0)  # the match alone
    a, b = ep("a"), ep("b")
    first = ctx(PROMPT)
    assert scorer.score(first, [a, b], NOW) == [0.0, 0.0]
    scorer.on_routed(first, a, NOW)
    assert scorer.score(ctx(PROMPT), [a, b], NOW) == [1.0, 0.0]
    half = PROMPT[: 6 * BLOCK] + b"x" * (6 * BLOCK)
    assert scorer.score(ctx(half), [a, b], NOW) == [0.5, 0.0]
    longer = PROMPT + b"y" * (4 * BLOCK)  # 16 blocks, 12 known
    assert scorer.score(ctx(longer), [a, b], NOW) == [0.75, 0.0]
    assert scorer.score(ctx(b"z" + PROMPT), [a, b], NOW) == [0.0, 0.0]


def test_prefix_hash_prompts_shorter_than_a_block_score_zero() -> None:
    scorer = build("scorer", "prefix-hash")
    a = ep("a")
    short = ctx(b"x" * (BLOCK - 1))
    scorer.on_routed(short, a, NOW)
    assert scorer.score(ctx(b"x" * (BLOCK - 1)), [a], NOW) == [0.0]
    assert scorer.index.stats()["entries"] == 0


def test_prefix_hash_uses_chat_bodies_through_prompt_bytes() -> None:
    scorer = build("scorer", "prefix-hash")
    a, b = ep("a"), ep("b")
    system = {"role": "system", "content": "You are terse. " * 40}

    def chat(question: str) -> RequestContext:
        body = {"model": "m", "messages": [system, {"role": "user", "content": question}]}
        return RequestContext(model="m", body=body)

    scorer.on_routed(chat("first question " * 10), b, NOW)
    scores = scorer.score(chat("another question " * 10), [a, b], NOW)
    assert scores[0] == 0.0
    assert scores[1] == 9 / 12  # 600 bytes of system prompt: 9 of the 12 blocks


def test_prefix_hash_is_seeded_with_the_model() -> None:
    pooled = build("scorer", "prefix-hash")  # pool model "m" wins over the request's
    unpooled = build("scorer", "prefix-hash", _bctx=bctx(model=""))
    a = ep("a")
    for scorer, other_model_score in ((pooled, 1.0), (unpooled, 0.0)):
        scorer.on_routed(ctx(PROMPT, model="m"), a, NOW)
        assert scorer.score(ctx(PROMPT, model="m"), [a], NOW) == [1.0]
        assert scorer.score(ctx(PROMPT, model="other"), [a], NOW) == [other_model_score]


@pytest.mark.parametrize(
    ("params", "endpoint", "expected"),
    [
        ({}, {}, 31_250),
        ({"lru_capacity": 100}, {}, 100),
        ({}, {"num_gpu_blocks": 5000, "block_size": 16}, 5000),
        ({}, {"num_gpu_blocks": 5000, "block_size": 128}, 40_000),  # CPU build: 128-token blocks
        ({"block_size": 32}, {"num_gpu_blocks": 5000, "block_size": 16}, 2500),
        ({}, {"num_gpu_blocks": 5000}, 5000),  # block size unknown: assume ours
        ({"max_lru_capacity": 1000}, {"num_gpu_blocks": 5000, "block_size": 16}, 1000),
    ],
)
def test_prefix_hash_capacity(
    params: dict[str, Any], endpoint: dict[str, Any], expected: int
) -> None:
    scorer = build("scorer", "prefix-hash", **params)
    assert scorer.capacity(ep("a", **endpoint)) == expected


def test_prefix_hash_capacity_from_the_metrics_snapshot() -> None:
    scorer = build("scorer", "prefix-hash")
    e = ep("a")
    assert e.metrics is not None
    e.metrics.num_gpu_blocks, e.metrics.block_size = 640, 32
    assert scorer.capacity(e) == 1280


def test_prefix_hash_memory_follows_lru_capacity() -> None:
    scorer = build("scorer", "prefix-hash", lru_capacity=50, max_blocks=8, footprint=False)
    a = ep("a")
    for i in range(40):
        scorer.on_routed(ctx(i.to_bytes(2, "big") * 400), a, NOW)
    assert scorer.index.stats()["entries"] == 50


def _long(shared: bytes, seed: int, length: int = 28_000) -> bytes:
    """`shared`, then bytes of its own up to `length` (a ~7,000-token prompt by default)."""
    return shared + random.Random(seed).randbytes(length - len(shared))


SPAN_UNITS = 256  # max_blocks: the hashed span is 256 x 64 B = 16 KB


@pytest.mark.parametrize("diverge", [0, 700, 1500, 5000, 10_000, 16_383, 16_384, 20_000])
def test_prefix_hash_long_prompts_match_their_shared_prefix_to_within_one_eighth(
    diverge: int,
) -> None:
    shared = random.Random(1).randbytes(diverge)
    # The match alone: no tie-break for matches under spread_unmatched.
    growing = build("scorer", "prefix-hash", spread_unmatched=0)
    fixed = build("scorer", "prefix-hash", block_growth=0, spread_unmatched=0)
    a, b = ep("a"), ep("b")
    for scorer in (growing, fixed):
        scorer.on_routed(ctx(_long(shared, 2)), a, NOW)
    got = growing.score(ctx(_long(shared, 3)), [a, b], NOW)
    # Fixed blocks: the full 64 B blocks before the divergence, within the 16 KB span.
    exact = min(diverge // BLOCK, SPAN_UNITS) / SPAN_UNITS
    assert fixed.score(ctx(_long(shared, 3)), [a, b], NOW) == [exact, 0.0]
    # Growing blocks: the same below 1 KB, never more, and at most 1/8 less (+ a unit).
    assert got[1] == 0.0
    assert exact * 7 / 8 - 1 / SPAN_UNITS <= got[0] <= exact
    if diverge < 1024:
        assert got[0] == exact
    if diverge >= SPAN_UNITS * BLOCK:  # everything hashed is shared: a full match
        assert got[0] == 1.0


def test_prefix_hash_counts_blocks_in_units_for_the_metrics() -> None:
    scorer = build("scorer", "prefix-hash")
    a = ep("a")
    for seed in (1, 1, 2):
        request = ctx(_long(b"", seed))
        scorer.score(request, [a], NOW)
        scorer.on_routed(request, a, NOW)
    assert scorer.query_blocks == {"a": 3 * SPAN_UNITS}  # 16 KB hashed per request
    assert scorer.hit_blocks == {"a": SPAN_UNITS}  # the repeat matched all of it


def test_prefix_hash_unique_long_prompts_keep_each_endpoint_within_capacity() -> None:
    scorer = build("scorer", "prefix-hash", lru_capacity=1000, spread_unmatched=0)
    a, b = ep("a"), ep("b")
    for i in range(60):
        scorer.on_routed(ctx(_long(i.to_bytes(4, "big"), i)), a, NOW)
        assert scorer.index.size("a") <= 1000
    stats = scorer.index.stats()
    assert 1000 - SPAN_UNITS < stats["units"] <= 1000
    assert stats["entries"] <= 1000 // SPAN_UNITS * 41 + 41  # 41 blocks per request
    # The most recent prompts are still known in full, the oldest were evicted.
    assert scorer.score(ctx(_long((59).to_bytes(4, "big"), 59)), [a, b], NOW) == [1.0, 0.0]
    assert scorer.score(ctx(_long((0).to_bytes(4, "big"), 0)), [a, b], NOW) == [0.0, 0.0]


def tie(load: float, room: float = 1.0, spread: float = 0.1) -> float:
    """The tie-break of a prompt matched nowhere: in-flight and free-room scores in [0, 1]."""
    return spread * (load + 2 * room) / 3


R0 = 1 - 12 / 31_250  # room left after PROMPT's 12 blocks, of the default lru_capacity


@pytest.mark.parametrize(
    ("loads", "params", "expected"),
    [
        ([0, 0, 0], {}, [1.0, 0.0, 0.0]),
        ([32, 0, 0], {}, [1.0, 0.0, 0.0]),  # 32 more than the least busy: not over the margin
        ([33, 0, 0], {}, [tie(0, R0), tie(1), tie(1)]),  # hot: discounted, then the tie-break
        ([50, 10, 12], {}, [tie(0, R0), tie(1), tie(38 / 40)]),  # 50 > max(10 + 32, 10 * 2)
        ([40, 10, 12], {}, [1.0, 0.0, 0.0]),
        ([150, 70, 80], {}, [tie(0, R0), tie(1), tie(70 / 80)]),  # 150 > max(70 + 32, 140)
        ([130, 70, 80], {}, [1.0, 0.0, 0.0]),  # far apart, but not twice as busy
        ([33, 0, 0], {"hotspot_discount": 0.5}, [0.5, 0.0, 0.0]),
        ([33, 0, 0], {"hotspot_margin": 40}, [1.0, 0.0, 0.0]),
        ([33, 0, 0], {"hotspot_discount": 1.0}, [1.0, 0.0, 0.0]),
        ([33, 0, 0], {"spread_unmatched": 0}, [0.0, 0.0, 0.0]),
        ([33], {}, [1.0]),  # a single candidate is never hot
    ],
)
def test_prefix_hash_hotspot_rule(
    loads: list[int], params: dict[str, Any], expected: list[float]
) -> None:
    scorer = build("scorer", "prefix-hash", **params)
    eps = [ep(f"e{i}", in_flight=n) for i, n in enumerate(loads)]
    scorer.on_routed(ctx(PROMPT), eps[0], NOW)
    assert scorer.score(ctx(PROMPT), eps, NOW) == pytest.approx(expected)


def test_prefix_hash_hotspot_discounts_every_hot_holder() -> None:
    scorer = build("scorer", "prefix-hash")
    a, b, c = ep("a", in_flight=40), ep("b", in_flight=2), ep("c", in_flight=36)
    for e in (a, b, c):
        scorer.on_routed(ctx(PROMPT), e, NOW)
    assert scorer.score(ctx(PROMPT), [a, b, c], NOW) == [0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ([0, 0, 0], [0.0, 0.0, 0.0]),
        ([4, 0, 2], [tie(0), tie(1), tie(0.5)]),
        ([1, 3], [tie(1), tie(0)]),
    ],
)
def test_prefix_hash_spreads_unmatched_requests_by_load(
    loads: list[int], expected: list[float]
) -> None:
    scorer = build("scorer", "prefix-hash")
    eps = [ep(f"e{i}", in_flight=n) for i, n in enumerate(loads)]
    assert scorer.score(ctx(PROMPT), eps, NOW) == pytest.approx(expected)
    assert scorer.score(ctx(b"short"), eps, NOW) == pytest.approx(expected)


def test_prefix_hash_breaks_ties_by_free_cache_room() -> None:
    # a's cache: 12 blocks of 32 tokens = 24 of our 16-token units; PROMPT fills 12.
    scorer = build("scorer", "prefix-hash")
    a, b = ep("a", num_gpu_blocks=12, block_size=32), ep("b", num_gpu_blocks=12, block_size=32)
    scorer.on_routed(ctx(PROMPT), a, NOW)
    new = ctx(b"n" * len(PROMPT))
    assert scorer.score(new, [a, b], NOW) == pytest.approx([tie(1, 0.5), tie(1)])
    # A request in flight weighs as much as half the cache.
    b.in_flight = 1
    assert scorer.score(new, [a, b], NOW) == pytest.approx([tie(1, 0.5), tie(0)])
    # A match under spread_unmatched (1 of 12 blocks) gets the tie-break on top.
    head = ctx(PROMPT[:BLOCK] + b"n" * (len(PROMPT) - BLOCK))
    assert scorer.score(head, [a, b], NOW) == pytest.approx([1 / 12 + tie(1, 0.5), tie(0)])
    # A larger match is left alone.
    two = ctx(PROMPT[: 2 * BLOCK] + b"n" * (len(PROMPT) - 2 * BLOCK))
    assert scorer.score(two, [a, b], NOW) == pytest.approx([2 / 12, 0.0])


def test_prefix_hash_free_room_follows_capacity_changes() -> None:
    # Capacities are reused for CAPACITY_TTL seconds of routing's clock, then read again.
    from lbproxy.routing.plugins.prefix_hash import CAPACITY_TTL

    scorer = build("scorer", "prefix-hash")
    a, b = ep("a", num_gpu_blocks=24), ep("b", num_gpu_blocks=24)
    scorer.on_routed(ctx(PROMPT), a, NOW)
    assert scorer.free_room([a, b], NOW) == [12, 24]
    b.num_gpu_blocks = 48  # b restarted with more memory
    assert scorer.free_room([a, b], NOW + CAPACITY_TTL + 1) == [12, 48]


# ---- precise-prefix ----------------------------------------------------------------------------

TOKENS = list(range(1000, 1064))  # 4 blocks of 16


class Stored:
    """A BlockStored as the decoder produces it (matched by class name)."""

    def __init__(self, hashes: list[int], parent: int | None, tokens: list[int], bs: int) -> None:
        self.block_hashes, self.parent_block_hash = hashes, parent
        self.token_ids, self.block_size = tokens, bs


Stored.__name__ = "BlockStored"


def tctx(tokens: list[int] | None, **kw: Any) -> RequestContext:
    tokenize = None if tokens is None else (lambda c: list(tokens))
    return RequestContext(model="m", _tokenize=tokenize, **kw)


def precise(**params: Any) -> tuple[Any, PreciseIndex]:
    b = params.pop("_bctx", None) or bctx()
    scorer = build("scorer", "precise-prefix", _bctx=b, **params)
    return scorer, b.shared["precise_index"]


def test_precise_prefix_scores_blocks_announced_by_events() -> None:
    scorer, index = precise()
    a, b, c = ep("a"), ep("b"), ep("c")
    index.apply_events("a", [Stored([1, 2, 3, 4], None, TOKENS, 16)])
    index.apply_events("b", [Stored([7], None, TOKENS[:16], 16)])
    assert scorer.score(tctx(TOKENS), [a, b, c], NOW) == [1.0, 0.25, 0.0]
    longer = TOKENS + list(range(64)) + [5]  # 8 full blocks
    assert scorer.score(tctx(longer), [a, b, c], NOW) == [0.5, 0.125, 0.0]
    assert scorer.score(tctx(list(range(64))), [a, b, c], NOW) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("tokens", [None, [], list(range(15))])
def test_precise_prefix_without_tokens_or_full_blocks_scores_zero(tokens: list[int] | None) -> None:
    scorer, index = precise()
    index.apply_events("a", [Stored([1], None, list(range(16)), 16)])
    assert scorer.score(tctx(tokens), [ep("a"), ep("b")], NOW) == [0.0, 0.0]


def test_precise_prefix_shares_one_index_per_build_context() -> None:
    b = bctx()
    first, index = precise(_bctx=b)
    second, again = precise(_bctx=b)
    assert index is again is first.index is second.index
    pre = PreciseIndex()
    third, given = precise(_bctx=bctx(shared={"precise_index": pre}))
    assert given is pre is third.index


def test_precise_prefix_uses_each_endpoints_block_size() -> None:
    scorer, index = precise(block_size=8)
    a = ep("a")  # block size from its events: 32
    b = ep("b", block_size=16)  # from its geometry
    c = ep("c")  # the parameter: 8
    index.apply_events("a", [Stored([1, 2], None, TOKENS, 32)])
    index.apply_events("b", [Stored([1, 2], None, TOKENS[:32], 16)])
    index.apply_events("c", [Stored([1], None, TOKENS[:8], 8)])
    assert scorer.block_size_of(a) == 32
    assert scorer.block_size_of(b) == 16
    assert scorer.block_size_of(c) == 8
    assert scorer.score(tctx(TOKENS), [a, b, c], NOW) == [1.0, 0.5, 0.125]


def test_precise_prefix_max_blocks_limits_the_request() -> None:
    scorer, index = precise(max_blocks=2)
    index.apply_events("a", [Stored([1], None, TOKENS[:16], 16)])
    assert scorer.score(tctx(TOKENS), [ep("a")], NOW) == [0.5]


def test_precise_prefix_speculates_until_the_ttl() -> None:
    scorer, _ = precise(speculative_ttl=2.0)
    a, b = ep("a"), ep("b")
    first = tctx(TOKENS)
    scorer.score(first, [a, b], NOW)
    scorer.on_routed(first, b, NOW)
    assert scorer.score(tctx(TOKENS), [a, b], NOW + 1.0) == [0.0, 1.0]
    assert scorer.score(tctx(TOKENS), [a, b], NOW + 2.5) == [0.0, 0.0]


def test_precise_prefix_speculation_can_be_disabled() -> None:
    scorer, index = precise(speculative_ttl=0)
    first = tctx(TOKENS)
    scorer.on_routed(first, ep("b"), NOW)
    assert index.stats()["speculative"] == 0


def test_precise_prefix_hotspot_rule() -> None:
    scorer, index = precise()
    a, b = ep("a", in_flight=40), ep("b", in_flight=1)
    index.apply_events("a", [Stored([1, 2, 3, 4], None, TOKENS, 16)])
    hot_then_spread = pytest.approx([tie(0), tie(1)])  # no num_gpu_blocks: in-flight alone
    assert scorer.score(tctx(TOKENS), [a, b], NOW) == hot_then_spread
    a.in_flight = 10
    assert scorer.score(tctx(TOKENS), [a, b], NOW) == [1.0, 0.0]
    assert scorer.score(tctx(list(range(64))), [a, b], NOW) == hot_then_spread  # no match


def test_precise_prefix_breaks_ties_by_free_cache_room() -> None:
    # a holds 4 of its 8 blocks of 16 tokens (64 tokens free); b has 8 of 32 (256 free).
    scorer, index = precise()
    a, b = ep("a", num_gpu_blocks=8), ep("b", num_gpu_blocks=8, block_size=32)
    index.apply_events("a", [Stored([1, 2, 3, 4], None, TOKENS, 16)])
    new = list(range(5000, 5064))
    assert scorer.score(tctx(new), [a, b], NOW) == pytest.approx([tie(1, 0.25), tie(1)])
    b.num_gpu_blocks = None  # unknown: in-flight counts alone, equal here
    assert scorer.score(tctx(new), [a, b], NOW) == [0.0, 0.0]


def test_precise_prefix_tokenizes_once_per_request() -> None:
    scorer, _ = precise()
    calls = []

    def tokenize(c: RequestContext) -> list[int]:
        calls.append(1)
        return TOKENS

    request = RequestContext(model="m", _tokenize=tokenize)
    scorer.score(request, [ep("a", block_size=16), ep("b", block_size=32)], NOW)
    scorer.on_routed(request, ep("a"), NOW)
    assert len(calls) == 1


@pytest.mark.parametrize("mode", ["incremental", "full"])
def test_precise_prefix_kv_cache_report_mode_reaches_the_index(mode: str) -> None:
    scorer, index = precise() if mode == "incremental" else precise(kv_cache_report_mode=mode)
    assert index.report_mode == mode
    # A second parentless store of a held block: a copy, or (full) a re-announcement.
    block = Stored([1], None, TOKENS[:16], 16)
    index.apply_events("a", [block, block, Removed([1])])
    held = 1 if mode == "incremental" else 0
    assert scorer.score(tctx(TOKENS), [ep("a")], NOW) == [0.25 * held]


def test_precise_prefix_rejects_an_unknown_kv_cache_report_mode() -> None:
    with pytest.raises(Exception, match="kv_cache_report_mode"):
        precise(kv_cache_report_mode="always")


class Removed:
    def __init__(self, hashes: list[int]) -> None:
        self.block_hashes = hashes


Removed.__name__ = "BlockRemoved"


def test_prefix_hash_charges_each_request_its_whole_footprint() -> None:
    """A request's KV is its prompt and its output, not just the hashed span: a backend
    sent long requests forgets the old prefixes its cache could not have kept."""
    on = build("scorer", "prefix-hash", lru_capacity=2_000)
    off = build("scorer", "prefix-hash", lru_capacity=2_000, footprint=False)
    a = ep("a")
    first = _long(b"group 0 " * 2_000, 0)  # 28 KB (~7,000 tokens): 16 KB hashed
    for s in (on, off):
        s.on_routed(ctx(first, max_tokens=1_000), a, NOW)
    # one request: 7,000 + 1,000 tokens = 500 units of the 2,000
    assert on.index.size("a") == (len(first) // 4 + 1_000) // 16
    assert off.index.size("a") == on._units[-1]
    for g in range(1, 7):
        prompt = _long(b"group %d " % g * 2_000, g)
        for s in (on, off):
            s.on_routed(ctx(prompt, max_tokens=1_000), a, NOW)
    assert on.index.size("a") <= 2_000
    assert on.score(ctx(first), [a], NOW) == [0.0]  # 7 x 500 units sent: evicted
    assert off.score(ctx(first), [a], NOW) == [1.0]  # 7 x 256 hashed units: "held"
