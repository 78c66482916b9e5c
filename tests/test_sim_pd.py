"""Simulated prefill/decode disaggregation: producer and consumer sim servers on 127.0.0.1
speaking vLLM's NixlConnector protocol (kv_transfer_params, a side channel, held blocks),
and the engine's remote-KV path in virtual time."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.sim.engine import Engine, EngineRequest
from lbproxy.sim.fleet import parse_fleet, start_fleet
from lbproxy.sim.hardware import load_profile
from lbproxy.sim.kv_transfer import (
    HoldLedger,
    LinkTable,
    PullError,
    transfer_bytes,
    transfer_seconds,
)
from lbproxy.sim.server import SimServerHandle, start_sim_server

MODEL = "granite-4.1-8b"
SPEED = 100.0  # engine seconds per wall second
LINK_GBPS = 1.0  # slow, so that the transfer is a visible part of the TTFT
PROMPT_LEN = 500  # vendor-b: 16-token blocks -> 32 blocks
KV_BYTES = transfer_bytes(32, 16, 131072)  # vendor-b's kv_bytes_per_token
PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
              "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip


def token_prompt(n: int, seed: int = 0) -> list[int]:
    return [100 + (i * 7919 + seed * 104729) % 8000 for i in range(n)]


async def start(role: str | None, **kw: Any) -> SimServerHandle:
    return await start_sim_server(port=0, profile="vendor-b", model=MODEL, speed=SPEED,
                                  kv_role=role, **kw)  # fmt: skip


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def producer() -> AsyncIterator[SimServerHandle]:
    h = await start("producer")
    yield h
    await h.close()


@pytest.fixture
async def consumer() -> AsyncIterator[SimServerHandle]:
    h = await start("consumer", kv_links=LinkTable(LINK_GBPS))
    yield h
    await h.close()


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, rid: str = "pd-1"
) -> tuple[int, bytes]:
    async with http.post(url, json=body, headers={"X-Request-Id": rid}) as r:
        return r.status, await r.read()


async def scrape(http: aiohttp.ClientSession, h: SimServerHandle) -> dict[str, Any]:
    async with http.get(h.url + "/metrics") as r:
        text = await r.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], name: str, sample: str | None = None, **labels: str) -> float:
    for s in fams[name].samples:
        if (sample is None or s.name == sample) and all(
            s.labels.get(k) == v for k, v in labels.items()
        ):
            return s.value
    raise KeyError((name, sample, labels))


def total(fams: dict[str, Any], name: str) -> float:
    """A counter's `_total` sample (unlabelled but for engine and model)."""
    return value(fams, name, name + "_total")


def hist(fams: dict[str, Any], name: str, part: str) -> float:
    return value(fams, name, f"{name}_{part}")


