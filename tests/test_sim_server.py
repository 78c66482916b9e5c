"""The simulated vLLM server over real HTTP: shapes copied from a captured vLLM 0.32, the
official openai client (sync and async, stream and not), /metrics, prefix caching and
aborts on client disconnect."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.sim.server import SimServerHandle, start_sim_server
from lbproxy.tokenization.tokenizer import default_tokenizer

MODEL = "granite-4.1-8b"
SPEED = 100.0  # engine seconds per wall second: keeps the tests quick

# Key sets of a real vLLM 0.32 response (shared/reference/vllm-0.32-api-responses.json).
COMPLETION_KEYS = {"id", "object", "created", "model", "choices", "service_tier",
                   "system_fingerprint", "usage", "kv_transfer_params", "ec_transfer_params",
                   "metrics"}  # fmt: skip
COMPLETION_CHOICE_KEYS = {"index", "text", "logprobs", "finish_reason", "stop_reason",
                          "token_ids", "prompt_logprobs", "prompt_token_ids",
                          "routed_experts"}  # fmt: skip
USAGE_KEYS = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
              "completion_tokens_details"}  # fmt: skip
CHAT_KEYS = {"id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
             "usage", "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
             "ec_transfer_params", "metrics"}  # fmt: skip
CHAT_CHOICE_KEYS = {"index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids",
                    "routed_experts"}  # fmt: skip
MESSAGE_KEYS = {"role", "content", "refusal", "annotations", "audio", "function_call",
                "reasoning"}  # fmt: skip
COMPLETION_CHUNK_CHOICE_KEYS = {"index", "text", "logprobs", "finish_reason", "stop_reason",
                                "prompt_token_ids", "token_ids"}  # fmt: skip
CHAT_FIRST_CHUNK_KEYS = {"id", "object", "created", "model", "choices", "prompt_token_ids",
                         "prompt_text"}  # fmt: skip
USAGE_CHUNK_KEYS = {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0]  # fmt: skip
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
async def sim() -> AsyncIterator[SimServerHandle]:
    h = await start_sim_server(host="127.0.0.1", port=0, profile="vendor-b", model=MODEL,
                               speed=SPEED)  # fmt: skip
    yield h
    await h.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def sim_thread(loop_thread: Any) -> Iterator[SimServerHandle]:
    """A server in the background loop, for the synchronous openai client."""
    h = loop_thread.run(start_sim_server(port=0, profile="vendor-b", model=MODEL, speed=SPEED))
    yield h
    loop_thread.run(h.close())


def sse_events(raw: bytes) -> list[Any]:
    """Split an SSE body, checking vLLM's exact framing: `data: <json>\\n\\n` ... `[DONE]`."""
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") for e in events), events[:3]
    assert events[-1] == b"data: [DONE]"
    return [orjson.loads(e[6:]) for e in events[:-1]]


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, bytes]:
    async with http.post(url, json=body) as r:
        return r.status, await r.read()


async def metrics(http: aiohttp.ClientSession, h: SimServerHandle) -> dict[str, Any]:
    async with http.get(h.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, sample: str | None = None, **labels: str) -> float:
    for s in families[name].samples:
        if (sample is None or s.name == sample) and all(
            s.labels.get(k) == v for k, v in labels.items()
        ):
            return s.value
    raise KeyError((name, sample, labels))


def token_prompt(n: int, seed: int = 0) -> list[int]:
    """n token ids from the ordinary part of the vocabulary (exact prompt lengths)."""
    return [100 + (i * 7919 + seed * 104729) % 8000 for i in range(n)]


# --------------------------------------------------------------------------- basics
async def test_health_and_models(sim: SimServerHandle, http: aiohttp.ClientSession) -> None:
    async with http.get(sim.url + "/health") as r:
        assert r.status == 200
        assert await r.read() == b""
    async with http.get(sim.url + "/v1/models") as r:
        body = await r.json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == MODEL and card["root"] == MODEL and card["parent"] is None
    assert card["owned_by"] == "vllm" and card["object"] == "model"
    assert card["max_model_len"] == 32768
    assert card["permission"][0]["object"] == "model_permission"


