"""Fuzz lbproxy with what clients may send: bodies, headers, request lines.

Seeded and deterministic: a few thousand cases by default, more with
LBPROXY_FUZZ_CASES=<n> (and LBPROXY_FUZZ_SEED=<n> for another sequence). Each case is
sent on its own raw connection to lbproxy in front of a small backend that records every
request it receives and answers only 200 or 400. For every case:

- lbproxy answers, and never with 5xx (the backend never does, so any 5xx is lbproxy's);
- a request id in an answer is 1-128 visible ASCII characters (never raw client bytes);
- a request the backend received is under /v1/ and carries exactly the client's body;
- nothing is logged at ERROR (aiohttp's "Error handling request" tracebacks);
and afterwards lbproxy still answers /health.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from lbproxy.config import parse_config
from lbproxy.proxy.aiohttp_compat import bound_port
from lbproxy.proxy.app import start_proxy

CASES = int(os.environ.get("LBPROXY_FUZZ_CASES", "5000"))
SEED = int(os.environ.get("LBPROXY_FUZZ_SEED", "1"))
CONCURRENCY = 8
_SAFE_ID = re.compile(rb"[\x21-\x7e]{1,128}")


@dataclass
class Recorded:
    method: str
    raw_path: str
    request_id: str | None
    body: bytes


@dataclass
class RecordingBackend:
    received: list[Recorded] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def _any(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.path in ("/health", "/metrics", "/v1/models") and request.method == "GET":
            if request.path == "/v1/models":
                return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})
            return web.Response(text="")
        self.received.append(
            Recorded(request.method, request.raw_path, request.headers.get("x-request-id"), body)
        )
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            return web.json_response({"error": {"message": "bad json"}}, status=400)
        return web.json_response({"id": "x", "object": "text_completion", "choices": []})

    async def start(self) -> RecordingBackend:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = bound_port(site, 0)
        return self


# ---- generators -------------------------------------------------------------------

_METHODS = ["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO", "post", "P0ST"]
_PATHS = [
    "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/x/../../metrics",
    "/v1/%2e%2e/health", "/v1/%2E%2E/%2e%2e/reset", "/v1/..%2fmetrics", "/v1/./completions",
    "//v1/completions", "/v1//completions", "/v1/completions?x=1&y=%00", "/v1/completions#f",
    "/%76%31/completions", "/v1%2fcompletions", "/admin/backends", "/metrics", "/",
    "http://evil.example/v1/completions", "http://127.0.0.1/v1/../metrics", "*",
    "/v1/completions/\xff", "/v1/" + "a" * 9000, "/v1/%zz", "/v1/%00", "v1/completions",
    "/v1/\udcff\udcfe", "/x/\udc80", "/v1/%ff%fe", "/v1/a b",
]  # fmt: skip
_VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "HTTP/1", "http/1.1",
             "HTTPS/1.1", "HTTP/1.1 extra", ""]  # fmt: skip


def _junk(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def _jsonish(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1.5, 10**30, -(10**40), 1e308, 2**63, 2**64 + 1])
    if kind == 2:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind in (3, 4):
        return rng.choice(["fake-model", "", "x", "\u0000", "fake-model\n"])
    if kind in (5, 6):
        return {rng.choice(["model", "messages", "prompt", "stream", "k"]): _jsonish(rng, depth + 1)
                for _ in range(rng.randrange(4))}  # fmt: skip
    return [_jsonish(rng, depth + 1) for _ in range(rng.randrange(4))]


def _body(rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return _junk(rng, rng.randrange(200))
    if kind == 1:  # deep nesting
        d = rng.choice([100, 1000, 100_000])
        return b'{"model": "fake-model", "prompt": ' + b"[" * d + b"]" * d + b"}"
    if kind == 2:  # huge numbers, as text orjson refuses or keeps
        n = rng.choice([b"1" * 5000, b"1e99999", b"-0.0e-99999", b"NaN", b"Infinity"])
        return b'{"model": "fake-model", "max_tokens": ' + n + b"}"
    if kind == 3:  # truncated
        full = orjson.dumps({"model": "fake-model", "prompt": "hello"})
        return full[: rng.randrange(len(full))]
    base: dict[str, object] = {"model": "fake-model"}
    for key in ("messages", "prompt", "stream", "model", "max_tokens"):
        if rng.random() < 0.5:
            base[key] = _jsonish(rng)
    body = json.dumps(base).encode() if rng.random() < 0.9 else b"[1]"  # big ints too
    return body if rng.random() < 0.8 else body + _junk(rng, 3)


def _header_case(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(8)
    if kind == 0:
        return [_junk(rng, rng.randrange(1, 20)) + b": " + _junk(rng, rng.randrange(30))]
    if kind == 1:
        return [b"x-fuzz: " + _junk(rng, rng.randrange(40)).replace(b"\r", b"").replace(b"\n", b"")]
    if kind == 2:
        return [b"x-long: " + b"a" * rng.choice([100, 8000, 8191, 9000, 70000])]
    if kind == 3:
        name = rng.choice([b"Content-Type", b"Authorization", b"x-request-id", b"Content-Length",
                           b"Transfer-Encoding", b"Host", b"x-session-id", b"Expect",
                           b"Content-Encoding", b"Connection", b"Cookie",
                           b"x-lbproxy-priority"])  # fmt: skip
        value = rng.choice([b"", b"0", b"-1", b"chunked", b"gzip", b"identity", b"close",
                            b"100-continue", b"Bearer x", b"\xff\xfe", b"99999999999999999999",
                            b"a, b", b"upgrade"])  # fmt: skip
        return [name + b": " + value] * rng.choice([1, 2])
    if kind == 4:
        return [b"x-many-%d: v" % i for i in range(rng.choice([10, 100, 200]))]
    if kind == 5:
        return [b"x-request-id: " + rng.choice([b"\x80\x81", b"a" * 200, b"ok-id", b" "])]
    if kind == 6:
        return [b"bad header line", b": no name", b"x-obs: a\r\n folded"][rng.randrange(3) :][:1]
    return []


@dataclass
class Case:
    raw: bytes
    body: bytes | None  # the body the backend must receive, when the request is forwarded
    request_id: str


def make_case(rng: random.Random, i: int) -> Case:
    request_id = f"fuzz-{i}"
    kind = rng.randrange(3)
    method, path, version = "POST", rng.choice(_PATHS[:3]), "HTTP/1.1"
    headers = [b"Host: 127.0.0.1", b"Connection: close", b"x-request-id: " + request_id.encode(),
               b"Content-Type: application/json"]  # fmt: skip
    body = orjson.dumps({"model": "fake-model", "prompt": "hi", "max_tokens": 1})
    framing = True
    if kind == 0:
        body = _body(rng)
    elif kind == 1:
        if rng.random() < 0.3:
            method, path = rng.choice(_METHODS[:3]), rng.choice(_PATHS)
        extra = _header_case(rng)
        if any(h.lower().startswith(b"x-request-id:") for h in extra) and rng.random() < 0.7:
            headers = [h for h in headers if not h.startswith(b"x-request-id:")]  # its only id
        headers += extra
        framing = not any(h.lower().startswith((b"content-length", b"transfer-encoding"))
                          for h in headers)  # fmt: skip
    else:
        method, path, version = rng.choice(_METHODS), rng.choice(_PATHS), rng.choice(_VERSIONS)
        if rng.random() < 0.2:
            body = _body(rng)
    if framing:
        headers.append(b"Content-Length: %d" % len(body))
    line = f"{method} {path} {version}".encode("utf-8", "surrogateescape")
    raw = line + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body
    return Case(raw, body if framing else None, request_id)


# ---- the run ------------------------------------------------------------------------


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _send(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        try:
            return await asyncio.wait_for(reader.read(), 20)  # Connection: close
        except (ConnectionResetError, BrokenPipeError):
            return b""
    finally:
        writer.close()


def _status(answer: bytes) -> int | None:
    """The final status of an answer (after any 100 Continue), None without one."""
    while answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
        answer = answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
    if not answer.startswith(b"HTTP/"):  # aiohttp echoes HTTP/0.9 and HTTP/2.0 as given
        return None
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


_HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def _run() -> None:
    backend = await RecordingBackend().start()
    cfg = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "pools": [{"name": "main", "models": ["fake-model"], "routing": "round-robin",
                   "backends": [{"url": f"http://127.0.0.1:{backend.port}", "name": "be0"}]}],
        "health": {"active": False},
        "limits": {"client_header_timeout": 3, "client_body_timeout": 3},
    }  # fmt: skip
    proxy = await start_proxy(parse_config(cfg, "fuzz"), seed=0)
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    rng = random.Random(SEED)
    cases = [make_case(rng, i) for i in range(CASES)]
    answers: list[bytes] = [b""] * len(cases)
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with sem:
            answers[i] = await _send(proxy.port, cases[i].raw)

    try:
        await asyncio.gather(*(one(i) for i in range(len(cases))))
        health = await _send(
            proxy.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    finally:
        logging.getLogger().removeHandler(errors)
        await proxy.close()
        assert backend.runner is not None
        await backend.runner.cleanup()

    assert _status(health) == 200, health[:200]
    problems = []
    for case, answer in zip(cases, answers, strict=True):
        status = _status(answer)
        if status is None:  # every case is answered: no hang, no silent close
            problems.append(f"no answer to {case.raw[:300]!r}: {answer[:300]!r}")
        elif status >= 500:
            problems.append(f"{status} for {case.raw[:300]!r}: {answer[:300]!r}")
        head = answer.partition(b"\r\n\r\n")[0].lower()
        for line in head.split(b"\r\n"):
            if line.startswith(b"x-request-id:") and not _SAFE_ID.fullmatch(line[13:].strip()):
                problems.append(f"unsafe request id echoed: {line[:200]!r}")
    by_id = {c.request_id: c for c in cases}
    for r in backend.received:
        if not r.raw_path.startswith("/v1/") or "/../" in r.raw_path or "%2e" in r.raw_path.lower():
            problems.append(f"backend got {r.method} {r.raw_path}")
        case = by_id.get(r.request_id or "")
        if case is not None and case.body is not None and r.body != case.body:
            problems.append(f"body changed for {case.raw[:200]!r}")
    for rec in errors.records:
        problems.append(
            f"ERROR logged: {rec.getMessage()[:200]} {rec.exc_info and rec.exc_info[1]!r}"
        )
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:30])
    assert backend.received, "nothing reached the backend: the fuzz proved nothing"


def test_fuzz_client_input() -> None:
    asyncio.run(_run())
