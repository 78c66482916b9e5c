"""The simulator's KV-event publisher: vLLM's ZmqEventPublisher wire protocol."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from lbproxy.aio import cancel_and_wait

__all__ = ["KVEventPublisher"]

log = logging.getLogger(__name__)


def bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: a wildcard tcp endpoint (and ipc/inproc) is bound, any other connected."""
    return any(s in endpoint for s in ("*", "::", "0.0.0.0")) or endpoint.startswith(
        ("ipc://", "inproc://")
    )


def on_host(endpoint: str, host: str) -> str:
    """A wildcard-host tcp endpoint (`tcp://*:5557`) bound on `host` instead, the address
    the HTTP server listens on: a simulator on 127.0.0.1 must not publish on every
    interface. Wildcard listeners (0.0.0.0, ::, "") keep the wildcard."""
    if host in ("", "0.0.0.0", "::") or not endpoint.startswith("tcp://*:"):
        return endpoint
    url_host = f"[{host}]" if ":" in host else host
    return f"tcp://{url_host}:{endpoint.removeprefix('tcp://*:')}"


class KVEventPublisher:
    """vLLM's ZmqEventPublisher: PUB frames (topic, 8-byte big-endian seq, msgpack batch).

    Binds when the endpoint holds `*`, `::` or `0.0.0.0` (or is ipc/inproc), else connects,
    as vLLM does. The optional replay ROUTER answers `[b"", start_seq]` with one
    `[b"", seq, payload]` per buffered batch from start_seq on, then `[b"", -1, b""]`.
    `publish` never blocks: a PUB drops at its high-water mark.
    """

    END_SEQ = (-1).to_bytes(8, "big", signed=True)

    def __init__(
        self,
        endpoint: str,
        topic: str = "kv-events",
        replay_endpoint: str | None = None,
        *,
        buffer_steps: int = 1000,
        hwm: int = 100_000,
        dp_rank: int = 0,
        bind: bool | None = None,
    ) -> None:
        from lbproxy.signals import kv_events  # the wire format lives with its decoder

        self._wire = kv_events
        self.topic = topic
        self._topic = topic.encode()
        self._seq = 0
        self._dp_rank = dp_rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._pub = zmq.Context.instance().socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if "[" in endpoint:  # an IPv6 address
            self._pub.setsockopt(zmq.IPV6, 1)
        binds = bind_endpoint(endpoint) if bind is None else bind
        try:
            if binds:
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
        except zmq.ZMQError as exc:
            self._pub.close()
            raise ValueError(f"kv events endpoint {endpoint!r}: {exc}") from exc
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT) if binds else endpoint
        self.replay_endpoint: str | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        if replay_endpoint:
            router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            if "[" in replay_endpoint:
                router.setsockopt(zmq.IPV6, 1)
            try:
                router.bind(replay_endpoint)
            except zmq.ZMQError as exc:
                router.close()
                self._pub.close()
                raise ValueError(f"kv events replay endpoint {replay_endpoint!r}: {exc}") from exc
            self._router = router
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: Sequence[Any], ts: float | None = None) -> None:
        """Send one batch (engine events: BlockStored / BlockRemoved / AllBlocksCleared)."""
        wire = self._wire
        converted: list[Any] = []
        for ev in events:
            kind = type(ev).__name__
            if kind == "BlockStored":
                converted.append(
                    wire.vllm_block_stored(
                        ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size
                    )
                )
            elif kind == "BlockRemoved":
                # vLLM 0.32 sends one BlockRemoved per evicted block.
                converted.extend(wire.vllm_block_removed([h]) for h in ev.block_hashes)
            elif kind == "AllBlocksCleared":
                converted.append(wire.AllBlocksCleared())
        payload = wire.encode_batch(time.time() if ts is None else ts, converted, self._dp_rank)
        seq = self._seq
        self._seq = seq + 1
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), zmq.NOBLOCK)
        self._buffer.append((seq, payload))

    async def _serve_replay(self) -> None:
        router = self._router
        assert router is not None
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3:
                log.warning("invalid KV-event replay request: %d frames", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await router.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            await router.send_multipart((client, b"", self.END_SEQ, b""))

    async def close(self) -> None:
        await cancel_and_wait(self._replay_task)
        if self._router is not None:
            self._router.close()
        self._pub.close()
