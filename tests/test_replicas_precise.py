"""The precise prefix index needs no Redis: two replicas subscribe to the same simulated
backends' KV events (a PUB socket takes any number of subscribers) and hold the same
index, so a prefix placed through one replica is found through the other."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from lbproxy.bench.workloads import shared_prefix
from lbproxy.config import parse_config
from lbproxy.proxy.app import RunningProxy, start_proxy
from lbproxy.routing.plugins.precise_prefix import SHARED_KEY
from lbproxy.tokenization.tokenizer import default_tokenizer
from tests.test_routing_integration import MODEL, _config, _fleet, _send_all


async def _case() -> tuple[dict[str, Any], list[dict[str, set[int]]], dict[int, Counter[str]]]:
    handles = await _fleet(3, kv_events=True)
    proxies: list[RunningProxy] = []
    try:
        cfg = _config(handles, "precise-cache-aware")
        for seed in (1, 2):
            proxies.append(await start_proxy(parse_config(cfg), seed=seed))
        await asyncio.sleep(0.3)  # both SUB sockets connected before the first event
        wl = shared_prefix(
            default_tokenizer(),
            num_groups=6,
            num_prompts_per_group=4,
            system_prompt_len=600,
            question_len=32,
            output_len=8,
            seed=7,
        )
        reqs = [wl.request(i) for i in range(len(wl))]
        firsts = {}
        for r in reqs:  # the first prompt of each group, through replica 0 only
            firsts.setdefault(r.group, r)
        placed = await _send_all(
            proxies[0].url, [r.body(MODEL, stream=False) for r in firsts.values()], 1
        )
        await asyncio.sleep(0.5)  # the KV events reach both subscribers
        rest = [r for r in reqs if firsts[r.group] is not r]
        served = await _send_all(proxies[1].url, [r.body(MODEL, stream=False) for r in rest], 1)
        by_group: dict[int, Counter[str]] = {}
        for g, backend in zip(firsts, placed, strict=True):
            by_group.setdefault(g, Counter())[f"placed:{backend}"] += 1
        for r, backend in zip(rest, served, strict=True):
            by_group[r.group][backend] += 1
        await asyncio.sleep(0.5)
        indexes = []
        for p in proxies:
            index = p.state.pools.pools[0].bctx.shared[SHARED_KEY]
            indexes.append({f"sim{i}": index.engine_hashes_of(f"sim{i}") for i in range(3)})
        want = {f"sim{i}": h.engine.cached_block_hashes() for i, h in enumerate(handles)}
        return want, indexes, by_group
    finally:
        for p in proxies:
            await p.close()
        for h in handles:
            await h.close()


def test_two_replicas_share_the_precise_index_through_kv_events(loop_thread) -> None:
    want, indexes, by_group = loop_thread.run(_case(), timeout=180)
    assert sum(len(v) for v in want.values()) > 0
    assert indexes[0] == want and indexes[1] == want  # each replica holds the whole truth
    for group, counts in by_group.items():
        (placed,) = [k.removeprefix("placed:") for k in counts if k.startswith("placed:")]
        served = {k for k in counts if not k.startswith("placed:")}
        assert served == {placed}, (group, counts)  # replica 1 found replica 0's placement
