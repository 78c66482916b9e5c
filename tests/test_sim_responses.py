"""The simulated server's `/v1/responses` (text, as vLLM answers it), through the openai
SDK and through lbproxy; and its KV-event sockets bound on its HTTP host."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import zmq

from lbproxy.sim.server import SimServerHandle, start_sim_server
from lbproxy.tokenization.tokenizer import default_tokenizer
from tests.conftest import proxy_config

MODEL = "sim-model"


@pytest.fixture
def sim(loop_thread: Any) -> Iterator[SimServerHandle]:
    h = loop_thread.run(start_sim_server(port=0, profile="vendor-b", model=MODEL, speed=20.0))
    yield h
    loop_thread.run(h.close())


def test_openai_sdk_reads_a_response(sim: SimServerHandle) -> None:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as client:
        resp = client.responses.create(
            model=MODEL, input="Say hello", instructions="Be brief.", max_output_tokens=12
        )
        again = client.responses.create(
            model=MODEL,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}],
            instructions="Be brief.",
            max_output_tokens=12,
        )
    assert re.fullmatch(r"resp_[0-9a-f]{32}", resp.id) and resp.object == "response"
    assert resp.model == MODEL and resp.status == "incomplete"  # stopped by the limit
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    (message,) = resp.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert resp.output_text == message.content[0].text != ""
    assert resp.usage is not None and resp.usage.output_tokens == 12
    # the same chat template as /v1/chat/completions: system + user message
    tok = default_tokenizer()
    expected = tok.encode(
        tok.render_chat(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
            add_generation_prompt=True,
        ),
        add_special_tokens=False,
    )
    assert resp.usage.input_tokens == len(expected)
    assert resp.usage.total_tokens == resp.usage.input_tokens + 12
    # a list of input_text parts means the same prompt; its prefix is now cached
    assert again.usage is not None and again.usage.input_tokens == resp.usage.input_tokens
    assert again.usage.input_tokens_details.cached_tokens > 0


def test_openai_sdk_streams_a_response(sim: SimServerHandle) -> None:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0) as client:
        events = list(
            client.responses.create(model=MODEL, input="Hi", max_output_tokens=8, stream=True)
        )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # max_output_tokens reached
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas and [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-4]
    assert done.text == "".join(deltas)
    final = events[-1].response
    assert final.output_text == done.text and final.usage.output_tokens == 8


def test_raw_sse_framing_and_errors(sim: SimServerHandle) -> None:
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 3, "stream": True}
    r = httpx.post(sim.url + "/v1/responses", json=body, timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    frames = r.text.split("\n\n")
    assert frames[-1] == "" and "[DONE]" not in r.text  # the Responses API has no [DONE]
    for frame in frames[:-1]:
        event, data = frame.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert orjson.loads(data[6:])["type"] == event[7:]
    # what vLLM refuses, in its error shape
    for bad, param in (
        ({"model": MODEL, "input": 5}, "input"),
        ({"model": MODEL, "input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ):
        r = httpx.post(sim.url + "/v1/responses", json=bad, timeout=30)
        assert r.status_code == 400
        err = r.json()["error"]
        assert (err["type"], err["param"], err["code"]) == ("BadRequestError", param, 400)
    r = httpx.post(sim.url + "/v1/responses", json={"model": "other", "input": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"


def test_responses_through_lbproxy(sim: SimServerHandle, run_proxy: Any) -> None:
    cfg = proxy_config([sim.url])
    cfg["pools"][0]["models"] = [MODEL]
    proxy = run_proxy(cfg)
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        resp = client.responses.create(model=MODEL, input="Hello", max_output_tokens=5)
        streamed = list(
            client.responses.create(model=MODEL, input="Hello", max_output_tokens=5, stream=True)
        )
    assert resp.usage is not None and resp.usage.output_tokens == 5
    assert streamed[-1].type == "response.incomplete"


@pytest.mark.parametrize("replay", [False, True])
def test_kv_event_sockets_bind_on_the_http_host(loop_thread: Any, replay: bool) -> None:
    """`tcp://*:PORT` binds on the address the HTTP server listens on (127.0.0.1 here), not
    on every interface; a subscriber on that address receives the events."""
    h = loop_thread.run(
        start_sim_server(
            host="127.0.0.1",
            port=0,
            profile="vendor-b",
            model=MODEL,
            speed=20.0,
            kv_events="tcp://*:*",
            kv_events_replay="tcp://*:*" if replay else None,
        )
    )
    try:
        assert h.kv_events_endpoint is not None
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", h.kv_events_endpoint)
        if replay:
            assert h.kv_events_replay_endpoint is not None
            assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", h.kv_events_replay_endpoint)
        sub = zmq.Context.instance().socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.RCVTIMEO, 5000)
            sub.connect(h.kv_events_endpoint)
            received = None
            for _ in range(20):  # the SUB joins after a moment: send until one arrives
                httpx.post(
                    h.url + "/v1/completions",
                    json={"model": MODEL, "prompt": "hello " * 40, "max_tokens": 2},
                    timeout=30,
                )
                try:
                    received = sub.recv_multipart()
                    break
                except zmq.Again:
                    continue
            assert received is not None and received[0] == b"kv-events"
        finally:
            sub.close(linger=0)
    finally:
        loop_thread.run(h.close())
