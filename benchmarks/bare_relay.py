"""The floor of any Python proxy on uvloop: a TCP pipe that parses nothing.

Each client connection is paired, when it arrives, with a new connection to the next
backend (round-robin by connection), and bytes go each way as they come: one read and one
write per piece, with pause/resume when the other side's buffer is full. No HTTP parsing,
no routing, no headers: what is left is the event loop's wake-up and uvloop's read and
write paths, which every Python proxy pays per chunk. `dataplane_cost.py --bare` measures
it in turns with lbproxy (and nginx), so lbproxy's per-chunk cost can be set against the
least a Python relay costs on this machine at this moment.

    python benchmarks/bare_relay.py PORT BACKEND_PORT [BACKEND_PORT ...]
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import uvloop


class _Side(asyncio.Protocol):
    """One end of the pipe; `peer` is the other end, once both are connected."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # what came before the other end was connected
        self.connecting: asyncio.Task[None] | None = None  # the client side's, to the backend

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    # The other end cannot take more: stop reading this one until it can.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def serve(port: int, backends: list[int]) -> None:
    loop = asyncio.get_running_loop()
    nxt = itertools.cycle(backends)

    def client() -> _Side:
        down = _Side()

        async def connect() -> None:
            try:
                _, up = await loop.create_connection(_Side, "127.0.0.1", next(nxt))
            except OSError:
                if down.transport is not None:
                    down.transport.close()
                return
            if down.transport is None or down.transport.is_closing():
                up.transport.close()  # type: ignore[union-attr]  # the client left meanwhile
                return
            up.peer, down.peer = down, up
            if down.pending:
                up.transport.write(b"".join(down.pending))  # type: ignore[union-attr]
                down.pending.clear()

        down.connecting = loop.create_task(connect())
        return down

    server = await loop.create_server(client, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), [int(p) for p in sys.argv[2:]]))
