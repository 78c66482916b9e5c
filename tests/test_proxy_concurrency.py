"""Many long streams at once: all complete, every chunk in order, nothing mixed up."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from tests.conftest import proxy_config

# Client-facing: the same answers from lbproxy's own server and from its ASGI face.
PROXY_FACES = ("native", "asgi")

STREAMS = 200
CHUNKS = 200


async def _one(session: aiohttp.ClientSession, url: str, i: int) -> list[str]:
    body = {"model": "fake-model", "prompt": f"stream {i}", "max_tokens": CHUNKS, "stream": True}
    texts: list[str] = []
    async with session.post(url, json=body) as r:
        assert r.status == 200
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                data = ev.removeprefix(b"data: ")
                if data == b"[DONE]":
                    texts.append("[DONE]")
                else:
                    texts.append(orjson.loads(data)["choices"][0]["text"])
    return texts


def test_200_concurrent_streams_of_200_chunks(fake_backends, run_proxy) -> None:
    backends = fake_backends(4)
    proxy = run_proxy(proxy_config(backends))

    async def go() -> list[list[str]]:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=240),
        ) as s:
            return await asyncio.gather(
                *(_one(s, proxy.url + "/v1/completions", i) for i in range(STREAMS))
            )

    results = asyncio.run(go())
    expected = [f"t{i} " for i in range(CHUNKS)] + ["[DONE]"]
    assert len(results) == STREAMS
    for texts in results:
        assert texts == expected
    assert sum(len(b.received) for b in backends) == STREAMS
