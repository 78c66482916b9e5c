"""A cheap load generator for benchmarks: N keep-alive connections on uvloop, each posting
streaming completions back to back (a unique prompt each) and discarding the answer, like
wrk with a Lua body. Prints {"done": n, "failed": n, "seconds": s} as JSON at the end.

    python benchmarks/stream_load_client.py PORT CONNECTIONS SECONDS PROMPT_BYTES MODEL
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import uvloop


class Client(asyncio.Protocol):
    """One connection: send a request, read its answer (chunked or sized), repeat."""

    def __init__(self, port: int, prompt_bytes: int, model: str, end: float) -> None:
        self.port, self.prompt_bytes, self.model, self.end = port, prompt_bytes, model, end
        self.done = self.failed = 0
        self.buf = b""
        self.t: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def request(self) -> bytes:
        prompt = os.urandom(self.prompt_bytes // 2).hex()
        body = json.dumps(
            {"model": self.model, "prompt": prompt, "max_tokens": 16, "stream": True}
        ).encode()
        return (
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (self.port, len(body), body)
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        assert self.t is not None
        if time.monotonic() >= self.end:
            self.t.close()
            return
        self.head: bytes | None = None
        self.t.write(self.request())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.head is None:
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    return
                self.head, self.buf = self.buf[:i].lower(), self.buf[i + 4 :]
                self.length = -1
                for line in self.head.split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        self.length = int(line[15:])
            if self.length >= 0:  # a sized answer (an error)
                if len(self.buf) < self.length:
                    return
                self.buf = self.buf[self.length :]
            else:
                i = self.buf.find(b"\r\n0\r\n\r\n")
                if i < 0:
                    self.buf = self.buf[-8:]  # only the end marker matters
                    return
                self.buf = self.buf[i + 7 :]
            ok = self.head.startswith(b"http/1.1 200")
            self.done += ok
            self.failed += not ok
            self.send()
            if self.t is None or self.t.is_closing():
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def main(port: int, connections: int, seconds: float, prompt_bytes: int, model: str) -> None:
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    end = t0 + seconds
    clients = []
    for _ in range(connections):
        _, c = await loop.create_connection(
            lambda: Client(port, prompt_bytes, model, end), "127.0.0.1", port
        )
        clients.append(c)
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), seconds + 30)
    out = {
        "done": sum(c.done for c in clients),
        "failed": sum(c.failed for c in clients),
        "seconds": time.monotonic() - t0,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    uvloop.run(main(int(a[0]), int(a[1]), float(a[2]), int(a[3]), a[4]))
