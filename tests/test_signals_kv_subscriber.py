"""KVEventSubscriber with real ZMQ sockets on 127.0.0.1: PUBs in both roles, a ROUTER replay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from lbproxy.signals.kv_events import (
    AllBlocksCleared,
    BlockStored,
    KVEvent,
    decode_batch,
    encode_batch,
    vllm_block_stored,
)
from lbproxy.signals.kv_subscriber import KVEventSource, KVEventSubscriber, parse_replay_reply

FIXTURES = Path(__file__).parent / "fixtures"
RECORDS = [
    json.loads(line)
    for line in (FIXTURES / "vllm-0.32-kv-events.jsonl").read_text().splitlines()
    if line and not line.startswith("#")
]
END = (-1).to_bytes(8, "big", signed=True)


def batch(i: int, life: int = 0) -> bytes:
    """A distinct payload per (seq, publisher life)."""
    return encode_batch(
        1_800_000_000.0 + life * 1000 + i, [vllm_block_stored([i], None, [i] * 4, 4)]
    )


def hash_of(payload: bytes) -> int:
    (ev,) = decode_batch(payload).events
    assert isinstance(ev, BlockStored)
    return ev.block_hashes[0]


@dataclass
class Recorder:
    events: list[tuple[str, int, list[KVEvent]]] = field(default_factory=list)
    forgets: list[str] = field(default_factory=list)
    log: list[tuple[str, str, int]] = field(default_factory=list)  # ("events"|"gap", name, seq)

    def on_events(self, name: str, events: list[KVEvent], seq: int) -> None:
        self.events.append((name, seq, events))
        self.log.append(("events", name, seq))

    def on_gap(self, name: str) -> None:
        self.forgets.append(name)
        self.log.append(("gap", name, -1))

    def seqs(self, name: str) -> list[int]:
        return [seq for n, seq, _ in self.events if n == name]


class Publisher:
    """A vLLM-like PUB: [topic, seq 8B big-endian, payload]."""

    def __init__(self, sock: zmq.asyncio.Socket, topic: str) -> None:
        self.sock = sock
        self.topic = topic.encode()

    async def send(self, seq: int, payload: bytes) -> None:
        await self.sock.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])

    async def send_until_seen(
        self, seq: int, payload: bytes, seen: Callable[[], bool], timeout: float = 5.0
    ) -> None:
        """Resend one batch until it arrives: a PUB drops what it sends before the
        subscription has reached it (ZMQ's slow joiner). The repeats are duplicates."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not seen():
            assert loop.time() < deadline, "subscriber never received the first batch"
            await self.send(seq, payload)
            await asyncio.sleep(0.02)


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
async def subscribers() -> AsyncIterator[Callable[..., KVEventSubscriber]]:
    made: list[KVEventSubscriber] = []

    def make(sources: list[KVEventSource], rec: Recorder, **kw: Any) -> KVEventSubscriber:
        sub = KVEventSubscriber(sources, rec.on_events, rec.on_gap, **kw)
        made.append(sub)
        return sub

    yield make
    for sub in made:
        await sub.stop()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def connecting_pub(ctx: zmq.asyncio.Context, endpoint: str, topic: str) -> Publisher:
    """vLLM with a non-wildcard endpoint: its PUB connects to our bound SUB."""
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return Publisher(sock, topic)


def binding_pub(ctx: zmq.asyncio.Context, topic: str) -> tuple[Publisher, str]:
    """vLLM with tcp://*:PORT: its PUB binds and we connect."""
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    return Publisher(sock, topic), sock.getsockopt_string(zmq.LAST_ENDPOINT)


class ReplayServer:
    """vLLM's replay ROUTER over a store of published batches."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: str, framing: str = "vllm-0.32") -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.topic = topic.encode()
        self.framing = framing
        self.store: dict[int, bytes] = {}
        self.requests: list[int] = []
        self.silent = False
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            client, empty, start = await self.sock.recv_multipart()
            assert empty == b""
            self.requests.append(int.from_bytes(start, "big"))
            if self.silent:
                continue
            for seq in sorted(self.store):
                if seq >= self.requests[-1]:
                    head = [client, b""] + ([self.topic] if self.framing == "vllm-0.32" else [])
                    await self.sock.send_multipart([*head, seq.to_bytes(8, "big"), self.store[seq]])
            tail = [b""] if self.framing == "vllm-0.32" else []
            await self.sock.send_multipart([client, b"", *tail, END, b""])

    async def close(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        self.sock.close(linger=0)


@pytest.fixture
async def replay_servers(zctx) -> AsyncIterator[Callable[..., ReplayServer]]:
    made: list[ReplayServer] = []

    def make(topic: str, framing: str = "vllm-0.32") -> ReplayServer:
        srv = ReplayServer(zctx, topic, framing)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        await srv.close()


# ---- roles ---------------------------------------------------------------------------------


async def test_bound_sub_serves_many_publishers_told_apart_by_topic(zctx, subscribers) -> None:
    # "kv-events" is a prefix of "kv-events-b": ZMQ's prefix matching must not mix them up.
    sources = [
        KVEventSource("tcp://127.0.0.1:*", "kv-events", "vllm-a", bind=True),
        KVEventSource("tcp://127.0.0.1:*", "kv-events-b", "vllm-b", bind=True),
    ]
    rec = Recorder()
    sub = subscribers(sources, rec)
    await sub.start()
    endpoint = sub.endpoint_of(sources[0])
    assert endpoint == sub.endpoint_of(sources[1])  # one socket for both
    assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith("*")

    pub_a = connecting_pub(zctx, endpoint, "kv-events")
    pub_b = connecting_pub(zctx, endpoint, "kv-events-b")
    lives = {"vllm-a": RECORDS[:29], "vllm-b": RECORDS[29:39]}  # the capture's two lives
    assert [r["frame1_seq"] for r in lives["vllm-b"]] == list(range(10))
    payloads = {
        name: [msgspec.msgpack.encode(r["raw_msgpack"]) for r in records]
        for name, records in lives.items()
    }
    for name, pub in (("vllm-a", pub_a), ("vllm-b", pub_b)):
        await pub.send_until_seen(0, payloads[name][0], lambda n=name: bool(rec.seqs(n)))
    for name, pub in (("vllm-a", pub_a), ("vllm-b", pub_b)):
        for seq, payload in enumerate(payloads[name][1:], start=1):
            await pub.send(seq, payload)

    await until(lambda: len(rec.seqs("vllm-a")) == 29 and len(rec.seqs("vllm-b")) == 10)
    for name in lives:
        assert rec.seqs(name) == list(range(len(lives[name])))
        got = [events for n, _, events in rec.events if n == name]
        assert got == [decode_batch(p).events for p in payloads[name]]
    assert rec.forgets == []
    assert sub.received == {"vllm-a": 29, "vllm-b": 10}
    assert sub.gaps == {"vllm-a": 0, "vllm-b": 0}
    assert sub.invalid_messages == 0
    pub_a.sock.close()
    pub_b.sock.close()


async def test_connect_to_binding_publishers(zctx, subscribers) -> None:
    pub1, ep1 = binding_pub(zctx, "kv-events")
    pub2, ep2 = binding_pub(zctx, "kv-events")  # same topic: separate sockets tell them apart
    sources = [
        KVEventSource(ep1, "kv-events", "one", bind=False),
        KVEventSource(ep2, "kv-events", "two", bind=False),
    ]
    rec = Recorder()
    sub = subscribers(sources, rec)
    await sub.start()
    await pub1.send_until_seen(0, batch(0), lambda: bool(rec.seqs("one")))
    await pub2.send_until_seen(0, batch(0, life=1), lambda: bool(rec.seqs("two")))
    for seq in range(1, 6):
        await pub1.send(seq, batch(seq))
        await pub2.send(seq, batch(seq, life=1))
    await until(lambda: len(rec.seqs("one")) == 6 and len(rec.seqs("two")) == 6)
    assert rec.seqs("one") == rec.seqs("two") == list(range(6))
    assert rec.forgets == [] and sub.gaps == {"one": 0, "two": 0}
    pub1.sock.close()
    pub2.sock.close()


# ---- gaps ----------------------------------------------------------------------------------


async def start_bound(
    zctx, subscribers, rec: Recorder, replay: ReplayServer | None = None, **kw: Any
) -> tuple[KVEventSubscriber, Publisher]:
    src = KVEventSource(
        "tcp://127.0.0.1:*",
        "kv",
        "b0",
        bind=True,
        replay_endpoint=None if replay is None else replay.endpoint,
    )
    sub = subscribers([src], rec, **kw)
    await sub.start()
    return sub, connecting_pub(zctx, sub.endpoint_of(src), "kv")


async def test_gap_without_replay_forgets_the_backend(zctx, subscribers) -> None:
    rec = Recorder()
    sub, pub = await start_bound(zctx, subscribers, rec)
    await pub.send_until_seen(0, batch(0), lambda: bool(rec.seqs("b0")))
    for seq in (1, 4, 5):  # 2 and 3 lost
        await pub.send(seq, batch(seq))
    await until(lambda: rec.seqs("b0")[-1:] == [5])
    assert rec.log == [
        ("events", "b0", 0),
        ("events", "b0", 1),
        ("gap", "b0", -1),  # forget first, then apply what follows
        ("events", "b0", 4),
        ("events", "b0", 5),
    ]
    assert sub.gaps["b0"] == 1 and sub.forgets["b0"] == 1 and sub.replays["b0"] == 0
    pub.sock.close()


@pytest.mark.parametrize("framing", ["vllm-0.32", "legacy"])
async def test_gap_is_filled_by_replay(zctx, subscribers, replay_servers, framing) -> None:
    replay = replay_servers("kv", framing)
    replay.store = {seq: batch(seq) for seq in range(8)}
    rec = Recorder()
    sub, pub = await start_bound(zctx, subscribers, rec, replay)
    await pub.send_until_seen(0, batch(0), lambda: bool(rec.seqs("b0")))
    for seq in (1, 4, 5, 6, 7):  # 2 and 3 lost on the way
        await pub.send(seq, batch(seq))
    await until(lambda: rec.seqs("b0")[-1:] == [7])
    assert rec.seqs("b0") == list(range(8))
    assert [hash_of(batch(s)) for s in range(8)] == [
        ev[0].block_hashes[0] for _, _, ev in rec.events
    ]
    assert replay.requests == [2]
    assert rec.forgets == []
    assert sub.gaps["b0"] == 1 and sub.replays["b0"] == 1 and sub.replay_failures["b0"] == 0
    pub.sock.close()


async def test_late_join_fetches_history_by_replay(zctx, subscribers, replay_servers) -> None:
    replay = replay_servers("kv")
    replay.store = {seq: batch(seq) for seq in range(6)}
    rec = Recorder()
    _, pub = await start_bound(zctx, subscribers, rec, replay)
    # The first batch we ever see is seq 5: 0..4 were published before we subscribed.
    await pub.send_until_seen(5, batch(5), lambda: 5 in rec.seqs("b0"))
    await until(lambda: len(rec.seqs("b0")) == 6)
    assert rec.seqs("b0") == list(range(6))
    assert replay.requests[0] == 0 and rec.forgets == []
    pub.sock.close()


async def test_replay_that_no_longer_covers_the_gap(zctx, subscribers, replay_servers) -> None:
    replay = replay_servers("kv")
    replay.store = {seq: batch(seq) for seq in range(3, 8)}  # 0..2 fell out of its buffer
    rec = Recorder()
    sub, pub = await start_bound(zctx, subscribers, rec, replay)
    await pub.send_until_seen(0, batch(0), lambda: bool(rec.seqs("b0")))
    await pub.send(5, batch(5))  # 1..4 missed, only 3..4 can be replayed
    await until(lambda: rec.seqs("b0")[-1:] == [5])
    assert rec.log == [
        ("events", "b0", 0),
        ("gap", "b0", -1),
        ("events", "b0", 3),
        ("events", "b0", 4),
        ("events", "b0", 5),
    ]
    assert replay.requests == [1] and sub.forgets["b0"] == 1
    pub.sock.close()


async def test_replay_timeout_falls_back_and_keeps_order(zctx, subscribers, replay_servers) -> None:
    replay = replay_servers("kv")
    replay.silent = True  # accepts the request, never answers
    rec = Recorder()
    sub, pub = await start_bound(zctx, subscribers, rec, replay, replay_timeout=0.3)
    await pub.send_until_seen(0, batch(0), lambda: bool(rec.seqs("b0")))
    await pub.send(3, batch(3))  # gap 1..2: replay requested, times out
    await until(lambda: replay.requests == [1])
    for seq in (4, 5):  # arrive while the replay is pending: held, then applied in order
        await pub.send(seq, batch(seq))
    await until(lambda: rec.seqs("b0")[-1:] == [5])
    assert rec.log == [
        ("events", "b0", 0),
        ("gap", "b0", -1),
        ("events", "b0", 3),
        ("events", "b0", 4),
        ("events", "b0", 5),
    ]
    assert sub.replay_failures["b0"] == 1

    # The next gap uses a fresh replay socket (late answers to the old one are discarded).
    replay.silent = False
    replay.store = {7: batch(7)}
    await pub.send(8, batch(8))
    await until(lambda: rec.seqs("b0")[-1:] == [8])
    assert rec.seqs("b0")[-3:] == [5, 7, 8]  # 6 is gone from the buffer: forget again
    assert sub.forgets["b0"] == 2 and replay.requests == [1, 6]
    pub.sock.close()


async def test_gap_on_one_backend_does_not_hold_up_another(
    zctx, subscribers, replay_servers
) -> None:
    replay = replay_servers("slow")
    replay.silent = True
    any_port = "tcp://127.0.0.1:*"
    sources = [
        KVEventSource(any_port, "slow", "slow", bind=True, replay_endpoint=replay.endpoint),
        KVEventSource(any_port, "fast", "fast", bind=True),
    ]
    rec = Recorder()
    sub = subscribers(sources, rec, replay_timeout=30.0)
    await sub.start()
    slow = connecting_pub(zctx, sub.endpoint_of(sources[0]), "slow")
    fast = connecting_pub(zctx, sub.endpoint_of(sources[1]), "fast")
    await slow.send_until_seen(0, batch(0), lambda: bool(rec.seqs("slow")))
    await fast.send_until_seen(0, batch(0), lambda: bool(rec.seqs("fast")))
    await slow.send(2, batch(2))  # gap: replay pending for up to 30 s
    await until(lambda: replay.requests == [1])
    for seq in range(1, 5):
        await fast.send(seq, batch(seq))
    await until(lambda: rec.seqs("fast") == list(range(5)))
    assert rec.seqs("slow") == [0]  # still waiting for its replay
    slow.sock.close()
    fast.sock.close()


# ---- duplicates, restarts, garbage --------------------------------------------------------


async def test_duplicates_are_dropped(zctx, subscribers) -> None:
    rec = Recorder()
    sub, pub = await start_bound(zctx, subscribers, rec)
    await pub.send_until_seen(0, batch(0), lambda: bool(rec.seqs("b0")))
    for seq in (1, 1, 2, 1, 2, 3):
        await pub.send(seq, batch(seq))
    await until(lambda: rec.seqs("b0")[-1:] == [3])
    await pub.send_until_seen(4, batch(4), lambda: 4 in rec.seqs("b0"))
    assert rec.seqs("b0") == [0, 1, 2, 3, 4]
    assert sub.duplicates["b0"] >= 3 and sub.gaps["b0"] == 0 and rec.forgets == []
    pub.sock.close()


async def test_publisher_restart_forgets_then_continues(zctx, subscribers) -> None:
    rec = Recorder()
    sub, pub = await start_bound(zctx, subscribers, rec)
    await pub.send_until_seen(0, batch(0), lambda: bool(rec.seqs("b0")))
    for seq in (1, 2, 3):
        await pub.send(seq, batch(seq))
    await pub.send(0, batch(0, life=1))  # the server came back: seq restarts at 0
    await pub.send(1, batch(1, life=1))
    await until(lambda: len(rec.seqs("b0")) == 6)
    assert rec.log == [
        ("events", "b0", 0),
        ("events", "b0", 1),
        ("events", "b0", 2),
        ("events", "b0", 3),
        ("gap", "b0", -1),
        ("events", "b0", 0),
        ("events", "b0", 1),
    ]
    assert rec.events[4][2] == decode_batch(batch(0, life=1)).events
    assert sub.restarts["b0"] == 1
    pub.sock.close()


async def test_garbage_is_counted_and_skipped(zctx, subscribers) -> None:
    rec = Recorder()
    sub, pub = await start_bound(zctx, subscribers, rec)
    await pub.send_until_seen(0, batch(0), lambda: bool(rec.seqs("b0")))
    await pub.sock.send_multipart([b"kv", (1).to_bytes(8, "big")])  # 2 frames
    await pub.sock.send_multipart([b"kv", b"\x01\x02", batch(1)])  # short seq frame
    await pub.sock.send_multipart([b"kv-other", (1).to_bytes(8, "big"), batch(1)])  # topic
    await pub.sock.send_multipart([b"kv", (1).to_bytes(8, "big"), b"\xc1 not msgpack"])
    await pub.send(2, encode_batch(5.0, [AllBlocksCleared()]))
    await until(lambda: rec.seqs("b0")[-1:] == [2])
    assert sub.invalid_messages == 3
    assert sub.decode_errors["b0"] == 1
    # The undecodable batch 1 had an unknown effect: the backend is forgotten.
    assert rec.log == [("events", "b0", 0), ("gap", "b0", -1), ("events", "b0", 2)]
    assert rec.events[-1][2] == [AllBlocksCleared()]
    pub.sock.close()


async def test_handler_errors_do_not_stop_the_stream(zctx, subscribers) -> None:
    seen: list[int] = []

    def on_events(name: str, events: list[KVEvent], seq: int) -> None:
        seen.append(seq)
        if seq == 1:
            raise RuntimeError("index bug")

    src = KVEventSource("tcp://127.0.0.1:*", "kv", "b0", bind=True)
    sub = KVEventSubscriber([src], on_events, lambda name: None)
    try:
        await sub.start()
        pub = connecting_pub(zctx, sub.endpoint_of(src), "kv")
        await pub.send_until_seen(0, batch(0), lambda: bool(seen))
        await pub.send(1, batch(1))
        await pub.send(2, batch(2))
        await until(lambda: seen[-1:] == [2])
        assert sub.handler_errors == 1
        pub.sock.close()
    finally:
        await sub.stop()


# ---- lifecycle and configuration ----------------------------------------------------------


async def test_given_context_is_left_usable(zctx) -> None:
    src = KVEventSource("tcp://127.0.0.1:*", "kv", "b0", bind=True)
    sub = KVEventSubscriber([src], Recorder().on_events, Recorder().on_gap, context=zctx)
    await sub.start()
    await sub.stop()
    await sub.stop()
    sock = zctx.socket(zmq.PUB)  # would raise if the subscriber had terminated it
    sock.close()


async def test_owned_context_is_terminated_on_stop() -> None:
    src = KVEventSource("tcp://127.0.0.1:*", "kv", "b0", bind=True)
    sub = KVEventSubscriber([src], Recorder().on_events, Recorder().on_gap)
    await sub.start()
    ctx = sub._ctx
    await sub.stop()
    assert ctx is not None and ctx.closed


async def test_bind_failure_cleans_up(zctx) -> None:
    taken = zctx.socket(zmq.PUB)
    taken.bind("tcp://127.0.0.1:*")
    endpoint = taken.getsockopt_string(zmq.LAST_ENDPOINT)
    sub = KVEventSubscriber(
        [KVEventSource(endpoint, "kv", "b0", bind=True)], Recorder().on_events, Recorder().on_gap
    )
    with pytest.raises(zmq.ZMQError):
        await sub.start()
    assert sub._sockets == [] and sub._ctx is None
    taken.close()


def test_sources_that_cannot_be_told_apart_are_rejected() -> None:
    same = [
        KVEventSource("tcp://127.0.0.1:5557", "kv-events", "a", bind=True),
        KVEventSource("tcp://127.0.0.1:5557", "kv-events", "b", bind=True),
    ]
    with pytest.raises(ValueError, match="cannot be told apart"):
        KVEventSubscriber(same, Recorder().on_events, Recorder().on_gap)


@pytest.mark.parametrize(
    ("vllm_endpoint", "replay", "want_endpoint", "want_bind", "want_replay"),
    [
        ("tcp://127.0.0.1:5557", None, "tcp://127.0.0.1:5557", True, None),
        ("tcp://*:5557", "tcp://*:5558", "tcp://10.1.2.3:5557", False, "tcp://10.1.2.3:5558"),
        ("ipc:///tmp/kv", None, "ipc:///tmp/kv", False, None),
        ("tcp://[::1]:5557", None, "tcp://[::1]:5557", False, None),
    ],
)
def test_source_for_vllm(vllm_endpoint, replay, want_endpoint, want_bind, want_replay) -> None:
    src = KVEventSource.for_vllm(
        vllm_endpoint, topic="t", backend_name="b", host="10.1.2.3", replay_endpoint=replay
    )
    assert (src.endpoint, src.bind, src.replay_endpoint) == (want_endpoint, want_bind, want_replay)


def test_source_for_vllm_wildcard_needs_host() -> None:
    with pytest.raises(ValueError, match="host"):
        KVEventSource.for_vllm("tcp://*:5557", backend_name="b")


@pytest.mark.parametrize(
    ("frames", "want"),
    [
        ([b"", b"kv", (7).to_bytes(8, "big"), b"payload"], (7, b"payload")),  # vLLM 0.32
        ([b"", b"", END, b""], (-1, b"")),
        ([b"", (7).to_bytes(8, "big"), b"payload"], (7, b"payload")),  # older / SGLang
        ([b"", END, b""], (-1, b"")),
    ],
)
def test_parse_replay_reply(frames: list[bytes], want: tuple[int, bytes]) -> None:
    assert parse_replay_reply(frames) == want


@pytest.mark.parametrize("frames", [[], [b""], [b"", b"\x01", b"x"], [b"", b"a", b"b", b"c", b"d"]])
def test_parse_replay_reply_rejects_garbage(frames: list[bytes]) -> None:
    with pytest.raises(ValueError):
        parse_replay_reply(frames)
