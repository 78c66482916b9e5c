"""Feeds each pool's precise prefix index from its backends' KV-cache events.

Only pools whose routing profile uses `precise-prefix` have an index; backends of other
pools are not subscribed to even when they publish. A source is named `pool/backend`
so that equal backend names in two pools stay apart.

The callbacks look the pool up in `current()` (the running PoolTable) on every batch, so
after a hot reload events land in the new table's indexes; the subscriber itself is
restarted only when its sources change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from lbproxy.config import Config
from lbproxy.proxy.pools import PoolTable
from lbproxy.routing.plugins.precise_prefix import SHARED_KEY
from lbproxy.routing.precise_index import PreciseIndex
from lbproxy.signals.kv_subscriber import KVEventSource, KVEventSubscriber

log = logging.getLogger("lbproxy.kv")


def _index(pools: PoolTable, source_name: str) -> tuple[PreciseIndex | None, str]:
    pool_name, _, backend = source_name.partition("/")
    for pool in pools.pools:
        if pool.name == pool_name:
            return pool.bctx.shared.get(SHARED_KEY), backend
    return None, backend


def kv_sources(cfg: Config, pools: PoolTable) -> list[KVEventSource]:
    """The event sources of the backends of pools that have a precise index."""
    sources: list[KVEventSource] = []
    for spec, pool in zip(cfg.pools, pools.pools, strict=True):
        if SHARED_KEY not in pool.bctx.shared:
            continue
        for b, ep in zip(spec.backends, pool.endpoints, strict=True):
            if b.kv_events is None:
                continue
            kv = b.kv_events
            name = f"{pool.name}/{ep.name}"
            if kv.mode == "auto":
                source = KVEventSource.for_vllm(
                    kv.endpoint,
                    topic=kv.topic,
                    backend_name=name,
                    host=kv.host or urlsplit(ep.url).hostname,
                    replay_endpoint=kv.replay_endpoint,
                )
            else:
                source = KVEventSource(
                    kv.endpoint, kv.topic, name, kv.mode == "bind", kv.replay_endpoint
                )
            sources.append(source)
    return sources


def build_subscriber(
    cfg: Config, pools: PoolTable, current: Callable[[], PoolTable] | None = None
) -> KVEventSubscriber | None:
    sources = kv_sources(cfg, pools)
    if not sources:
        return None
    table = current if current is not None else (lambda: pools)

    def on_events(source_name: str, events: list[Any], seq: int) -> None:
        index, backend = _index(table(), source_name)
        if index is not None:
            index.apply_events(backend, events)

    def on_gap(source_name: str) -> None:
        index, backend = _index(table(), source_name)
        if index is not None:
            log.warning("KV events of %s: gap not repaired; forgetting its blocks", source_name)
            index.forget(backend)

    return KVEventSubscriber(sources, on_events, on_gap)


async def start_subscriber(
    cfg: Config, pools: PoolTable, current: Callable[[], PoolTable] | None = None
) -> KVEventSubscriber | None:
    """`build_subscriber`, started (at start-up, and on a reload that changes the sources)."""
    subscriber = build_subscriber(cfg, pools, current)
    if subscriber is not None:
        await subscriber.start()
    return subscriber
