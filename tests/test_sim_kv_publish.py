"""KV events from the simulator over real ZMQ sockets, checked against a real vLLM 0.32
capture (tests/fixtures/vllm-0.32-kv-events.jsonl): frames, sequence numbers, replay and
the key sets and value types of the map events."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from lbproxy.signals.kv_events import decode_batch
from lbproxy.sim.hardware import load_profile
from lbproxy.sim.server import SimServerHandle, start_sim_server

MODEL = "granite-4.1-8b"
TOPIC = "kv-events-sim"
CAPTURE = Path(__file__).parent / "fixtures" / "vllm-0.32-kv-events.jsonl"


def capture_schema() -> dict[str, dict[str, set[str]]]:
    """Event type -> key -> python type names seen in the real capture."""
    schema: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for line in CAPTURE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        _ts, events, _rank = json.loads(line)["raw_msgpack"]
        for ev in events:
            for key, val in ev.items():
                schema[ev["type"]][key].add(type(val).__name__)
    return schema


SCHEMA = capture_schema()


def token_prompt(n: int, seed: int) -> list[int]:
    return [100 + (i * 7919 + seed * 104729) % 8000 for i in range(n)]


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def complete(http: aiohttp.ClientSession, h: SimServerHandle, prompt: Any, n: int) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": n}
    async with http.post(h.url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def recv_all(sub: zmq.asyncio.Socket, quiet: float = 0.3) -> list[list[bytes]]:
    """Messages until `quiet` seconds pass without one."""
    out = []
    while True:
        try:
            out.append(await asyncio.wait_for(sub.recv_multipart(), quiet))
        except TimeoutError:
            return out


async def attach(http: aiohttp.ClientSession, h: SimServerHandle, sub: zmq.asyncio.Socket) -> None:
    """Beat ZMQ's slow joiner: publish (warm-up requests) until the SUB hears something."""
    for i in range(20):
        await complete(http, h, token_prompt(40, seed=1000 + i), 1)
        try:
            await asyncio.wait_for(sub.recv_multipart(), 0.25)
            await recv_all(sub, 0.1)
            return
        except TimeoutError:
            continue
    raise AssertionError("no KV event reached the subscriber")


def check_like_capture(ev: dict[str, Any]) -> None:
    want = SCHEMA[ev["type"]]
    assert set(ev) == set(want), (ev["type"], set(ev) ^ set(want))
    for key, val in ev.items():
        assert type(val).__name__ in want[key], (ev["type"], key, val)


def check_frames(msgs: list[list[bytes]]) -> list[tuple[int, list[Any], bytes]]:
    out = []
    for frames in msgs:
        assert len(frames) == 3
        topic, seq, payload = frames
        assert topic == TOPIC.encode()
        assert len(seq) == 8
        batch = msgspec.msgpack.decode(payload)
        assert isinstance(batch, list) and len(batch) == 3
        ts, events, rank = batch
        assert isinstance(ts, float) and rank == 0 and isinstance(events, list) and events
        for ev in events:
            check_like_capture(ev)
        assert decode_batch(payload).events  # lbproxy's own decoder reads it too
        out.append((int.from_bytes(seq, "big"), events, payload))
    seqs = [s for s, _, _ in out]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # +1 per batch, no gaps
    return out


async def test_connecting_publisher_matches_capture_and_replays(
    zctx: zmq.asyncio.Context, http: aiohttp.ClientSession
) -> None:
    # As in the capture: the consumer binds a SUB, vLLM's PUB connects (no '*' in endpoint).
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    h = await start_sim_server(port=0, profile="vendor-b", model=MODEL, speed=100.0,
                               kv_events=f"tcp://127.0.0.1:{port}", kv_events_topic=TOPIC,
                               kv_events_replay="tcp://127.0.0.1:*")  # fmt: skip
    try:
        assert h.kv_events_endpoint == f"tcp://127.0.0.1:{port}"
        await attach(http, h, sub)
        prompt = token_prompt(100, seed=1)
        await complete(http, h, prompt, 40)  # 6 prompt blocks, then 2 filled by decoding
        msgs = check_frames(await recv_all(sub))

        stored = [ev for _, evs, _ in msgs for ev in evs if ev["type"] == "BlockStored"]
        first = next(ev for ev in stored if ev["token_ids"] == prompt[:96])
        assert first["parent_block_hash"] is None
        assert first["block_size"] == 16 and len(first["block_hashes"]) == 6
        assert first["extra_keys"] == [None] * 6 and first["medium"] == "GPU"
        decoded = [ev for ev in stored if ev["parent_block_hash"] == first["block_hashes"][-1]]
        assert len(decoded) == 1 and decoded[0]["token_ids"][:4] == prompt[96:]
        assert all(len(ev["token_ids"]) == 16 * len(ev["block_hashes"]) for ev in stored)

        # Replay from seq 0: [b"", seq, payload] per buffered batch, then [b"", -1, b""].
        dealer = zctx.socket(zmq.DEALER)
        dealer.connect(h.kv_events_replay_endpoint)
        await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed: dict[int, bytes] = {}
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
            assert len(frames) == 3 and frames[0] == b""
            seq = int.from_bytes(frames[1], "big", signed=True)
            if seq == -1:
                assert frames[2] == b""
                break
            replayed[seq] = frames[2]
        dealer.close(linger=0)
        assert sorted(replayed) == list(range(len(replayed)))  # from 0, consecutive
        for seq, _, payload in msgs:
            assert replayed[seq] == payload
    finally:
        await h.close()
        sub.close(linger=0)


async def test_binding_publisher_evictions_and_reset(
    zctx: zmq.asyncio.Context, http: aiohttp.ClientSession
) -> None:
    # A cache of 19 usable blocks: distinct prompts of 6 blocks evict each other.
    tiny = replace(load_profile("vendor-b"), num_gpu_blocks=20, max_model_len=256)
    h = await start_sim_server(port=0, profile=tiny, model=MODEL, speed=100.0,
                               kv_events="tcp://127.0.0.1:*", kv_events_topic=TOPIC)  # fmt: skip
    sub = zctx.socket(zmq.SUB)
    try:
        assert h.kv_events_endpoint is not None and not h.kv_events_endpoint.endswith("*")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(h.kv_events_endpoint)
        await attach(http, h, sub)
        for seed in range(5):
            await complete(http, h, token_prompt(100, seed), 2)
        async with http.post(h.url + "/reset_prefix_cache") as r:
            assert r.status == 200
        await complete(http, h, token_prompt(20, seed=99), 1)  # the next step flushes the reset
        msgs = check_frames(await recv_all(sub))
    finally:
        await h.close()
        sub.close(linger=0)
    kinds = [ev["type"] for _, evs, _ in msgs for ev in evs]
    assert "BlockRemoved" in kinds and "BlockStored" in kinds
    removed = [ev for _, evs, _ in msgs for ev in evs if ev["type"] == "BlockRemoved"]
    assert all(len(ev["block_hashes"]) == 1 for ev in removed)  # one hash per event, as vLLM
    assert {"type": "AllBlocksCleared"} in [ev for _, evs, _ in msgs for ev in evs]


async def test_bad_endpoint_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="kv events endpoint"):
        await start_sim_server(port=0, profile="vendor-b", model=MODEL, kv_events="bogus://x")
    with pytest.raises(ValueError, match="needs kv_events"):
        await start_sim_server(port=0, profile="vendor-b", model=MODEL,
                               kv_events_replay="tcp://127.0.0.1:*")  # fmt: skip