def test_sync_openai_completion(sim_thread: SimServerHandle) -> None:
    with openai.OpenAI(base_url=sim_thread.url + "/v1", api_key="x", max_retries=0) as client:
        resp = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16)
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=3)
    assert re.fullmatch(r"cmpl-[0-9a-f]{16}", resp.id)
    assert resp.object == "text_completion" and resp.model == MODEL
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 16
    assert resp.usage.prompt_tokens == len(default_tokenizer().encode("The quick brown fox"))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 16
    body = orjson.loads(raw.content)
    assert set(body) == COMPLETION_KEYS
    assert set(body["choices"][0]) == COMPLETION_CHOICE_KEYS
    assert set(body["usage"]) == USAGE_KEYS
    assert body["system_fingerprint"].startswith("vllm-0.32.0-")
    assert body["usage"]["prompt_tokens_details"] is None  # nothing cached yet


def test_sync_openai_chat_stream(sim_thread: SimServerHandle) -> None:
    with openai.OpenAI(base_url=sim_thread.url + "/v1", api_key="x", max_retries=0) as client:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hello"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 1 <= len(content) <= 12
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


async def test_async_openai_chat_and_completion_stream(sim: SimServerHandle) -> None:
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    try:
        chat = await client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            max_completion_tokens=9,
        )
        assert re.fullmatch(r"chatcmpl-[0-9a-f]{16}", chat.id)
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage is not None and chat.usage.completion_tokens == 9
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        assert chat.usage.prompt_tokens == len(default_tokenizer().encode_chat(messages))

        stream = await client.completions.create(
            model=MODEL, prompt="Once", max_tokens=7, stream=True
        )
        texts = [c.choices[0].text async for c in stream]
        assert 1 <= len(texts) <= 7
    finally:
        await client.close()


async def test_raw_shapes_and_sse_framing(
    sim: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    async with http.post(sim.url + "/v1/chat/completions",
                         json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                               "max_tokens": 5}) as r:  # fmt: skip
        assert r.headers["Content-Type"].startswith("application/json")
        body = await r.json()
    assert set(body) == CHAT_KEYS
    assert set(body["choices"][0]) == CHAT_CHOICE_KEYS
    assert set(body["choices"][0]["message"]) == MESSAGE_KEYS
    assert body["object"] == "chat.completion"

    async with http.post(sim.url + "/v1/completions",
                         json={"model": MODEL, "prompt": "x", "max_tokens": 6, "stream": True,
                               "stream_options": {"include_usage": True}}) as r:  # fmt: skip
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await r.read())
    tokens, usage = events[:-1], events[-1]
    assert all(set(e["choices"][0]) == COMPLETION_CHUNK_CHOICE_KEYS for e in tokens)
    assert [e["choices"][0]["finish_reason"] for e in tokens][-1] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in tokens[:-1])
    assert set(usage) == USAGE_CHUNK_KEYS and usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 2, "total_tokens": 8, "completion_tokens": 6}

    async with http.post(sim.url + "/v1/chat/completions",
                         json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                               "max_tokens": 4, "stream": True}) as r:  # fmt: skip
        events = sse_events(await r.read())
    assert set(events[0]) == CHAT_FIRST_CHUNK_KEYS
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e for e in events)  # no include_usage, no usage chunk


async def test_stream_interval_groups_tokens(http: aiohttp.ClientSession) -> None:
    h = await start_sim_server(port=0, profile="vendor-b", model=MODEL, speed=0.5,
                               stream_interval=4)  # fmt: skip
    try:
        _, raw = await post(http, h.url + "/v1/completions",
                            {"prompt": "x", "max_tokens": 64, "stream": True})  # fmt: skip
        events = sse_events(raw)
    finally:
        await h.close()
    # First token alone, then >= 4 tokens per chunk: at most 1 + ceil(63 / 4) chunks. At
    # speed 0.5 the 64 steps take ~1 s of wall time, so even a busy machine's event loop
    # does not find them all done at once (at speed 5, 16 steps did: one chunk).
    assert 2 <= len(events) <= 17


CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


@pytest.mark.parametrize(
    ("route", "body", "details"),
    [
        ("/v1/completions", {"prompt": token_prompt(30)}, False),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x y z"}]}, True),
    ],
)
async def test_continuous_usage_stats_in_every_chunk(
    http: aiohttp.ClientSession, route: str, body: dict[str, Any], details: bool
) -> None:
    """vLLM's `continuous_usage_stats`: every chunk carries the usage so far, right after
    `choices` (chat adds a null completion_tokens_details; its role chunk counts 0), then
    the usual final usage chunk. Also with several tokens per chunk."""
    # Slow steps (~25 ms): a first chunk holds one token only if the handler keeps up with
    # the engine; on a busy machine a few-ms step lets tokens pile up (as in vLLM).
    h = await start_sim_server(port=0, profile="vendor-b", model=MODEL, speed=0.25,
                               stream_interval=3)  # fmt: skip
    try:
        req = {"model": MODEL, "max_tokens": 14, "stream": True, "stream_options": CONTINUOUS}
        async with http.post(h.url + route, json={**req, **body}) as r:
            raw = await r.read()
        _, plain = await post(http, h.url + route, {**req, **body, "stream_options": {
            "continuous_usage_stats": True}})  # fmt: skip
    finally:
        await h.close()
    events = sse_events(raw)
    chunks, final = events[:-1], events[-1]
    assert final["choices"] == [] and set(final) == USAGE_CHUNK_KEYS
    prompt = final["usage"]["prompt_tokens"]
    assert final["usage"]["completion_tokens"] == 14
    counts = []
    for e in chunks:
        assert list(e)[list(e).index("choices") + 1] == "usage"  # vLLM's field order
        u = e["usage"]
        want = ["prompt_tokens", "total_tokens", "completion_tokens"]
        assert list(u) == want + (["completion_tokens_details"] if details else [])
        assert u["prompt_tokens"] == prompt
        assert u["total_tokens"] == prompt + u["completion_tokens"]
        counts.append(u["completion_tokens"])
    if details:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert counts[0] == 0 and chunks[1]["usage"]["completion_tokens_details"] is None
        counts = counts[1:]
    # Cumulative, first token alone, >= 3 new tokens per later chunk, the last one all 14.
    assert counts[0] == 1 and counts[-1] == 14
    assert all(b - a >= 3 for a, b in itertools.pairwise(counts[:-1]))
    assert len(counts) <= 1 + math.ceil(13 / 3)
    # Without include_usage, continuous_usage_stats alone adds nothing (vLLM's rule).
    assert all("usage" not in e for e in sse_events(plain))


async def test_request_id_header_is_used(sim: SimServerHandle, http: aiohttp.ClientSession) -> None:
    async with http.post(sim.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                         headers={"X-Request-Id": "abc123"}) as r:  # fmt: skip
        body = await r.json()
        assert r.headers["X-Request-Id"] == "abc123"
    assert body["id"] == "cmpl-abc123"


