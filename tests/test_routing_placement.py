"""Where cache-aware routing places new prefix groups at low concurrency.

Requests go one at a time and finish before the next (in-flight counts all 0), and the
scraped KV usage is 0 everywhere, as vLLM reports when its cached blocks are idle: the
load scorers tie, so only the prefix scorer can tell where a new group's cache fits.
Each group's system prompt is ~40% of one backend's cache (the prefix index tracks each
backend's working set against its `num_gpu_blocks`).
"""

from __future__ import annotations

from collections import Counter

import pytest

from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.profiles import build_router
from lbproxy.routing.state import Endpoint, MetricsSnapshot, RequestContext

NOW = 100.0
UNIT = 16 * 4  # prefix-hash's default block: 16 tokens x 4 bytes
GROUP_UNITS = 160  # a system prompt of 160 blocks; with its question ~170 blocks
SEEDS = range(12)


def endpoint(name: str, num_gpu_blocks: int) -> Endpoint:
    ep = Endpoint(name=name, url=f"http://{name}", num_gpu_blocks=num_gpu_blocks, block_size=16)
    ep.metrics = MetricsSnapshot(time=NOW, num_running=0, num_waiting=0, kv_cache_usage=0.0)
    return ep


def group_prompt(group: int, question: int, head: bytes = b"") -> bytes:
    system = (f"group {group} system prompt. " * 400).encode()[: GROUP_UNITS * UNIT - len(head)]
    return head + system + f" question {question}: what now?".encode() * 20


def place_groups(
    capacities: list[int], groups: int, seed: int, head: bytes = b"", profile: str = "cache-aware"
) -> tuple[dict[str, int], dict[str, int]]:
    """Send each new group's first request in turn; groups per backend and its capacity."""
    router = build_router(profile, BuildContext(pool="p", model="m"), seed=seed)
    eps = [endpoint(f"gpu-{i}", c) for i, c in enumerate(capacities)]
    placed: Counter[str] = Counter()
    for g in range(groups):
        ctx = RequestContext(model="m", raw_prompt=group_prompt(g, 0, head))
        decision = router.route(ctx, eps, NOW + g)
        assert decision is not None
        placed[decision.endpoint.name] += 1
    return {ep.name: placed[ep.name] for ep in eps}, {ep.name: ep.num_gpu_blocks or 0 for ep in eps}


def group_blocks() -> int:
    return len(group_prompt(0, 0)) // UNIT


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("profile", ["cache-aware", "cache-aware-plus"])
def test_new_groups_spread_over_equal_caches(seed: int, profile: str) -> None:
    # 6 groups of ~42% of a cache on 3 equal backends: 2 each fit, 3 on one do not.
    placed, _ = place_groups([400, 400, 400], 6, seed, profile=profile)
    assert sorted(placed.values()) == [2, 2, 2], placed


@pytest.mark.parametrize("seed", SEEDS)
def test_new_groups_follow_cache_size(seed: int) -> None:
    # One backend with twice the cache takes twice the groups; none is filled past its cache.
    placed, caps = place_groups([800, 400, 400], 8, seed)
    assert placed == {"gpu-0": 4, "gpu-1": 2, "gpu-2": 2}
    for name, n in placed.items():
        assert n * group_blocks() <= caps[name]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_short_common_head_does_not_pull_new_groups_together(seed: int) -> None:
    # Every system prompt starts with the same 2 blocks (a template's preamble): the first
    # backend to see it matches 2 of ~170 blocks of every later group. Worth less than
    # the cache room it lacks, it must not collect every new group.
    head = b"You are a helpful assistant. Answer briefly and cite your sources."[: 2 * UNIT]
    head = head.ljust(2 * UNIT, b".")
    placed, _ = place_groups([400, 400, 400], 6, seed, head=head)
    assert sorted(placed.values()) == [2, 2, 2], placed


def test_a_group_returns_to_its_backend() -> None:
    # Matched prompts are placed as before: each group's later requests go where it is.
    router = build_router("cache-aware", BuildContext(pool="p", model="m"), seed=0)
    eps = [endpoint(f"gpu-{i}", 400) for i in range(3)]
    home = {}
    for g in range(6):
        ctx = RequestContext(model="m", raw_prompt=group_prompt(g, 0))
        home[g] = router.route(ctx, eps, NOW).endpoint  # type: ignore[union-attr]
    for q in range(1, 4):
        for g in range(6):
            ctx = RequestContext(model="m", raw_prompt=group_prompt(g, q))
            decision = router.route(ctx, eps, NOW + q)
            assert decision is not None and decision.endpoint is home[g]
