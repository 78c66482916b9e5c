"""Subscriber to vLLM KV-cache event streams over ZMQ, feeding a prefix index.

Socket roles (vLLM's ZmqEventPublisher): its PUB socket *binds* when the configured
endpoint has a wildcard (`tcp://*:5557`), `::`, or is ipc/inproc, and *connects* otherwise
(`tcp://127.0.0.1:5557`). So a source has an explicit `bind`: True means we bind a SUB on
that address and backends connect to us (one bound socket serves many backends, told
apart by topic); False means we connect to a backend's bound PUB. `KVEventSource.for_vllm`
applies vLLM's rule to the endpoint string a backend was configured with. Sources sharing
`(bind, endpoint)` share one socket and must have distinct topics; the topic frame must
match exactly (ZMQ subscriptions are prefix matches, so "kv" would also receive "kv-b").

Per message `[topic, seq (8 B big-endian), payload]` the source's SequenceTracker
classifies the seq:
- in order: decode, call `on_events(backend, events, seq)`;
- duplicate: dropped (re-applying an old BlockStored after a later BlockRemoved would
  resurrect a block);
- gap: with a `replay_endpoint`, ask the backend's ROUTER for the missed batches (live
  messages of that source are held meanwhile, other sources are not delayed) and feed them
  in order; if the replay fails, times out or no longer covers the whole gap, or there is
  no replay endpoint, call `on_gap(backend)` so the index forgets that backend, then go on.
  Forgetting is safe (the index only under-reports) where guessing is not.
- restart (seq went back): `on_gap(backend)` at once, the cache behind it is new, then
  replay what the new process already published if possible.
A payload that does not decode also leads to `on_gap`: its effect on the cache is unknown.
Frames that cannot be attributed (wrong frame count, unknown topic, bad seq) are counted
in `invalid_messages` and logged; nothing stops the loop.

Replay protocol (vllm/distributed/kv_events.py, `_service_replay`): a DEALER sends
`[b"", start_seq (8 B big-endian)]`; the ROUTER answers each buffered batch with
seq >= start_seq as `[b"", topic, seq, payload]` (vLLM 0.32; older vLLM and SGLang omit
the topic frame: `[b"", seq, payload]`), then an end marker with seq == -1 and an empty
payload. Both framings are accepted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lbproxy.aio import cancel_and_wait
from lbproxy.signals.kv_events import (
    Gap,
    KVEvent,
    KVEventDecodeError,
    SequenceTracker,
    decode_batch,
)

if TYPE_CHECKING:  # zmq is imported when a subscriber starts: pools without KV events skip it
    import zmq.asyncio

__all__ = ["KVEventSource", "KVEventSubscriber", "parse_replay_reply"]

log = logging.getLogger(__name__)

OnEvents = Callable[[str, list[KVEvent], int], None]
OnGap = Callable[[str], None]

_END_SEQ = -1


@dataclass(frozen=True, slots=True)
class KVEventSource:
    """One backend's event stream, as seen from lbproxy (see the module docstring)."""

    endpoint: str
    topic: str
    backend_name: str
    bind: bool
    replay_endpoint: str | None = None

    @classmethod
    def for_vllm(
        cls,
        endpoint: str,
        *,
        topic: str = "",
        backend_name: str,
        host: str | None = None,
        replay_endpoint: str | None = None,
    ) -> KVEventSource:
        """A source from the endpoints given to vLLM's `--kv-events-config`.

        vLLM binds a wildcard endpoint, so we connect to `host` on that port; otherwise
        it connects, so we bind the same address. The replay ROUTER always binds.
        """

        def reachable(ep: str) -> str:
            if "*" in ep:
                if host is None:
                    raise ValueError(f"host is needed to reach wildcard endpoint {ep!r}")
                return ep.replace("*", host)
            return ep

        vllm_binds = (
            "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))
        )
        return cls(
            endpoint=reachable(endpoint) if vllm_binds else endpoint,
            topic=topic,
            backend_name=backend_name,
            bind=not vllm_binds,
            replay_endpoint=None if replay_endpoint is None else reachable(replay_endpoint),
        )


def parse_replay_reply(frames: list[bytes]) -> tuple[int, bytes]:
    """(seq, payload) of one replay reply as a DEALER receives it; seq -1 ends a replay."""
    if frames and frames[0] == b"":
        frames = frames[1:]
    if len(frames) == 3:  # vLLM 0.32: topic, seq, payload
        frames = frames[1:]
    if len(frames) != 2 or len(frames[0]) != 8:
        raise ValueError(f"unexpected replay reply of {len(frames)} frames")
    return int.from_bytes(frames[0], "big", signed=True), frames[1]


