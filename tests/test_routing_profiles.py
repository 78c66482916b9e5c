"""Built-in and inline routing profiles, end to end through the pipeline."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import yaml

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.pipeline import Router
from lbproxy.routing.profiles import BUILTIN_PROFILES, ProfileSpec, build_router
from lbproxy.routing.registry import PluginError
from lbproxy.routing.state import Endpoint, MetricsSnapshot, RequestContext

NOW = 100.0


def bctx(**kw: Any) -> BuildContext:
    return BuildContext(pool="p", model="m", metrics_max_age=2.0, **kw)


def endpoints(n: int, **kw: Any) -> list[Endpoint]:
    out = []
    for i in range(n):
        e = Endpoint(name=f"e{i}", url=f"http://e{i}", **kw)
        e.metrics = MetricsSnapshot(time=NOW, num_waiting=0, kv_cache_usage=0.1)
        out.append(e)
    return out


def router(spec: str | dict[str, Any], seed: int = 1, **kw: Any) -> Router:
    profile = spec if isinstance(spec, str) else ProfileSpec.model_validate(spec)
    return build_router(profile, bctx(**kw), seed=seed)


def route(r: Router, c: RequestContext, eps: list[Endpoint], now: float = NOW) -> Endpoint:
    d = r.route(c, eps, now)
    assert d is not None
    return d.endpoint


def test_builtin_profiles_build() -> None:
    assert {"round-robin", "random", "least-request", "cache-aware", "precise-cache-aware"} <= set(
        BUILTIN_PROFILES
    )
    for name in BUILTIN_PROFILES:
        r = router(name)
        assert r.profile_name == name
        assert route(r, RequestContext(model="m", raw_prompt=b"hi"), endpoints(3)) is not None


@pytest.mark.parametrize(
    ("name", "prefix_type"),
    [("cache-aware", "prefix-hash"), ("precise-cache-aware", "precise-prefix")],
)
def test_cache_aware_profiles_have_the_reference_weights(name: str, prefix_type: str) -> None:
    r = router(name)
    assert [f.name for f in r.filters] == ["saturation"]
    assert [(ws.scorer.name, ws.weight) for ws in r.scorers] == [
        (prefix_type, 3.0),
        ("queue", 2.0),
        ("kv-cache-util", 2.0),
    ]
    assert r.picker.name == "max-score"


# ---- existing profiles, unchanged ------------------------------------------------------------


def test_round_robin_follows_weights_one_to_two() -> None:
    r = router("round-robin")
    a, b = Endpoint("a", "http://a", weight=1.0), Endpoint("b", "http://b", weight=2.0)
    picks = [route(r, RequestContext(model="m"), [a, b]).name for _ in range(300)]
    assert Counter(picks) == {"a": 100, "b": 200}
    assert "bbb" not in "".join(picks)  # interleaved, not bunched


def test_least_request_prefers_the_least_busy() -> None:
    r = router("least-request")
    eps = endpoints(3)
    eps[0].in_flight, eps[1].in_flight, eps[2].in_flight = 3, 1, 2
    assert route(r, RequestContext(model="m"), eps).name == "e1"


def test_least_request_ties_are_random_and_seeded() -> None:
    def picks(seed: int) -> list[str]:
        r = router("least-request", seed=seed)
        eps = endpoints(4)
        return [route(r, RequestContext(model="m"), eps).name for _ in range(200)]

    first = picks(7)
    assert first == picks(7)
    assert first != picks(8)
    counts = Counter(first)
    assert len(counts) == 4 and min(counts.values()) > 25


# ---- cache-aware -----------------------------------------------------------------------------

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_cache_aware_keeps_prefix_groups_together_under_moderate_load() -> None:
    rng = random.Random(5)
    systems = [text(rng, 2000) for _ in range(4)]
    r = router("cache-aware", seed=2)
    eps = endpoints(4)
    running: list[tuple[int, Endpoint]] = []
    placed: dict[int, Counter[str]] = {g: Counter() for g in range(4)}
    for i in range(1000):
        # Each request stays in flight for 100 arrivals: ~25 per backend when balanced.
        while running and running[0][0] <= i - 100:
            running.pop(0)[1].in_flight -= 1
        group = rng.randrange(4)
        c = RequestContext(model="m", raw_prompt=(systems[group] + text(rng, 60)).encode())
        chosen = route(r, c, eps)
        chosen.in_flight += 1
        running.append((i, chosen))
        placed[group][chosen.name] += 1
    for counts in placed.values():
        assert counts.most_common(1)[0][1] >= 0.9 * sum(counts.values())


def test_cache_aware_spills_a_hot_prefix() -> None:
    r = router("cache-aware", seed=2)
    eps = endpoints(4)
    prompt = ("one hot system prompt " * 100).encode()
    first = route(r, RequestContext(model="m", raw_prompt=prompt), eps)
    first.in_flight += 1
    for _ in range(32):  # nothing completes: in-flight only grows
        assert route(r, RequestContext(model="m", raw_prompt=prompt), eps) is first
        first.in_flight += 1
    # 33 in flight, 33 more than the least busy: over the margin, the request spills.
    assert route(r, RequestContext(model="m", raw_prompt=prompt), eps) is not first
    for _ in range(120):
        route(r, RequestContext(model="m", raw_prompt=prompt), eps).in_flight += 1
    loads = [e.in_flight for e in eps]
    # Each spill teaches another backend, and the load stays within the margin.
    assert min(loads) > 0
    assert max(loads) - min(loads) <= 33


def test_cache_aware_avoids_saturated_and_queued_endpoints() -> None:
    r = router("cache-aware", seed=2)
    eps = endpoints(3)
    prompt = ("shared " * 200).encode()
    holder = route(r, RequestContext(model="m", raw_prompt=prompt), eps)
    assert holder.metrics is not None
    holder.metrics.num_waiting = 3  # the most waiting, but prefix 3 > queue 2
    assert route(r, RequestContext(model="m", raw_prompt=prompt), eps) is holder
    holder.metrics.num_waiting = 6  # over the saturation filter's queue_depth of 5
    assert route(r, RequestContext(model="m", raw_prompt=prompt), eps) is not holder


def test_ranking_for_flow_control_keeps_a_saturated_cached_backend_first() -> None:
    """Flow control applies the saturation thresholds itself and waits for room: ranked
    without the load gate, a request's cached backend stays first while it is full."""
    r = router("cache-aware", seed=2)
    eps = endpoints(3)
    prompt = ("shared " * 200).encode()
    holder = route(r, RequestContext(model="m", raw_prompt=prompt), eps)
    assert holder.metrics is not None
    holder.metrics.kv_cache_usage = 0.9  # over the saturation filter's 0.8
    gated = r.rank(RequestContext(model="m", raw_prompt=prompt), eps, NOW)
    assert gated is not None and holder not in gated.candidates
    ungated = r.rank(RequestContext(model="m", raw_prompt=prompt), eps, NOW, gates=False)
    assert ungated is not None and ungated.endpoint is holder and len(ungated.candidates) == 3