# --------------------------------------------------------------------------- lengths
async def test_without_max_tokens_a_simulated_eos_stops(
    sim: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    lengths = []
    for _ in range(2):
        _, raw = await post(http, sim.url + "/v1/completions", {"prompt": "Tell me a story"})
        body = orjson.loads(raw)
        assert body["choices"][0]["finish_reason"] == "stop"
        lengths.append(body["usage"]["completion_tokens"])
    assert lengths[0] == lengths[1]  # derived from the request: deterministic
    assert 16 <= lengths[0] <= 256
    _, raw = await post(http, sim.url + "/v1/completions",
                        {"prompt": "Tell me a story", "max_tokens": 20, "ignore_eos": True,
                         "min_tokens": 20})  # fmt: skip
    body = orjson.loads(raw)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 20


async def test_simulated_eos_is_capped_by_max_model_len(http: aiohttp.ClientSession) -> None:
    from dataclasses import replace

    from lbproxy.sim.hardware import load_profile

    small = replace(load_profile("vendor-b"), max_model_len=40)
    h = await start_sim_server(port=0, profile=small, model=MODEL, speed=SPEED)
    try:
        _, raw = await post(http, h.url + "/v1/completions", {"prompt": token_prompt(30)})
    finally:
        await h.close()
    body = orjson.loads(raw)
    assert body["usage"]["completion_tokens"] == 10
    assert body["choices"][0]["finish_reason"] == "length"


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("path", "body", "status", "err_type", "message"),
    [
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "NotFoundError",
         "The model `nope` does not exist."),
        ("/v1/completions", {"prompt": token_prompt(32768)}, 400, "BadRequestError",
         "maximum context length is 32768 tokens. However, your request has 32768 input"),
        ("/v1/completions", {"prompt": token_prompt(32000), "max_tokens": 1000}, 400,
         "BadRequestError", "'max_tokens' or 'max_completion_tokens' is too large: 1000"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "BadRequestError",
         "max_tokens must be at least 1"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "BadRequestError", "n > 1"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "BadRequestError", "batched prompts"),
        ("/v1/completions", {"prompt": [1, 999999]}, 400, "BadRequestError", "out of vocabulary"),
        ("/v1/completions", {"prompt": ""}, 200, None, None),  # BOS alone is a prompt
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
         "BadRequestError", "Stream options can only be defined when `stream=True`."),
        ("/v1/chat/completions", {"messages": []}, 400, "BadRequestError", "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
         "BadRequestError", "Unknown role: wizard"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "min_tokens": 5, "max_tokens": 2}, 400, "BadRequestError",
         "min_tokens must be less than or equal to max_tokens=2"),
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "NotFoundError", "does not exist"),
    ],
)  # fmt: skip
async def test_errors_are_vllm_shaped(
    sim: SimServerHandle, http: aiohttp.ClientSession, path: str, body: Any, status: int,
    err_type: str | None, message: str | None,
) -> None:  # fmt: skip
    got, raw = await post(http, sim.url + path, body)
    assert got == status, raw[:300]
    if err_type is None:
        return
    err = orjson.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == err_type and err["code"] == status
    assert message in err["message"]


