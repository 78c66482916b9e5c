"""Routing state shared through Redis by the replicas and workers of one fleet.

What is shared: the routing decisions' lessons, not the indexes. Every decision a router
commits (its learning plugins' `on_routed`) is appended, after routing, to one Redis
stream (`<key_prefix>:routes`, trimmed to about `max_entries`): the endpoint, the
request's prefix-hash chain for each prefix-hash scorer of the router, and its session
key. Before a request is routed, a replica reads what the others appended since its last
read (one XREAD: one round trip) and applies it to its own indexes as if it had routed
those requests itself: `PrefixIndex.insert` with the endpoint's capacity (same bounds
and LRU eviction as a single replica, per replica), and the session-affinity scorer's
`on_routed`. A replica that starts reads the stream from its beginning, so it joins with
the index the others hold. Routing itself reads only local memory: it stays pure and
synchronous, and no lock is taken anywhere.

Timeouts and failures: a request waits at most `timeout` (default 5 ms) for the read;
past that it is routed on what this replica knows, and the following requests do not
wait until that read has ended (it goes on in the background, bounded by the client's
1 s socket timeout, and is applied when it lands). Writes are pipelined by a background
task, never awaited by a request. Redis unreachable: logged once, counted
(`lbproxy_shared_state_errors_total{op, reason}`), `lbproxy_shared_state_up` 0, reads
and writes skipped for RETRY_AFTER, then tried again (redis-py reconnects); decisions
made meanwhile are not shared (`lbproxy_shared_state_dropped_total`). Nothing of it
reaches a client.

Config mismatch: each router's stream key names its pool, its role and its scorers'
block geometry, so replicas whose prefix-hash settings differ do not mix their hashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lbproxy.config import ConfigError
from lbproxy.config import SharedState as SharedStateConfig
from lbproxy.credentials import without_credentials
from lbproxy.routing.plugins.prefix_hash import PrefixHashScorer
from lbproxy.routing.plugins.session_affinity import SessionAffinityScorer
from lbproxy.routing.state import Endpoint, RequestContext

log = logging.getLogger("lbproxy.shared_state")

RETRY_AFTER = 1.0  # seconds between attempts while Redis is down
SOCKET_TIMEOUT = 1.0  # a command's bound in the background (the request waits `timeout`)
READ_COUNT = 1000  # entries per read: a replica far behind catches up over several
CATCH_UP_BUDGET = 3.0  # seconds a starting replica spends reading the stream at most
WRITE_BATCH = 256
MAX_PENDING = 10_000  # decisions waiting to be written; beyond, the oldest are dropped


def _weights(scorer: PrefixHashScorer) -> list[int] | None:
    """Each block's size in units, as the scorer inserts them (None: one unit each)."""
    hasher = scorer.hasher
    if hasher.ends is None:
        return None
    units = [e // hasher.block_bytes for e in hasher.ends]
    return [b - a for a, b in zip([0, *units], units, strict=False)]


class _RouterShare:
    """One router's shared lessons: its key in the stream and its learning plugins."""

    __slots__ = ("endpoints", "key", "owner", "prefix", "sessions", "weights")

    def __init__(self, owner: SharedState, key: bytes, router: Any, endpoints: list[Endpoint]):
        self.owner = owner
        self.key = key
        scorers = [ws.scorer for ws in router.scorers]
        self.prefix = [s for s in scorers if isinstance(s, PrefixHashScorer)]
        self.sessions = [s for s in scorers if isinstance(s, SessionAffinityScorer)]
        self.weights = [_weights(s) for s in self.prefix]
        self.endpoints = {ep.name: ep for ep in endpoints}

    # A RoutedObserver of the router: called after each decision it commits. No I/O.
    def on_routed(self, ctx: RequestContext, endpoint: Endpoint, now: float) -> None:
        fields: dict[bytes, bytes] = {b"k": self.key, b"e": endpoint.name.encode()}
        for i, scorer in enumerate(self.prefix):
            hashes = scorer.hashes(ctx)  # computed by its score(): cached, no work
            if hashes:
                fields[b"h%d" % i] = struct.pack(f"<{len(hashes)}Q", *hashes)
                tail = scorer.tail(ctx, len(hashes))
                if tail:
                    fields[b"t%d" % i] = b"%d" % tail
        if self.sessions and ctx.session_key is not None:
            fields[b"s"] = ctx.session_key.encode()
        if len(fields) > 2:
            self.owner.publish(fields)

    def apply(self, fields: dict[bytes, bytes], now: float) -> bool:
        """Learn another replica's decision; False when it names an unknown endpoint."""
        ep = self.endpoints.get(fields[b"e"].decode())
        if ep is None:
            return False
        for i, scorer in enumerate(self.prefix):
            raw = fields.get(b"h%d" % i)
            if not raw or len(raw) % 8:
                continue
            hashes = list(struct.unpack(f"<{len(raw) // 8}Q", raw))
            weights = self.weights[i]
            if weights is not None and len(hashes) > len(weights):
                continue  # another geometry (the key should have said so)
            tail = fields.get(b"t%d" % i)
            scorer.learn(ep, hashes, weights, int(tail) if tail and tail.isdigit() else 0)
        session = fields.get(b"s")
        if session is not None:
            ctx = RequestContext(model="", session_key=session.decode())
            for s in self.sessions:
                s.on_routed(ctx, ep, now)
        return True


def _router_key(pool: str, role: str, router: Any) -> bytes:
    geometry = ",".join(
        f"{s.hasher.block_bytes}:{s.hasher.max_blocks}:{len(s.hasher.ends or ())}:{s.model}"
        for s in (ws.scorer for ws in router.scorers)
        if isinstance(s, PrefixHashScorer)
    )
    return f"{pool}/{role}/{geometry}".encode()


class SharedState:
    def __init__(
        self, settings: SharedStateConfig, pools: Callable[[], Any], clock: Callable[[], float]
    ) -> None:
        try:
            import redis.asyncio as aioredis  # only with `state:` configured
        except ImportError:
            raise ConfigError(
                "state.redis: needs redis-py, not installed: pip install 'lbproxy[replicas]'"
            ) from None

        self.settings = settings
        self.pools = pools  # the running PoolTable (a reload swaps it)
        self.clock = clock
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._me = self.replica.encode()
        self.stream = f"{settings.key_prefix}:routes"
        self.redis = aioredis.Redis.from_url(
            settings.redis,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            retry=None,
            health_check_interval=0,
        )
        self.up = True
        self.errors: dict[tuple[str, str], int] = {}
        self.applied = 0
        self.published = 0
        self.dropped = 0
        self._last_id = b"0-0"
        self._retry_at = 0.0
        self._table: Any = None
        self._routers: dict[bytes, _RouterShare] = {}
        self._read: asyncio.Task[None] | None = None
        self._read_late = False  # the read in flight outlived a request's wait
        self._pending: deque[dict[bytes, bytes]] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.on_error: list[Callable[[], None]] = []  # flow_share: Redis is unusable

    # ---- routers ----------------------------------------------------------------------
    def attach(self) -> None:
        """Observe every router of the running table (again after a reload swapped it)."""
        table = self.pools()
        self._table = table
        routers: dict[bytes, _RouterShare] = {}
        for pool in table.pools:
            pairs = [("main", pool.router)]
            if pool.disagg is not None:
                pairs += [("prefill", pool.disagg.prefill), ("decode", pool.disagg.decode)]
            for role, router in pairs:
                key = _router_key(pool.name, role, router)
                share = _RouterShare(self, key, router, pool.endpoints)
                if not share.prefix and not share.sessions:
                    continue
                router.add_observer(share)  # (replacing a kept router's previous one)
                routers[key] = share
        self._routers = routers

    # ---- before routing: read ---------------------------------------------------------
    async def before_route(self) -> None:
        """Learn what the other replicas routed since the last read, waiting `timeout`
        at most."""
        if self._table is not self.pools():
            self.attach()
        task = self._read
        if task is None:
            if self.clock() < self._retry_at:
                return
            task = self._read = asyncio.get_running_loop().create_task(self._read_once())
        elif self._read_late:
            return  # Redis is slow: do not make every request wait for it
        done, _ = await asyncio.wait((task,), timeout=self.settings.timeout)
        if not done and not self._read_late:
            self._read_late = True
            self._count("read", "timeout")

    async def _read_once(self, count: int = READ_COUNT) -> int:
        try:
            reply = await self.redis.xread({self.stream: self._last_id}, count=count)
        except Exception as e:  # any failure: route on local state
            self._failed("read", e)
            return 0
        finally:
            self._read = None
            self._read_late = False
        self._ok()
        n = 0
        if reply:
            entries = reply[0][1]
            self._apply(entries)
            n = len(entries)
        return n

    def _apply(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        now = self.clock()
        routers = self._routers
        me = self._me
        for _id, fields in entries:
            if fields.get(b"r") == me:
                continue
            share = routers.get(fields.get(b"k", b""))
            if share is not None and share.apply(fields, now):
                self.applied += 1
        self._last_id = entries[-1][0]

    # ---- after routing: write ---------------------------------------------------------
    def publish(self, fields: dict[bytes, bytes]) -> None:
        if self.clock() < self._retry_at:
            self.dropped += 1  # Redis is down: this lesson stays here
            return
        fields[b"r"] = self._me
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            pending.popleft()
            self.dropped += 1
        pending.append(fields)
        self._wake.set()

    async def _write_loop(self) -> None:
        maxlen = self.settings.max_entries
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                n = min(len(self._pending), WRITE_BATCH)
                batch = [self._pending.popleft() for _ in range(n)]
                if self.clock() < self._retry_at:
                    self.dropped += n
                    continue
                pipe = self.redis.pipeline(transaction=False)
                for fields in batch:
                    pipe.xadd(self.stream, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
                try:
                    await pipe.execute()
                except Exception as e:
                    self.dropped += n
                    self._failed("write", e)
                else:
                    self.published += n
                    self._ok()

    # ---- health -----------------------------------------------------------------------
    def _count(self, op: str, reason: str) -> None:
        key = (op, reason)
        self.errors[key] = self.errors.get(key, 0) + 1

    def _failed(self, op: str, e: BaseException) -> None:
        reason = (
            "timeout" if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__ else "error"
        )
        self._count(op, reason)
        self._retry_at = self.clock() + RETRY_AFTER
        if self.up:
            self.up = False
            log.warning(
                "shared state: Redis at %s failed (%s: %s); routing goes on with this "
                "replica's own state, retrying every %gs",
                without_credentials(self.settings.redis),
                type(e).__name__,
                e,
                RETRY_AFTER,
            )
            for cb in self.on_error:
                cb()

    def _ok(self) -> None:
        if not self.up:
            self.up = True
            log.warning("shared state: Redis is back; sharing resumes")

    # ---- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Attach to the routers, catch up with the stream (bounded), start writing."""
        self.attach()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CATCH_UP_BUDGET
        while loop.time() < deadline:
            if await self._read_once(count=10 * READ_COUNT) < 10 * READ_COUNT:
                break
        log.info(
            "shared state: replica %s on Redis %s, learnt %d decisions of other replicas",
            self.replica,
            without_credentials(self.settings.redis),
            self.applied,
        )
        self._writer = loop.create_task(self._write_loop())

    async def stop(self) -> None:
        for task in (self._writer, self._read):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.redis.aclose()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "lbproxy_shared_state_up", "1 while Redis (state.redis) answers, else 0"
        )
        up.add_metric([], 1.0 if self.up else 0.0)
        yield up
        errors = CounterMetricFamily(
            "lbproxy_shared_state_errors",
            "Redis calls that failed or outlived the routing wait (state.timeout)",
            labels=["op", "reason"],
        )
        for (op, reason), n in sorted(self.errors.items()):
            errors.add_metric([op, reason], n)
        yield errors
        for name, value, doc in (
            ("applied", self.applied, "Other replicas' decisions learnt from Redis"),
            ("published", self.published, "This replica's decisions written to Redis"),
            ("dropped", self.dropped, "Decisions not shared because Redis was unusable"),
        ):
            c = CounterMetricFamily(f"lbproxy_shared_state_{name}", doc)
            c.add_metric([], value)
            yield c