async def prefill(
    http: aiohttp.ClientSession, p: SimServerHandle, prompt: list[int], path: str = "completions"
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 1, "stream": False,
                            "kv_transfer_params": PREFILL_KV}  # fmt: skip
    if path == "completions":
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": "word " * 300}]
    status, raw = await post(http, f"{p.url}/v1/{path}", body)
    assert status == 200, raw
    return orjson.loads(raw)


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ producer
async def test_producer_answers_params_and_holds_blocks_until_pulled(
    producer: SimServerHandle, consumer: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    resp = await prefill(http, producer, token_prompt(PROMPT_LEN))
    assert resp["usage"]["completion_tokens"] == 1
    assert resp["choices"][0]["finish_reason"] == "length"
    kv = resp["kv_transfer_params"]
    assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False
    assert kv["remote_engine_id"] == producer.server.kv_engine_id
    assert kv["remote_host"] == "127.0.0.1"
    assert kv["remote_port"] == producer.kv_side_channel_port != producer.port
    assert re.fullmatch(r"cmpl-pd-1-[0-9a-f]{8}", kv["remote_request_id"])
    assert kv["tp_size"] == 1 and kv["remote_num_tokens"] == PROMPT_LEN
    (blocks,) = kv["remote_block_ids"]
    assert len(blocks) == 32 and len(set(blocks)) == 32
    # Held: counted in the producer's KV usage after the request finished.
    fams = await scrape(http, producer)
    assert value(fams, "vllm:kv_cache_usage_perc") == pytest.approx(32 / 26249)
    assert value(fams, "vllm:num_requests_running") == 0
    assert total(fams, "vllm:generation_tokens") == 1
    assert value(fams, "vllm:prompt_tokens_by_source", source="local_compute") == PROMPT_LEN
    assert producer.engine.num_held == 1

    body = {"model": MODEL, "prompt": token_prompt(PROMPT_LEN), "max_tokens": 8,
            "kv_transfer_params": kv}  # fmt: skip
    status, raw = await post(http, consumer.url + "/v1/completions", body)
    assert status == 200, raw
    out = orjson.loads(raw)
    assert out["usage"] == {"prompt_tokens": PROMPT_LEN, "total_tokens": PROMPT_LEN + 8,
                            "completion_tokens": 8, "prompt_tokens_details": None,
                            "completion_tokens_details": None}  # fmt: skip
    assert out["kv_transfer_params"] is None
    # Pulled: the producer frees the blocks.
    await eventually(lambda: producer.engine.num_held == 0)
    assert producer.engine.kv_cache_usage == 0.0
    assert len(producer.server.kv_ledger or ()) == 0


# ------------------------------------------------------------------------------ consumer
async def test_consumer_decodes_without_prefill_and_pays_the_transfer(
    producer: SimServerHandle, consumer: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    kv = (await prefill(http, producer, token_prompt(PROMPT_LEN)))["kv_transfer_params"]
    body = {"model": MODEL, "prompt": token_prompt(PROMPT_LEN), "max_tokens": 4,
            "kv_transfer_params": kv}  # fmt: skip
    status, raw = await post(http, consumer.url + "/v1/completions", body)
    assert status == 200, raw
    fams = await scrape(http, consumer)
    # No prompt computed locally: every prompt token came over the link (vLLM's counters).
    assert value(fams, "vllm:prompt_tokens_by_source", source="local_compute") == 0
    assert value(fams, "vllm:prompt_tokens_by_source", source="external_kv_transfer") == 500
    assert total(fams, "vllm:prompt_tokens") == PROMPT_LEN
    assert total(fams, "vllm:external_prefix_cache_hits") == PROMPT_LEN
    assert total(fams, "vllm:prefix_cache_queries") == PROMPT_LEN
    assert total(fams, "vllm:generation_tokens") == 4
    # The transfer: bytes of the 32 pulled blocks over the 1 Gb/s link.
    xfer = transfer_seconds(KV_BYTES, LINK_GBPS)
    assert hist(fams, "vllm:nixl_bytes_transferred", "sum") == KV_BYTES
    assert hist(fams, "vllm:nixl_xfer_time_seconds", "count") == 1
    assert hist(fams, "vllm:nixl_xfer_time_seconds", "sum") == pytest.approx(xfer)
    # ... is part of the TTFT (engine seconds), and the first step computed one token only.
    ttft = hist(fams, "vllm:time_to_first_token_seconds", "sum")
    assert ttft >= xfer
    prof = consumer.server.profile
    one_token = prof.step_time(1, 0, PROMPT_LEN, 1, prefill_attn_pairs=PROMPT_LEN)
    full = prof.step_time(PROMPT_LEN, 0, PROMPT_LEN, 1, prefill_attn_pairs=PROMPT_LEN * 501 // 2)
    assert one_token < full


async def test_streaming_chat_decode(
    producer: SimServerHandle, consumer: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    kv = (await prefill(http, producer, [], path="chat/completions"))["kv_transfer_params"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 300}],
            "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True},
            "kv_transfer_params": kv}  # fmt: skip
    status, raw = await post(http, consumer.url + "/v1/chat/completions", body)
    assert status == 200, raw
    events = raw.split(b"\n\n")
    assert events[-2] == b"data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    n = kv["remote_num_tokens"]
    assert chunks[-1]["usage"]["prompt_tokens"] == n
    fams = await scrape(http, consumer)
    assert value(fams, "vllm:prompt_tokens_by_source", source="external_kv_transfer") == n
    assert value(fams, "vllm:prompt_tokens_by_source", source="local_compute") == 0
    await eventually(lambda: producer.engine.num_held == 0)


# ------------------------------------------------------------------------------ failures
async def test_stale_and_wrong_params_fail_as_a_kv_load_failure(
    producer: SimServerHandle, consumer: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    prompt = token_prompt(PROMPT_LEN)
    kv = (await prefill(http, producer, prompt))["kv_transfer_params"]
    url = consumer.url + "/v1/completions"
    bad_cases = [
        {**kv, "remote_request_id": "cmpl-nobody-00000000"},
        {**kv, "remote_engine_id": "not-this-engine"},
        {**kv, "remote_block_ids": [[1, 2, 3]]},
    ]
    for params in bad_cases:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "kv_transfer_params": params}
        status, raw = await post(http, url, body)
        assert status == 500, raw
        err = orjson.loads(raw)["error"]
        assert err["type"] == "InternalServerError" and "KV load failure" in err["message"]
    assert producer.engine.num_held == 1  # refused pulls leave the blocks held
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "kv_transfer_params": kv}
    assert (await post(http, url, body))[0] == 200
    await eventually(lambda: producer.engine.num_held == 0)
    # Stale: the same params again, after the pull freed the blocks.
    status, raw = await post(http, url, body)
    assert status == 500 and b"KV load failure" in raw
    fams = await scrape(http, consumer)
    assert total(fams, "vllm:nixl_num_failed_transfers") == 4
    # The consumer stays healthy and serves plain requests.
    status, _ = await post(http, url, {"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert status == 200


async def test_unreachable_side_channel_fails(
    consumer: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    kv = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1, 2]],
          "remote_engine_id": "gone", "remote_request_id": "cmpl-x-00000001",
          "remote_host": "127.0.0.1", "remote_port": free_port(), "tp_size": 1}  # fmt: skip
    for stream in (False, True):
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "stream": stream,
                "kv_transfer_params": kv}  # fmt: skip
        status, raw = await post(http, consumer.url + "/v1/completions", body)
        assert status == 500, raw
        assert "unreachable" in orjson.loads(raw)["error"]["message"]
    assert consumer.engine.num_running == consumer.engine.num_waiting == 0


