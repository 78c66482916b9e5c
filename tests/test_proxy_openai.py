"""The official openai client, sync and async, through lbproxy to fake vLLM backends."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import proxy_config

# Client-facing: the same answers from lbproxy's own server and from its ASGI face.
PROXY_FACES = ("native", "asgi")

MODEL = "fake-model"


@pytest.fixture
def base_url(fake_backends, run_proxy) -> str:
    backends = fake_backends(2)
    proxy = run_proxy(proxy_config(backends))
    return proxy.url + "/v1"


def test_sync_chat(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert r.choices[0].message.content == "t0 t1 t2"
    assert r.usage is not None and r.usage.completion_tokens == 3
    client.close()


def test_sync_chat_stream(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == "t0 t1 t2 t3 "
    client.close()


def test_sync_completions_stream_and_not(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=2)
    assert r.choices[0].text == "t0 t1"
    chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=5, stream=True))
    assert [c.choices[0].text for c in chunks] == [f"t{i} " for i in range(5)]
    client.close()


def test_sync_embeddings(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    r = client.embeddings.create(model=MODEL, input="hello")
    assert r.data[0].embedding == [0.25, -0.5, 1.0]
    client.close()


def test_async_client_all_routes(base_url: str) -> None:
    async def go() -> tuple[str, str, str, list[float]]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
        comp = await client.completions.create(model=MODEL, prompt="p", max_tokens=1)
        emb = await client.embeddings.create(model=MODEL, input=["a"])
        await client.close()
        return (
            chat.choices[0].message.content or "",
            streamed,
            comp.choices[0].text,
            (emb.data[0].embedding),
        )

    chat, streamed, comp, emb = asyncio.run(go())
    assert chat == "t0 t1"
    assert streamed == "t0 t1 t2 "
    assert comp == "t0"
    assert emb == [0.25, -0.5, 1.0]


def test_models_lists_union_without_duplicates(fake_backends, run_proxy) -> None:
    a, b = fake_backends(2)
    cfg = proxy_config([a])
    cfg["pools"].append({"name": "other", "models": ["m2", "m3"], "backends": [{"url": b.url}]})
    cfg["pools"].append({"name": "discovered", "backends": [{"url": b.url}]})  # fake-model again
    proxy = run_proxy(cfg)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    ids = [m.id for m in client.models.list()]
    assert sorted(ids) == ["fake-model", "m2", "m3"]
    client.close()