def test_precise_cache_aware_follows_kv_events() -> None:
    shared: dict[str, Any] = {}
    r = build_router("precise-cache-aware", bctx(shared=shared), seed=4)
    eps = endpoints(3)
    tokens = list(range(500, 564))

    class BlockStored:
        block_hashes, parent_block_hash, token_ids, block_size = [1, 2, 3, 4], None, tokens, 16

    shared["precise_index"].apply_events("e2", [BlockStored()])
    for _ in range(3):
        c = RequestContext(model="m", _tokenize=lambda _c: tokens)
        d = r.route(c, eps, NOW)
        assert d is not None and d.endpoint.name == "e2"
        assert d.scores["precise-prefix"] == {"e0": 0.0, "e1": 0.0, "e2": 1.0}


def test_precise_cache_aware_speculation_steers_before_events_arrive() -> None:
    r = router("precise-cache-aware", seed=4)
    eps = endpoints(3)
    tokens = list(range(64))
    first = route(r, RequestContext(model="m", _tokenize=lambda _c: tokens), eps)
    for _ in range(5):
        assert route(r, RequestContext(model="m", _tokenize=lambda _c: tokens), eps) is first


# ---- inline profiles -------------------------------------------------------------------------

INLINE_YAML = """
filters: [{type: saturation, queue_depth: 2, kv_cache_util: 0.9}]
scorers:
  - {type: prefix-hash, weight: 3, block_size: 8, max_blocks: 64}
  - {type: queue, weight: 2, stale_as: neutral}
  - {type: kv-cache-util, weight: 1}
  - {type: session-affinity, weight: 10, max_sessions: 10}
picker: max-score
"""


def test_inline_yaml_profile_builds_and_routes() -> None:
    r = router(yaml.safe_load(INLINE_YAML))
    assert r.profile_name == "inline"
    assert [(ws.scorer.name, ws.weight) for ws in r.scorers] == [
        ("prefix-hash", 3.0),
        ("queue", 2.0),
        ("kv-cache-util", 1.0),
        ("session-affinity", 10.0),
    ]
    assert r.filters[0].queue_depth == 2
    prefix = r.scorers[0].scorer
    assert prefix.hasher.block_bytes == 32
    eps = endpoints(3)
    first = route(r, RequestContext(model="m", raw_prompt=b"q" * 300, session_key="s"), eps)
    assert route(r, RequestContext(model="m", raw_prompt=b"r", session_key="s"), eps) is first


def test_inline_profile_overrides_a_builtin() -> None:
    r = router({"profile": "cache-aware", "scorers": [{"type": "queue"}]})
    assert r.profile_name == "cache-aware+inline"
    assert [f.name for f in r.filters] == ["saturation"]
    assert [ws.scorer.name for ws in r.scorers] == ["queue"]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"scorers": [{"type": "prefix-hashh"}]}, ["scorer", "prefix-hashh"]),
        ({"filters": [{"type": "saturated"}]}, ["filter", "saturated"]),
        ({"filters": [{"type": "queue"}]}, ["filter", "queue"]),  # a scorer is not a filter
        (
            {"scorers": [{"type": "prefix-hash", "max_blocks": 0}]},
            ["prefix-hash", "max_blocks"],
        ),
        (
            {"scorers": [{"type": "prefix-hash", "blocksize": 16}]},
            ["prefix-hash", "blocksize"],
        ),
        ({"scorers": [{"type": "queue", "stale_as": "best"}]}, ["queue", "stale_as"]),
        (
            {"filters": [{"type": "saturation", "kv_cache_util": 1.5}]},
            ["saturation", "kv_cache_util"],
        ),
        (
            {"scorers": [{"type": "precise-prefix", "speculative_ttl": -1}]},
            ["precise-prefix", "speculative_ttl"],
        ),
        (
            {"scorers": [{"type": "session-affinity", "max_sessions": "many"}]},
            ["session-affinity", "max_sessions"],
        ),
    ],
)
def test_profile_errors_name_the_plugin_and_key(spec: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(PluginError) as err:
        router(spec)
    for word in words:
        assert word in str(err.value)


def test_unknown_builtin_profile() -> None:
    with pytest.raises(PluginError, match="cache-awar"):
        router("cache-awar")
