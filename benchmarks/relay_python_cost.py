"""lbproxy's own Python cost per relayed stream chunk, without the sockets.

Drives the streaming relay in-process: the upstream protocol (`UpstreamConnection`, its
httptools parser, `UpstreamResponse`), the body relay (`forward._BodyRelay`) and the native
server's client sink (`NativeSink`, which frames each piece as an HTTP/1.1 chunk), with the
client transport replaced by one that only counts the bytes written. One SSE event of a
vLLM-sized completion chunk per upstream read, as on a stream paced by the backend. What
is left out is everything between the sockets and these callbacks: the event loop's wakeup,
uvloop's read and write paths, and the kernel; `dataplane_cost.py` measures the whole, this
the part lbproxy's Python code could shave. Baseline, in turns in the same run: a bare relay
(the same httptools parser, one callback that writes each body piece on as a chunk).

    python benchmarks/relay_python_cost.py --repeat 5 \
        --out benchmarks/results/dataplane/relay-python.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httptools

from lbproxy.proxy.forward import _BodyRelay
from lbproxy.proxy.native_server import NativeSink
from lbproxy.proxy.upstream import UpstreamClient, UpstreamConnection, UpstreamResponse
from lbproxy.routing.state import Endpoint

EVENT = (
    b'data: {"id":"cmpl-0","object":"text_completion","created":1765000000,"model":"m",'
    b'"choices":[{"index":0,"text":" token","logprobs":null,"finish_reason":null,'
    b'"stop_reason":null}]}\n\n'
)
HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


class CountingTransport:
    """A client transport that takes every write at once and keeps only its size."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16384, 65536)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


class _NoProgress:
    def first_byte(self, ep: Endpoint, t_sent: float, t: float) -> None:
        pass


async def relay(chunks: int) -> tuple[float, int]:
    """Seconds to relay `chunks` upstream reads of one chunk each, and the bytes written."""
    client = UpstreamClient()
    conn = UpstreamConnection(client, ("127.0.0.1", 1, False))
    conn.connection_made(CountingTransport())  # type: ignore[arg-type]
    resp = UpstreamResponse(conn, first_byte=600.0, idle=300.0)
    conn.resp = resp
    conn.data_received(HEAD)
    out = CountingTransport()
    sink = NativeSink(None, out, 200, chunked=True, sse=True)  # type: ignore[arg-type]
    body = _BodyRelay(_NoProgress(), Endpoint("b", "http://127.0.0.1:1"), 0.0, time.monotonic)  # type: ignore[arg-type]
    body.start(resp, sink, out)
    piece = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
    t0 = time.perf_counter()
    for _ in range(chunks):
        conn.data_received(piece)
    elapsed = time.perf_counter() - t0
    conn.disarm()
    return elapsed, out.written


class _Bare:
    """The least a Python relay can do per chunk: parse it (httptools, as lbproxy does) and
    write its body on as one client chunk, from one callback and no bookkeeping."""

    def __init__(self, out: CountingTransport) -> None:
        self.write = out.write
        self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self.write(b"%x\r\n%b\r\n" % (len(body), body))


def bare(chunks: int) -> tuple[float, int]:
    out = CountingTransport()
    b = _Bare(out)
    feed = b.parser.feed_data
    feed(HEAD)
    piece = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
    t0 = time.perf_counter()
    for _ in range(chunks):
        feed(piece)
    return time.perf_counter() - t0, out.written


def run(chunks: int, repeat: int) -> dict[str, Any]:
    """Repeats in turns, lbproxy's relay then the bare one; per repeat, their ratio."""
    ours, base, ratios = [], [], []
    written = 0
    for _ in range(repeat):
        elapsed, written = asyncio.run(relay(chunks))
        b_elapsed, b_written = bare(chunks)
        assert b_written == written, (b_written, written)  # the same bytes out
        ours.append(elapsed / chunks * 1e6)
        base.append(b_elapsed / chunks * 1e6)
        ratios.append(elapsed / b_elapsed)
    return {
        "chunks": chunks,
        "event_bytes": len(EVENT),
        "bytes_written": written,
        "us_per_chunk": [round(x, 3) for x in ours],
        "us_per_chunk_median": round(statistics.median(ours), 3),
        "bare_us_per_chunk": [round(x, 3) for x in base],
        "bare_us_per_chunk_median": round(statistics.median(base), 3),
        "ratio_median": round(statistics.median(ratios), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()
    result = run(args.chunks, args.repeat)
    print(
        f"lbproxy's relay {result['us_per_chunk_median']:.2f} us per chunk, a bare relay "
        f"{result['bare_us_per_chunk_median']:.2f} us: {result['ratio_median']:.2f}x "
        f"(median of {args.repeat} repeats in turns)"
    )
    if args.out:
        result["command"] = (
            f"python benchmarks/relay_python_cost.py --chunks {args.chunks} --repeat "
            f"{args.repeat} --out {args.out}"
        )
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
