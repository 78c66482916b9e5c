"""How long a concurrent stream stalls while something else happens in the proxy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from itertools import pairwise
from typing import TypeVar

import aiohttp

T = TypeVar("T")


async def gaps_around(
    url: str, event: Callable[[aiohttp.ClientSession], Awaitable[T]]
) -> tuple[float, float, T]:
    """Relay a steady stream from `url`; once 60 chunks have flowed, run `event`. Returns
    the stream's largest inter-chunk gap while `event` ran (up to the first chunk after
    it), the largest gap before it, and what `event` returned."""
    arrivals: list[float] = []
    started = asyncio.Event()
    window: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:

        async def stream() -> None:
            body = {"model": "fake-model", "prompt": "hi", "stream": True, "max_tokens": 500}
            async with s.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        arrivals.append(time.perf_counter())
                        if len(arrivals) == 60:
                            started.set()

        async def timed() -> T:
            await started.wait()
            window.append(time.perf_counter())
            out = await event(s)
            window.append(time.perf_counter())
            return out

        _, out = await asyncio.gather(stream(), timed())
    t0, t1 = window
    during = [b - a for a, b in pairwise(arrivals) if b >= t0 and a <= t1]
    before = [b - a for a, b in pairwise(arrivals[10:60])]
    assert during, "the stream ended before the event was over"
    return max(during), max(before), out