async def test_params_without_remote_fields_prefill_locally(
    consumer: SimServerHandle, http: aiohttp.ClientSession
) -> None:
    """vLLM warns "Got invalid KVTransferParams" and serves the request without a transfer."""
    body = {"model": MODEL, "prompt": token_prompt(100), "max_tokens": 2,
            "kv_transfer_params": {"do_remote_prefill": True}}  # fmt: skip
    status, raw = await post(http, consumer.url + "/v1/completions", body)
    assert status == 200, raw
    fams = await scrape(http, consumer)
    assert value(fams, "vllm:prompt_tokens_by_source", source="local_compute") == 100
    assert value(fams, "vllm:prompt_tokens_by_source", source="external_kv_transfer") == 0


async def test_hold_timeout_releases_blocks(http: aiohttp.ClientSession) -> None:
    p = await start("producer", kv_hold_timeout=50.0)  # 50 engine s = 0.5 s at speed 100
    c = await start("consumer")
    try:
        kv = (await prefill(http, p, token_prompt(PROMPT_LEN)))["kv_transfer_params"]
        assert p.engine.num_held == 1 and p.engine.kv_cache_usage > 0
        await eventually(lambda: p.engine.num_held == 0)
        assert p.engine.kv_cache_usage == 0.0
        fams = await scrape(http, p)
        assert total(fams, "vllm:nixl_num_kv_expired_reqs") == 1
        body = {"model": MODEL, "prompt": token_prompt(PROMPT_LEN), "max_tokens": 2,
                "kv_transfer_params": kv}  # fmt: skip
        status, raw = await post(http, c.url + "/v1/completions", body)
        assert status == 500 and b"timed out" in raw
    finally:
        await c.close()
        await p.close()


# ------------------------------------------------------------------------------ unchanged
def _normalise(raw: bytes) -> Any:
    """The bytes, `created` aside; for SSE (whose chunking follows the wall clock: late tokens
    share a chunk) the joined text, the finish reasons and the usage chunk."""
    raw = re.sub(rb'"created":\d+', b'"created":0', raw)
    if not raw.startswith(b"data: "):
        return raw
    events = [orjson.loads(e[6:]) for e in raw.split(b"\n\n")[:-2]]
    text = "".join(c["text"] if "text" in c else c["delta"].get("content") or ""
                   for e in events for c in e["choices"])  # fmt: skip
    reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    return text, reasons, [e for e in events if not e["choices"]]


async def test_requests_without_params_are_byte_identical(http: aiohttp.ClientSession) -> None:
    plain = await start(None, seed=7)
    both = await start("both", seed=7)
    try:
        bodies = [
            ("completions", {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 12}),
            ("chat/completions", {"model": MODEL, "max_tokens": 9,
                                  "messages": [{"role": "user", "content": "hi there"}]}),
            ("completions", {"model": MODEL, "prompt": "Streams", "max_tokens": 7,
                             "stream": True, "stream_options": {"include_usage": True}}),
            ("chat/completions", {"model": MODEL, "stream": True,
                                  "messages": [{"role": "user", "content": "stream me"}]}),
        ]  # fmt: skip
        for i, (path, body) in enumerate(bodies):
            a = await post(http, f"{plain.url}/v1/{path}", body, rid=f"same-{i}")
            b = await post(http, f"{both.url}/v1/{path}", body, rid=f"same-{i}")
            assert a[0] == b[0] == 200
            assert _normalise(a[1]) == _normalise(b[1])
        # A server without a role ignores kv_transfer_params altogether.
        body = {"model": MODEL, "prompt": "x y z", "max_tokens": 3,
                "kv_transfer_params": PREFILL_KV}  # fmt: skip
        status, raw = await post(http, plain.url + "/v1/completions", body)
        assert status == 200 and orjson.loads(raw)["kv_transfer_params"] is None
        assert plain.engine.num_held == 0
        assert "vllm:nixl_xfer_time_seconds" not in await scrape(http, plain)
        assert "vllm:nixl_xfer_time_seconds" in await scrape(http, both)
    finally:
        await plain.close()
        await both.close()