@dataclass(slots=True, eq=False)
class _Source:
    cfg: KVEventSource
    tracker: SequenceTracker
    replay_task: asyncio.Task[None] | None = None
    held: list[tuple[int, bytes]] = field(default_factory=list)  # live batches during a replay
    dealer: zmq.asyncio.Socket | None = None


class KVEventSubscriber:
    """Receives KV events from many backends; see the module docstring for the policy."""

    def __init__(
        self,
        sources: list[KVEventSource],
        on_events: OnEvents,
        on_gap: OnGap,
        *,
        context: zmq.asyncio.Context | None = None,
        replay_timeout: float = 2.0,
        rcvhwm: int = 100_000,
    ) -> None:
        self.on_events = on_events
        self.on_gap = on_gap
        self.replay_timeout = replay_timeout
        self.rcvhwm = rcvhwm
        self._ctx = context
        self._owns_ctx = context is None
        self._groups: dict[tuple[bool, str], dict[bytes, _Source]] = {}
        for cfg in sources:
            group = self._groups.setdefault((cfg.bind, cfg.endpoint), {})
            topic = cfg.topic.encode()
            if topic in group:
                raise ValueError(
                    f"sources {group[topic].cfg.backend_name!r} and {cfg.backend_name!r} share "
                    f"endpoint {cfg.endpoint!r} and topic {cfg.topic!r}: they cannot be told apart"
                )
            # With a replay endpoint, history published before we joined can be fetched,
            # so a first seq above 0 is worth treating as a gap.
            expect_first = 0 if cfg.replay_endpoint else None
            group[topic] = _Source(cfg, SequenceTracker(expect_first=expect_first))
        self._sockets: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._actual: dict[tuple[bool, str], str] = {}
        # Counters, per backend name.
        names = {cfg.backend_name for cfg in sources}
        self.received: dict[str, int] = dict.fromkeys(names, 0)
        self.gaps: dict[str, int] = dict.fromkeys(names, 0)
        self.restarts: dict[str, int] = dict.fromkeys(names, 0)
        self.duplicates: dict[str, int] = dict.fromkeys(names, 0)
        self.decode_errors: dict[str, int] = dict.fromkeys(names, 0)
        self.replays: dict[str, int] = dict.fromkeys(names, 0)
        self.replay_failures: dict[str, int] = dict.fromkeys(names, 0)
        self.forgets: dict[str, int] = dict.fromkeys(names, 0)
        self.handler_errors = 0
        self.invalid_messages = 0

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the sockets and start receiving (binds happen before this returns)."""
        if self._tasks:
            return
        import zmq.asyncio

        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        try:
            for (bind, endpoint), by_topic in self._groups.items():
                sock = self._ctx.socket(zmq.SUB)
                self._sockets.append(sock)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
                for topic in by_topic:
                    sock.setsockopt(zmq.SUBSCRIBE, topic)
                if bind:
                    sock.bind(endpoint)
                    self._actual[(bind, endpoint)] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                else:
                    sock.connect(endpoint)
                    self._actual[(bind, endpoint)] = endpoint
                self._tasks.append(
                    asyncio.create_task(self._recv_loop(sock, by_topic), name=f"kv-sub:{endpoint}")
                )
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Cancel receiving and replays, close every socket (and the context if ours)."""
        await cancel_and_wait(*self._tasks, *(src.replay_task for src in self._all_sources()))
        self._tasks.clear()
        for src in self._all_sources():
            src.replay_task = None
            src.held.clear()
            self._close_dealer(src)
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()
        if self._owns_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def endpoint_of(self, source: KVEventSource) -> str:
        """The address actually in use for a source (a bound `tcp://host:*` resolved)."""
        return self._actual[(source.bind, source.endpoint)]

    # ---- receiving -----------------------------------------------------------------------

    def _all_sources(self) -> list[_Source]:
        return [src for group in self._groups.values() for src in group.values()]

    async def _recv_loop(self, sock: zmq.asyncio.Socket, by_topic: dict[bytes, _Source]) -> None:
        import zmq

        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError:
                log.exception("kv events: receive failed")
                await asyncio.sleep(0.1)  # no tight loop if the socket stays broken
                continue
            if len(frames) != 3:
                self._invalid(f"{len(frames)} frames instead of 3")
                continue
            topic, seq_bytes, payload = frames
            src = by_topic.get(topic)
            if src is None:
                self._invalid(f"unknown topic {topic[:60]!r}")
                continue
            if len(seq_bytes) != 8:
                self._invalid(f"seq frame of {len(seq_bytes)} bytes from {src.cfg.backend_name}")
                continue
            try:
                self._on_message(src, int.from_bytes(seq_bytes, "big"), payload)
            except Exception:  # a bug here must not stop every backend's stream
                log.exception("kv events: failed to process a message")

    def _invalid(self, why: str) -> None:
        self.invalid_messages += 1
        log.warning("kv events: dropped invalid message: %s", why)

    def _on_message(self, src: _Source, seq: int, payload: bytes) -> None:
        if src.replay_task is not None:
            src.held.append((seq, payload))
            return
        name = src.cfg.backend_name
        tracker = src.tracker
        if tracker.is_duplicate(seq, payload):
            self.duplicates[name] += 1
            return
        gap = tracker.observe(seq, payload)
        if gap is None:
            self._apply(src, seq, payload)
            return
        self.gaps[name] += 1
        if gap.restart:
            self.restarts[name] += 1
            log.warning("kv events: %s restarted (seq %d)", name, seq)
            self._forget(src)
        if gap.missed > 0 and src.cfg.replay_endpoint:
            # This message is already accepted by the tracker: it goes first in `held`
            # and is applied right after the missed batches.
            src.held.append((seq, payload))
            src.replay_task = asyncio.create_task(self._replay(src, gap), name=f"kv-replay:{name}")
            return
        if gap.missed > 0 and not gap.restart:
            log.warning("kv events: %s missed seq %d..%d", name, gap.start, gap.end - 1)
            self._forget(src)
        self._apply(src, seq, payload)

    def _apply(self, src: _Source, seq: int, payload: bytes) -> None:
        name = src.cfg.backend_name
        try:
            batch = decode_batch(payload)
        except KVEventDecodeError as e:
            self.decode_errors[name] += 1
            log.warning("kv events: undecodable batch %d from %s: %s", seq, name, e)
            self._forget(src)
            return
        self.received[name] += 1
        try:
            self.on_events(name, batch.events, seq)
        except Exception:
            self.handler_errors += 1
            log.exception("kv events: on_events failed for %s", name)

    def _forget(self, src: _Source) -> None:
        name = src.cfg.backend_name
        self.forgets[name] += 1
        try:
            self.on_gap(name)
        except Exception:
            self.handler_errors += 1
            log.exception("kv events: on_gap failed for %s", name)

    # ---- replay --------------------------------------------------------------------------

    async def _replay(self, src: _Source, gap: Gap) -> None:
        name = src.cfg.backend_name
        got: dict[int, bytes] = {}
        try:
            for seq, payload in await self._fetch_replay(src, gap.start):
                if gap.start <= seq < gap.end:
                    got[seq] = payload
        except Exception as e:  # timeout, ZMQ error, malformed reply: fall back to forgetting
            self.replay_failures[name] += 1
            log.warning("kv events: replay from %s failed: %r", name, e)
            self._close_dealer(src)  # late replies must not be taken for the next replay's
        if len(got) < gap.missed:
            log.warning(
                "kv events: replay from %s recovered %d of %d missed batches",
                name,
                len(got),
                gap.missed,
            )
            if not gap.restart:  # a restart has already forgotten, nothing was applied since
                self._forget(src)
        for seq in sorted(got):
            self._apply(src, seq, got[seq])
        # Resume: the batch that revealed the gap, then what arrived meanwhile, through the
        # normal path (which may find another gap and start another replay).
        src.replay_task = None
        held, src.held = src.held, []
        trigger_seq, trigger_payload = held[0]
        self._apply(src, trigger_seq, trigger_payload)
        for i in range(1, len(held)):
            if src.replay_task is not None:
                src.held.extend(held[i:])
                break
            self._on_message(src, *held[i])

    async def _fetch_replay(self, src: _Source, start: int) -> list[tuple[int, bytes]]:
        assert self._ctx is not None and src.cfg.replay_endpoint is not None
        self.replays[src.cfg.backend_name] += 1
        if src.dealer is None:
            import zmq

            src.dealer = self._ctx.socket(zmq.DEALER)
            src.dealer.setsockopt(zmq.LINGER, 0)
            # vLLM's ROUTER drops replies beyond the pipe's high-water mark: no limit here
            # (the publisher's buffer bounds a replay anyway).
            src.dealer.setsockopt(zmq.RCVHWM, 0)
            src.dealer.connect(src.cfg.replay_endpoint)
        dealer = src.dealer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.replay_timeout
        await asyncio.wait_for(
            dealer.send_multipart([b"", start.to_bytes(8, "big")]), self.replay_timeout
        )
        items: list[tuple[int, bytes]] = []
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), deadline - loop.time())
            seq, payload = parse_replay_reply(frames)
            if seq == _END_SEQ:
                return items
            items.append((seq, payload))

    def _close_dealer(self, src: _Source) -> None:
        if src.dealer is not None:
            src.dealer.close(linger=0)
            src.dealer = None
