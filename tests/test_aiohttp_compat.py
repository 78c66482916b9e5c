"""lbproxy/proxy/aiohttp_compat.py against the installed aiohttp: each wrapper does what
its caller relies on (over real sockets where that matters), and a missing internal
fails loudly, naming it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter

from lbproxy.proxy import aiohttp_compat as compat
from lbproxy.proxy.aiohttp_compat import (
    ConnectionHandler,
    HookedRequest,
    HookedRunner,
    HttpProcessingError,
    RequestHandler,
)

# --- The check --------------------------------------------------------------------------


def test_check_passes_on_the_installed_aiohttp() -> None:
    compat.check()


def test_pyproject_requires_the_tested_range() -> None:
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    deps = [d for d in pyproject["project"]["dependencies"] if d.startswith("aiohttp")]
    assert deps == ["aiohttp" + compat.TESTED_RANGE]


def test_check_names_a_missing_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(RequestHandler, "_handle_request")
    with pytest.raises(RuntimeError) as e:
        compat.check()
    assert "RequestHandler._handle_request" in str(e.value)
    assert aiohttp.__version__ in str(e.value)


def test_check_names_a_missing_writer_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(StreamWriter, "_write_chunked_payload")
    with pytest.raises(RuntimeError, match=r"StreamWriter\._write_chunked_payload"):
        compat.check()


def test_check_names_a_missing_instance_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    init = web.Server.__init__

    def without_kwargs(self: web.Server, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        del self._kwargs

    monkeypatch.setattr(web.Server, "__init__", without_kwargs)
    with pytest.raises(RuntimeError, match=r"Server\._kwargs"):
        compat.check()


def test_import_fails_loudly_when_an_internal_is_gone() -> None:
    code = "import aiohttp.web_protocol as m\ndel m._ErrInfo\nimport lbproxy.proxy.aiohttp_compat\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "ImportError: lbproxy needs an aiohttp internal" in r.stderr
    assert "_ErrInfo" in r.stderr


# --- Helpers ----------------------------------------------------------------------------


async def serve(runner: web.BaseRunner) -> tuple[web.TCPSite, int]:
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return site, compat.bound_port(site, 0)


@pytest.fixture
async def runners() -> AsyncIterator[list[web.BaseRunner]]:
    started: list[web.BaseRunner] = []
    yield started
    for r in started:
        await r.cleanup()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response with a Content-Length body: (status, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return int(lines[0].split()[1]), body


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


# --- Response bodies --------------------------------------------------------------------


async def test_write_now_frames_as_write_does(runners: list) -> None:
    """Pieces written from a callback: head with the first, chunked framing when chunked,
    a sized body clipped at its length; a closed client raises ConnectionResetError."""
    raised: list[BaseException] = []

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        compat.hold_head(resp)
        await resp.prepare(request)
        writer = compat.payload_writer(request)
        assert writer is not None
        assert request.transport is not None
        assert compat.chunk_sender(writer, request.transport) is None  # the head is not out
        compat.write_now(writer, b"data: 1\n\n")
        send = compat.chunk_sender(writer, request.transport)
        assert send is not None
        send(b"data: 2\n\n")
        await resp.write_eof()
        try:  # nothing after the end, this way either
            send(b"data: 3\n\n")
        except ConnectionResetError as e:
            raised.append(e)
        try:  # nothing after the end (a shutdown's cut ends a stream from outside)
            compat.write_now(writer, b"data: 3\n\n")
        except ConnectionResetError as e:
            raised.append(e)
        return resp

    async def sized(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 5
        await resp.prepare(request)
        writer = compat.payload_writer(request)
        assert writer is not None
        compat.write_now(writer, b"abc")
        assert request.transport is not None
        assert compat.chunk_sender(writer, request.transport) is None  # sized: write_now
        compat.write_now(writer, b"defgh")  # past the length: clipped
        compat.write_now(writer, b"ij")  # nothing left: dropped
        await resp.write_eof()
        return resp

    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        writer = compat.payload_writer(request)
        assert writer is not None and request.transport is not None
        request.transport.close()
        try:
            compat.write_now(writer, b"x")
        except ConnectionResetError as e:
            raised.append(e)
        return resp

    app = web.Application()
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/sized", sized)
    app.router.add_get("/cut", cut)
    runner = web.AppRunner(app)
    runners.append(runner)
    _, port = await serve(runner)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    assert raw.endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n")
    writer.write(b"GET /sized HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = await read_response(reader)
    assert (status, body) == (200, b"abcde")
    writer.write(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await closed_within(reader, 5)
    writer.close()
    assert len(raised) == 3


async def test_hold_head_sends_the_head_with_the_first_body_bytes(runners: list) -> None:
    async def held(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 2
        compat.hold_head(resp)
        await resp.prepare(request)
        await asyncio.sleep(0.5)
        writer = compat.payload_writer(request)
        assert writer is not None
        compat.write_now(writer, b"ok")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", held)
    runner = web.AppRunner(app)
    runners.append(runner)
    _, port = await serve(runner)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(TimeoutError):  # prepared, but nothing sent yet
        async with asyncio.timeout(0.2):
            await reader.read(1)
    assert await read_response(reader) == (200, b"ok")
    writer.close()


# --- Sites and routes -------------------------------------------------------------------


async def test_bound_port_is_the_port_a_site_on_port_0_got(runners: list) -> None:
    app = web.Application()

    async def here(request: web.Request) -> web.Response:
        return web.Response(text="here")

    app.router.add_get("/", here)
    runner = web.AppRunner(app)
    runners.append(runner)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    assert compat.bound_port(site, 1234) == 1234  # not started: no socket
    await site.start()
    port = compat.bound_port(site, 0)
    assert port != 0
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
        assert await r.text() == "here"


async def test_expect_handlers_and_100_continue(runners: list) -> None:
    seen: list[int] = []

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Expect", "").lower() != "100-continue":
            return web.json_response({"error": "expect"}, status=417)
        await compat.send_100_continue(request)
        writer = compat.payload_writer(request)
        assert writer is not None
        seen.append(writer.output_size)
        return None

    async def own_expect(request: web.Request) -> None:
        raise web.HTTPForbidden()

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_post("/", echo)
    app.router.add_post("/own", echo, expect_handler=own_expect)
    compat.replace_default_expect_handlers(app, expect)
    runner = web.AppRunner(app)
    runners.append(runner)
    _site, port = await serve(runner)

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"hello")
    assert await read_response(reader) == (200, b"hello")
    assert seen == [0]  # the interim answer is not the response started

    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: other\r\nContent-Length: 0\r\n\r\n")
    assert await read_response(reader) == (417, b'{"error": "expect"}')
    writer.write(
        b"POST /own HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n"
    )
    status, _ = await read_response(reader)
    assert status == 403  # a route's own expect handler is left alone
    writer.close()


# --- Requests ---------------------------------------------------------------------------


async def test_no_lingering_close_closes_at_once(runners: list) -> None:
    async def refuse(request: web.Request) -> web.Response:
        if request.path == "/quick":
            compat.no_lingering_close(request)
        resp = web.Response(status=413)
        resp.force_close()
        return resp

    app = web.Application()
    app.router.add_post("/{tail:.*}", refuse)
    runner = web.AppRunner(app)
    runners.append(runner)
    _site, port = await serve(runner)

    async def closes(path: str, seconds: float) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" % path)
        status, _ = await read_response(reader)
        assert status == 413
        try:
            return await closed_within(reader, seconds)
        finally:
            writer.close()

    assert not await closes(b"/linger", 1.0)  # control: aiohttp waits up to 10 s for the body
    assert await closes(b"/quick", 5.0)


class RecordingRequest(HookedRequest):
    ATTRS = HookedRequest.request_attrs("prepared", "reads")
    prepared: web.StreamResponse | None = None
    reads = 0

    def response_prepared(self, response: web.StreamResponse) -> None:
        self.prepared = response

    async def read_body(self) -> bytes:
        self.reads += 1
        return (await self.content.read()).upper()


async def test_hooked_request_reads_once_and_learns_its_response(runners: list) -> None:
    seen: list[Any] = []

    class Runner(HookedRunner):
        def make_request(self, message, payload, protocol, writer, task):  # type: ignore[no-untyped-def]
            return compat.new_request(
                self.app, message, payload, protocol, writer, task, RecordingRequest
            )

    async def handler(request: web.Request) -> web.StreamResponse:
        assert isinstance(request, RecordingRequest)
        body = await request.read() + await request.read()
        resp = web.StreamResponse()
        await resp.prepare(request)
        writer = compat.payload_writer(request)
        assert writer is not None
        seen.extend([request.reads, request.prepared is resp, compat.writer_ended(writer)])
        await resp.write(body)
        await resp.write_eof()
        seen.append(compat.writer_ended(writer))
        return resp

    app = web.Application()
    app.router.add_post("/", handler)
    runner = Runner(app)
    runners.append(runner)
    _site, port = await serve(runner)
    # Setting an attribute not in ATTRS warns, an error here (filterwarnings): a 500.
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{port}/", data=b"ab") as r:
        assert r.status == 200
        assert await r.read() == b"ABAB"
    assert seen == [1, True, False, True]


# --- Connections ------------------------------------------------------------------------


class RecordingHandler(ConnectionHandler):
    __slots__ = ("log",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.log: list[Any] = [("open", self.open_connections())]
        super().connection_made(transport)
        self.call_later(0.0, lambda: self.log.append(("later", self.has_request())))

    def data_received(self, data: bytes) -> None:
        before = (self.waiting_for_request(), self.requests_parsed())
        super().data_received(data)
        self.log.append(("data", *before, self.requests_parsed()))

    def request_started(self, request: web.BaseRequest) -> None:
        self.log.append(("started", request.path))

    def request_ended(self, request: web.BaseRequest) -> None:
        self.log.append(("ended", request.path))


async def start_recording(
    runners: list, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> tuple[list[RecordingHandler], int]:
    handlers: list[RecordingHandler] = []

    class Runner(HookedRunner):
        def connection_handler(self, server: web.Server, **kwargs: Any) -> RequestHandler:
            h = RecordingHandler(server, **kwargs)
            handlers.append(h)
            return h

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = Runner(app)
    runners.append(runner)
    _site, port = await serve(runner)
    return handlers, port


async def test_connection_handler_state_and_hooks(runners: list) -> None:
    async def ok(request: web.Request) -> web.Response:
        protocol = request.protocol
        assert isinstance(protocol, RecordingHandler)
        protocol.log.append(("handling", protocol.has_request()))
        return web.Response(text=request.path)

    handlers, port = await start_recording(runners, ok)
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for reader, writer in conns:
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await read_response(reader) == (200, b"/a")
    assert [h.log[0] for h in handlers] == [("open", 0), ("open", 1), ("open", 2)]
    log = handlers[0].log
    assert ("later", False) in log  # idle before its first request
    assert ("data", True, 0, 1) in log  # waiting, then one request parsed
    assert log.index(("started", "/a")) < log.index(("handling", True)) < log.index(("ended", "/a"))
    for _reader, writer in conns:
        writer.close()


async def test_parser_swap_and_parse_error_message(runners: list) -> None:
    """A parser swapped in for one read answers with a parse error (what lifecycle's
    _FirstFeed does with junk); a parser of the connection's settings holding one
    message at a time stops after each request."""
    results: list[Any] = []

    class Failing:
        def __init__(self, handler: ConnectionHandler) -> None:
            self.handler = handler
            self.parser = handler.parser()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.parser, name)

        def feed_data(self, data: bytes) -> Any:
            self.handler.set_parser(self.parser)
            one = self.handler.new_request_parser(max_msg_queue_size=1)
            two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
            first, _, _ = one.feed_data(two)
            one.message_consumed()
            second, _, _ = one.feed_data(b"")
            results.append((len(first), [m.path for m, _payload in first + second]))
            return [compat.parse_error_message(HttpProcessingError(message="bad"))], False, b""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    handlers, port = await start_recording(runners, ok)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(100):  # the handler exists once the connection is accepted
        if handlers:
            break
        await asyncio.sleep(0.05)
    handlers[0].set_parser(Failing(handlers[0]))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _ = await read_response(reader)
    assert status == 400
    assert results == [(1, ["/a", "/b"])]  # one request per feed
    writer.close()