# ------------------------------------------------------------------------------ engine
def test_engine_remote_kv_in_virtual_time() -> None:
    """The consumer's engine: blocks allocated at admission, the transfer's time, then one
    computed token; the producer's engine keeps its blocks until released."""
    prof = load_profile("vendor-b")
    prompt = token_prompt(PROMPT_LEN)
    p = Engine(prof)
    p.add_request(EngineRequest("p", prompt, 1, hold_kv=True), 0.0)
    while (t := p.next_event_time()) is not None:
        p.step(t)
    assert p.held_block_ids("p") is not None and p.kv_cache_usage > 0
    assert p.release_held("p", 1.0) and p.kv_cache_usage == 0.0 and not p.release_held("p", 1.0)

    c = Engine(prof)
    req = EngineRequest("d", prompt, 3, remote_kv_gbps=LINK_GBPS)
    c.add_request(req, 0.0)
    xfer = transfer_seconds(KV_BYTES, LINK_GBPS)
    assert c.next_event_time() == pytest.approx(xfer)  # loading: no step runs meanwhile
    assert c.kv_cache_usage == pytest.approx(32 / 26249)  # ... but its blocks are allocated
    times = []
    while (t := c.next_event_time()) is not None:
        times.extend(o.time for o in c.step(t))
    first = prof.step_time(1, 0, PROMPT_LEN, 1, prefill_attn_pairs=PROMPT_LEN)
    assert times[0] == pytest.approx(xfer + first)
    assert len(times) == 3 and req.kv_transfer_s == pytest.approx(xfer)
    assert (c.prompt_tokens_external, c.prompt_tokens_cached) == (PROMPT_LEN, 0)
    assert c.kv_cache_usage == 0.0


def test_engine_abort_while_loading_frees_blocks() -> None:
    c = Engine(load_profile("vendor-b"))
    c.add_request(EngineRequest("d", token_prompt(PROMPT_LEN), 3, remote_kv_gbps=1.0), 0.0)
    assert c.kv_cache_usage > 0
    c.abort("d", 0.01)
    assert c.kv_cache_usage == 0.0 and c.next_event_time() is not None
    assert c.step(1.0) == [] and c.next_event_time() is None


# ------------------------------------------------------------------------------ fleet
def test_fleet_roles_links_and_side_channel_ports() -> None:
    fleet = parse_fleet(
        {
            "model": "m",
            "links": {"vendor-a": {"vendor-b": 400}},
            "backends": [
                {
                    "name": "p",
                    "profile": "vendor-a",
                    "port": 9000,
                    "count": 2,
                    "kv_role": "producer",
                    "kv_side_channel_port": 5600,
                    "kv_hold_timeout": 30,
                },
                {"name": "d", "profile": "vendor-b", "port": 9010, "kv_role": "consumer"},
                {"name": "x", "profile": "vendor-c", "port": 9011},
            ],
        }
    )
    assert [b.kv_role for b in fleet.backends] == ["producer", "producer", "consumer", None]
    assert [b.kv_side_channel_port for b in fleet.backends] == [5600, 5601, 0, 0]
    assert fleet.backends[0].kv_hold_timeout == 30.0
    assert fleet.backends[2].kv_hold_timeout == 480.0
    assert fleet.links.gbps("vendor-b", "vendor-a") == 400.0
    assert fleet.links.gbps("vendor-a", "vendor-c") == 100.0
    with pytest.raises(ValueError, match=r"backends\[0\]\.kv_role: must be one of"):
        parse_fleet({"model": "m", "backends": [
            {"name": "a", "profile": "vendor-a", "port": 1, "kv_role": "prefill"}]})  # fmt: skip
    with pytest.raises(ValueError, match=r"links\.vendor-a\.vendor-b: must be a number > 0"):
        parse_fleet({"model": "m", "links": {"vendor-a": {"vendor-b": 0}}, "backends": [
            {"name": "a", "profile": "vendor-a", "port": 1}]})  # fmt: skip


