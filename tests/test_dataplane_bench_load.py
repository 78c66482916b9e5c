"""benchmarks/dataplane_cost.py's load: unique prompts that share no first block, and --rate.

The unique7k case's figures depend on the generator not being the bottleneck and on every
prompt being new to lbproxy's prefix index; --rate must actually pace the requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.fake_backend import FakeBackend
from tests.replicas_support import free_port

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def dc() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("dataplane_cost")
    finally:
        sys.path.remove(str(BENCH))


UNIT = 64  # prefix-hash's first block: 16 tokens x 4 bytes


def test_unique_prompts_are_full_length_and_share_no_first_block(dc: ModuleType) -> None:
    gen = dc.UniquePrompts(28_000, random.Random(1))
    prompts = [gen() for _ in range(2000)]
    assert {len(p) for p in prompts} == {28_000}
    assert len({p[:UNIT] for p in prompts}) == len(prompts)
    # The body is the case's JSON, carrying the prompt unchanged.
    case = next(c for c in dc.CASES if c.name == "unique7k")
    raw = dc.request_bytes(case, 1, random.Random(2), dc.UniquePrompts(28_000, random.Random(3)))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert len(json.loads(body)["prompt"]) == 28_000


def test_unique_prompts_are_slices_of_one_corpus_built_once(dc: ModuleType) -> None:
    # The old generator drew each prompt word by word (~3 ms a request) and capped the case
    # at ~250/s (BENCHMARKS.md, "The unique 7,000-token prompt"). This one slices a corpus
    # built once per process: checked by structure here, its speed is in BENCHMARKS.md.
    a, b = dc.UniquePrompts(28_000, random.Random(1)), dc.UniquePrompts(5_000, random.Random(2))
    assert a.corpus is b.corpus  # one corpus, not one per generator
    for gen in (a, b):
        for serial in (1, 2, 3):
            text = gen()
            head = f"{serial} "
            assert text.startswith(head)
            assert text[len(head) :] in gen.corpus
    case = next(c for c in dc.CASES if c.name == "unique7k")
    run = dc.LoadRun(case, 400, 60)
    reqs = [run.next_request(1) for _ in range(400)]
    assert len({hashlib.sha256(r).digest() for r in reqs}) == 400


def test_rate_paces_the_requests_of_a_real_load(
    dc: ModuleType, fake_backends: Callable[..., list[FakeBackend]]
) -> None:
    (backend,) = fake_backends(1)
    case = next(c for c in dc.CASES if c.name == "small" and c.profile == "cache-aware")
    # 21 requests at 20/s over 4 connections: the last one's slot is 1 s after the first.
    t0 = time.perf_counter()
    r = asyncio.run(dc.load(case, [backend.port], 21, 4, 30.0, rate=20.0))
    elapsed = time.perf_counter() - t0
    assert r["done"] == 21 and r["failed"] == 0
    assert len(backend.received) == 21
    assert elapsed >= 1.0  # never early (an unpaced run takes a few ms)
    assert elapsed < 6.0  # and not stuck (margin for a busy machine)


def _exchange(port: int, raw: bytes) -> bytes:
    """Send one request on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_the_bare_relay_baseline_passes_bytes_both_ways_unchanged(
    dc: ModuleType, fake_backends: Callable[..., list[FakeBackend]]
) -> None:
    # dataplane_cost.py --bare sets lbproxy's per-chunk CPU against this pipe: it must relay
    # whole answers (a stream included), or its lower cost would mean nothing.
    (backend,) = fake_backends(1, chunk_delay=0.002)
    port = free_port()
    pipe = subprocess.Popen(
        [sys.executable, str(BENCH / "bare_relay.py"), str(port), str(backend.port)]
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "bare_relay.py did not start listening"
                time.sleep(0.05)
        body = b'{"model": "fake-model", "prompt": "hi", "max_tokens": 20, "stream": true}'
        raw = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )

        def without_date(answer: bytes) -> bytes:
            return b"\r\n".join(
                x for x in answer.split(b"\r\n") if not x.lower().startswith(b"date:")
            )

        direct, piped = _exchange(backend.port, raw), _exchange(port, raw)
        assert direct.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in direct
        assert without_date(piped) == without_date(direct)
        # And the benchmark's own load (keep-alive, a stream per request) runs through it.
        case = next(c for c in dc.CASES if c.name == "stream8")
        r = asyncio.run(dc.load(case, [port], 12, 3, 30.0))
        assert r["done"] == 12 and r["failed"] == 0
        assert len(backend.received) == 2 + 12
    finally:
        pipe.terminate()
        pipe.wait(10)
