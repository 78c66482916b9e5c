"""A cheap streaming backend for benchmarks: raw asyncio protocol on uvloop.

Listens on ports FIRST..FIRST+N-1. A POST gets a chunked SSE stream of N_STREAM events:
every TICK seconds one event is written on every open stream, so the proxy in front relays
many small chunks while this process stays light. GET /metrics answers with the page read
from METRICS_FILE at once; anything else gets an empty 200.

    python benchmarks/paced_stream_backend.py FIRST N N_STREAM METRICS_FILE TICK
"""

from __future__ import annotations

import asyncio
import sys

import orjson
import uvloop

EVENT = (
    b"data: "
    + orjson.dumps(
        {
            "id": "c",
            "object": "text_completion",
            "created": 1,
            "model": "bench-model",
            "choices": [{"index": 0, "text": " tok", "finish_reason": None}],
        }
    )
    + b"\n\n"
)
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
DONE = b"data: [DONE]\n\n"
END = b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE)
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def reply(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


class Backend:
    def __init__(self, n_stream: int, metrics: bytes, tick: float) -> None:
        self.n_stream = n_stream
        self.metrics_reply = reply(metrics)
        self.ok_reply = reply(b"")
        self.tick = tick
        self.streams: dict[asyncio.Transport, int] = {}  # events left per open stream

    def on_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        for t, left in list(self.streams.items()):
            if left > 1:
                t.write(CHUNK)
                self.streams[t] = left - 1
            else:
                t.write(END)
                del self.streams[t]
        loop.call_later(self.tick, self.on_tick, loop)


class Conn(asyncio.Protocol):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.buf = b""
        self.t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.t is not None:
            self.backend.streams.pop(self.t, None)

    def data_received(self, data: bytes) -> None:
        assert self.t is not None
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            if head.startswith(b"post"):
                self.t.write(HEAD)
                self.backend.streams[self.t] = self.backend.n_stream
            elif b" /metrics " in head.split(b"\r\n", 1)[0] + b" ":
                self.t.write(self.backend.metrics_reply)
            else:
                self.t.write(self.backend.ok_reply)


async def main(first: int, n: int, n_stream: int, metrics_file: str, tick: float) -> None:
    with open(metrics_file, "rb") as f:
        backend = Backend(n_stream, f.read(), tick)
    loop = asyncio.get_running_loop()
    for port in range(first, first + n):
        await loop.create_server(lambda: Conn(backend), "127.0.0.1", port, backlog=1024)
    backend.on_tick(loop)
    await asyncio.Event().wait()


if __name__ == "__main__":
    a = sys.argv[1:]
    uvloop.run(main(int(a[0]), int(a[1]), int(a[2]), a[3], float(a[4])))