# ------------------------------------------------------------------------------ CLI
def test_cli_kv_role() -> None:
    cli = [sys.executable, "-m", "lbproxy.cli", "sim"]
    r = subprocess.run([*cli, "--model", "m", "--kv-link-gbps", "400"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "--kv-link-gbps needs --kv-role" in r.stderr
    port, side = free_port(), free_port()
    proc = subprocess.Popen(
        [*cli, "--port", str(port), "--model", "m", "--speed", "20", "--loop", "asyncio",
         "--kv-role", "both", "--kv-side-channel-port", str(side), "--kv-link-gbps", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"kv_role both, KV side channel port {side}" in banner

        async def use() -> dict[str, Any]:
            async with aiohttp.ClientSession() as http:
                body = {"model": "m", "prompt": "hello there", "max_tokens": 4,
                        "kv_transfer_params": PREFILL_KV}  # fmt: skip
                async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                    return await r.json()

        kv = asyncio.run(use())["kv_transfer_params"]
        assert kv["remote_port"] == side and kv["remote_host"] == "127.0.0.1"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_engine_waits_for_held_blocks_instead_of_stalling() -> None:
    """Blocks held for a remote decode can leave a waiting request without room: it waits
    (as in vLLM) and runs once they are released."""
    prof = dataclasses.replace(load_profile("vendor-b"), num_gpu_blocks=70, max_model_len=1024)
    e = Engine(prof)
    e.add_request(EngineRequest("p", token_prompt(1000), 1, hold_kv=True), 0.0)
    while (t := e.next_event_time()) is not None:
        e.step(t)
    e.add_request(EngineRequest("next", token_prompt(500, seed=1), 2), 1.0)
    assert e.next_event_time() is None and e.num_waiting == 1  # no room, no error
    e.release_held("p", 2.0)
    outs = []
    while (t := e.next_event_time()) is not None:
        outs.extend(e.step(t))
    assert [o.request_id for o in outs] == ["next", "next"] and outs[0].time > 2.0


def test_hold_ledger_checks_pulls() -> None:
    ledger = HoldLedger("eng-1", timeout_s=10.0)
    ledger.hold("r1", [4, 5, 6], 40, now=0.0, engine_request_id="7")
    with pytest.raises(PullError, match="unknown remote engine id"):
        ledger.begin_pull("eng-2", "r1", [[4, 5, 6]], 1.0)
    with pytest.raises(PullError, match="block ids do not match"):
        ledger.begin_pull("eng-1", "r1", [[4, 5]], 1.0)
    assert ledger.begin_pull("eng-1", "r1", [[4, 5, 6]], 1.0).engine_request_id == "7"
    with pytest.raises(PullError, match="already being pulled"):
        ledger.begin_pull("eng-1", "r1", [4, 5, 6], 1.0)
    ledger.abort_pull("r1")  # a failed read: pullable again
    ledger.begin_pull("eng-1", "r1", [4, 5, 6], 2.0)
    assert ledger.expired(9.9) == [] and ledger.expired(10.0) == ["r1"]  # reading or not
    assert ledger.release("r1") is not None and len(ledger) == 0
    with pytest.raises(PullError, match="unknown, already pulled or timed out"):
        ledger.begin_pull("eng-1", "r1", [4, 5, 6], 3.0)


async def test_fleet_pull_across_vendors_uses_the_pair_link(http: aiohttp.ClientSession) -> None:
    handles = await start_fleet(
        parse_fleet(
            {
                "model": MODEL,
                "speed": SPEED,
                "links": {"vendor-a": {"vendor-b": 400}},
                "kv_link_gbps": 50,
                "backends": [
                    {"name": "p", "profile": "vendor-a", "port": 0, "kv_role": "producer"},
                    {"name": "d", "profile": "vendor-b", "port": 0, "kv_role": "consumer"},
                ],
            }
        )
    )
    p, d = handles
    try:
        kv = (await prefill(http, p, token_prompt(PROMPT_LEN)))["kv_transfer_params"]
        body = {"model": MODEL, "prompt": token_prompt(PROMPT_LEN), "max_tokens": 2,
                "kv_transfer_params": kv}  # fmt: skip
        status, raw = await post(http, d.url + "/v1/completions", body)
        assert status == 200, raw
        fams = await scrape(http, d)
        xfer = transfer_seconds(KV_BYTES, 400.0)
        assert hist(fams, "vllm:nixl_xfer_time_seconds", "sum") == pytest.approx(xfer)
        await eventually(lambda: p.engine.num_held == 0)
    finally:
        for h in handles:
            await h.close()
