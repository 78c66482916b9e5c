"""The test servers (tests/ops_helpers.RawServer, tests/fake_backend.FakeBackend) leave no
connection to the garbage collector, even one accepted in the loop turn in which they
close: with `asyncio.Server` (Python 3.11) that one got a half-built transport, reported
later as an unclosed transport in whichever test was running (a flaky failure in CI)."""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings

import pytest

from tests.fake_backend import FakeBackend
from tests.ops_helpers import RawServer


class Hello(RawServer):
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"hello")
        await reader.read()  # until the client leaves (or the server closes)


async def _close_while_accepting(turns: int, server: RawServer | FakeBackend) -> None:
    await server.start()
    client = socket.create_connection(("127.0.0.1", server.port))
    for _ in range(turns):  # one of these lands the close in the accept's loop turn
        await asyncio.sleep(0)
    await server.close()
    await asyncio.sleep(0.05)
    client.close()


@pytest.mark.parametrize("kind", ["raw", "fake_backend"])
def test_a_connection_accepted_as_the_server_closes_is_closed_not_collected(kind: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for turns in range(6):
            server = Hello() if kind == "raw" else FakeBackend("b")
            asyncio.run(_close_while_accepting(turns, server))
            gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


def test_a_connection_left_open_by_the_client_is_closed_with_the_server() -> None:
    async def run() -> bytes:
        server = await Hello().start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await reader.readexactly(5) == b"hello"
        await server.close()
        rest = await asyncio.wait_for(reader.read(), 5)  # EOF: the server closed it
        writer.close()
        return rest

    assert asyncio.run(run()) == b""