async def test_malformed_json_and_unknown_route(
    sim: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    async with http.post(sim.url + "/v1/chat/completions", data=b"{not json") as r:
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "BadRequestError"
    async with http.post(sim.url + "/v1/completions", data=b"[1, 2]") as r:
        assert r.status == 400
    async with http.get(sim.url + "/v1/nothing-here") as r:
        assert r.status == 404
        assert await r.json() == {"detail": "Not Found"}


def test_openai_client_maps_errors(sim_thread: SimServerHandle) -> None:
    with openai.OpenAI(base_url=sim_thread.url + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="x", max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.completions.create(model=MODEL, prompt=token_prompt(40000), max_tokens=1)


# --------------------------------------------------------------------------- tokenizer routes
async def test_tokenize_and_detokenize(sim: SimServerHandle, http: aiohttp.ClientSession) -> None:
    tok = default_tokenizer()
    _, raw = await post(http, sim.url + "/tokenize", {"model": MODEL, "prompt": "Hello world"})
    body = orjson.loads(raw)
    assert body == {"count": len(tok.encode("Hello world")), "max_model_len": 32768,
                    "tokens": tok.encode("Hello world"), "token_strs": None}  # fmt: skip
    messages = [{"role": "user", "content": "Hi there"}]
    _, raw = await post(http, sim.url + "/tokenize", {"messages": messages})
    assert orjson.loads(raw)["tokens"] == tok.encode_chat(messages)
    body2 = {"prompt": "Hello world", "add_special_tokens": False, "return_token_strs": True}
    _, raw = await post(http, sim.url + "/tokenize", body2)
    assert orjson.loads(raw)["token_strs"] == ["He", "llo", "Ġworld"]  # like HF's tokens
    _, raw = await post(http, sim.url + "/detokenize", {"tokens": body["tokens"]})
    assert orjson.loads(raw) == {"prompt": "Hello world"}


async def test_embeddings(sim: SimServerHandle) -> None:
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    try:
        # The client asks for base64 and decodes it; the float form is checked raw below.
        a = await client.embeddings.create(model=MODEL, input=["alpha", "beta", "alpha"])
        raw = await client.embeddings.with_raw_response.create(
            model=MODEL, input="alpha", encoding_format="float"
        )
    finally:
        await client.close()
    vecs = [d.embedding for d in a.data]
    assert [d.index for d in a.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vecs)
    assert math.isclose(sum(x * x for x in vecs[0]), 1.0, rel_tol=1e-5)
    assert vecs[0] == vecs[2] and vecs[0] != vecs[1]
    body = orjson.loads(raw.content)
    assert body["object"] == "list" and body["id"].startswith("embd-")
    assert body["data"][0]["object"] == "embedding"
    assert all(
        math.isclose(x, y, abs_tol=1e-6)
        for x, y in zip(body["data"][0]["embedding"], vecs[0], strict=True)
    )
    assert body["usage"]["completion_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == len(default_tokenizer().encode("alpha"))


# --------------------------------------------------------------------------- metrics / cache
async def test_metrics_names_types_and_labels(
    sim: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    fams = await metrics(http, sim)
    kinds = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:num_preemptions": "counter",
        "vllm:request_success": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:cache_config_info": "gauge",
    }
    for name, kind in kinds.items():
        assert fams[name].type == kind, name
    for name in kinds:
        if name != "vllm:cache_config_info":
            assert fams[name].samples[0].labels["model_name"] == MODEL
            assert fams[name].samples[0].labels["engine"] == "0"
    for name, buckets in (("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
                          ("vllm:inter_token_latency_seconds", ITL_BUCKETS),
                          ("vllm:e2e_request_latency_seconds", E2E_BUCKETS)):  # fmt: skip
        les = [s.labels["le"] for s in fams[name].samples if s.name.endswith("_bucket")]
        assert les == [*map(str, buckets), "+Inf"]
    (info,) = fams["vllm:cache_config_info"].samples
    assert info.value == 1.0 and "model_name" not in info.labels
    assert info.labels["block_size"] == "16"
    assert info.labels["num_gpu_blocks"] == "26250"
    assert info.labels["enable_prefix_caching"] == "True"
    reasons = {s.labels["finished_reason"] for s in fams["vllm:request_success"].samples
               if s.name.endswith("_total")}  # fmt: skip
    assert reasons == {"stop", "length", "abort", "error", "repetition"}

    await post(http, sim.url + "/v1/completions", {"prompt": "x", "max_tokens": 5})
    after = await metrics(http, sim)
    assert value(after, "vllm:request_success", "vllm:request_success_total",
                 finished_reason="length") == 1  # fmt: skip
    assert value(after, "vllm:generation_tokens", "vllm:generation_tokens_total") == 5
    assert value(after, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == 2
    assert value(after, "vllm:time_to_first_token_seconds",
                 "vllm:time_to_first_token_seconds_count") == 1  # fmt: skip
    assert value(after, "vllm:inter_token_latency_seconds",
                 "vllm:inter_token_latency_seconds_count") == 4  # fmt: skip
    assert value(after, "vllm:e2e_request_latency_seconds",
                 "vllm:e2e_request_latency_seconds_count") == 1  # fmt: skip


async def test_same_prompt_twice_hits_whole_blocks(
    sim: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    prompt = token_prompt(500)
    hits: list[float] = []
    usages = []
    for _ in range(2):
        hits.append(value(await metrics(http, sim), "vllm:prefix_cache_hits",
                          "vllm:prefix_cache_hits_total"))  # fmt: skip
        _, raw = await post(http, sim.url + "/v1/completions", {"prompt": prompt, "max_tokens": 4})
        usages.append(orjson.loads(raw)["usage"])
    fams = await metrics(http, sim)
    hits.append(value(fams, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total"))
    assert hits[1] == hits[0] == 0
    gained = hits[2] - hits[1]
    assert gained > 0 and gained % 16 == 0  # whole blocks only
    assert gained == 496  # 31 full blocks of 16; the partial last block is recomputed
    assert usages[0]["prompt_tokens_details"] is None
    assert usages[1]["prompt_tokens_details"] == {"cached_tokens": 496}
    assert value(fams, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == 1000


async def test_cached_tokens_in_stream_usage_and_reset(
    sim: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    body = {"prompt": token_prompt(64), "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    await post(http, sim.url + "/v1/completions", body)
    _, raw = await post(http, sim.url + "/v1/completions", body)
    usage = sse_events(raw)[-1]["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 48}  # 64 = 4 blocks, last recomputed
    assert sim.engine.cached_block_hashes()
    async with http.post(sim.url + "/reset_prefix_cache") as r:
        assert r.status == 200
    assert not sim.engine.cached_block_hashes()
    _, raw = await post(http, sim.url + "/v1/completions", body)
    assert "prompt_tokens_details" not in sse_events(raw)[-1]["usage"]


# --------------------------------------------------------------------------- disconnects
async def wait_for(predicate: Any, timeout: float = 2.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


@pytest.fixture
async def slow_sim() -> AsyncIterator[SimServerHandle]:
    """Real-time-ish, so that a long request is still running when the client leaves."""
    h = await start_sim_server(port=0, profile="vendor-b", model=MODEL, speed=5.0)
    yield h
    await h.close()


async def test_stream_disconnect_aborts_and_frees_blocks(
    slow_sim: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    engine = slow_sim.engine
    body = {"prompt": token_prompt(300), "max_tokens": 20000, "stream": True}
    resp = await http.post(slow_sim.url + "/v1/completions", json=body)
    await resp.content.readuntil(b"\n\n")
    await resp.content.readuntil(b"\n\n")
    assert engine.num_running == 1 and engine.kv_cache_usage > 0
    resp.close()  # drop the connection mid-stream
    assert await wait_for(lambda: engine.num_running == 0 and engine.num_waiting == 0)
    assert engine.kv_cache_usage == 0.0
    fams = await metrics(http, slow_sim)
    assert value(fams, "vllm:request_success", "vllm:request_success_total",
                 finished_reason="abort") == 1  # fmt: skip


async def test_non_stream_disconnect_aborts(
    slow_sim: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    engine = slow_sim.engine
    body = {"prompt": token_prompt(300), "max_tokens": 20000}
    with pytest.raises(asyncio.TimeoutError):
        await http.post(slow_sim.url + "/v1/completions", json=body,
                        timeout=aiohttp.ClientTimeout(total=0.3))  # fmt: skip
    assert await wait_for(lambda: engine.num_running == 0 and engine.num_waiting == 0)
    assert engine.kv_cache_usage == 0.0


async def test_concurrent_requests_all_complete(
    sim: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    async def one(i: int) -> dict[str, Any]:
        body = {"prompt": token_prompt(200, seed=i), "max_tokens": 20 + i}
        _, raw = await post(http, sim.url + "/v1/completions", body)
        return orjson.loads(raw)

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert [r["usage"]["completion_tokens"] for r in results] == [20 + i for i in range(20)]
    assert sim.engine.num_running == 0 and sim.engine.kv_cache_usage == 0.0
