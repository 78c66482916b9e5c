"""lbproxy's prefill/decode split against two real vLLM 0.32 CPU servers (opt-in).

A real NixlConnector pair: a prefill server (kv_producer) and a decode server
(kv_consumer) that pulls the prompt's KV blocks from it over NIXL/UCX on loopback.
Deselected by default (pyproject's `addopts`); run with

    scripts/real_vllm/setup.sh                          # once: venv, model, NIXL
    pytest -m real_vllm tests/test_real_vllm_pd.py      # starts the pair, tests, stops it

or with the pair already running (`scripts/real_vllm/start_pd_servers.sh`; it is reused
and left running), or any other pair: `LBPROXY_REAL_VLLM_PD_URLS=PREFILL_URL,DECODE_URL`.
`LBPROXY_REAL_VLLM_DIR` points at another setup directory. Skipped, with the reason, when
neither running servers nor a setup with NIXL are found.

lbproxy runs in this process over one pool: the prefill server with `role: prefill`, the
decode server with `role: decode`, `disaggregation: {min_prompt_tokens: 64}` and the
default P/D routing profiles. Through the official openai client it checks that:

1. completions and chat, streaming and not, are served split (lbproxy's
   `lbproxy_pd_requests_total{mode="disaggregated"}`, the pair in its access log and
   prefill histogram), the decode server did not compute the prompt (its
   `vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}` grows by the
   prompt's tokens, `local_compute` not at all) and the prefill server did, and with
   temperature 0 the text equals the decode server's own aggregated answer;
2. a short prompt stays aggregated, on the decode server, its body passed unchanged;
3. the client's other fields (`logprobs`, `stop`, `max_tokens`, `user`, `top_p`) reach
   the decode leg: the answer honours them.
Every prompt starts with a fresh id: the servers may be reused and must not have it cached.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

import httpx
import openai
import pytest

from lbproxy.config import parse_config
from lbproxy.proxy.app import RunningProxy, start_proxy
from tests.conftest import LoopThread

pytestmark = [pytest.mark.real_vllm, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
START_SCRIPT = REPO / "scripts" / "real_vllm" / "start_pd_servers.sh"
REAL_DIR = Path(
    os.environ.get("LBPROXY_REAL_VLLM_DIR") or Path.home() / ".cache" / "lbproxy-real-vllm"
)
MIN_PROMPT_TOKENS = 64  # lbproxy estimates ~4 prompt bytes per token
PREFILL, DECODE = "prefill0", "decode1"
WORDS = (
    "the model server cache prefix block route token queue latency memory fleet "
    "engine batch river stone cloud forest garden window ocean red green blue quick "
    "slow bright dark early late first last alpha beta gamma delta answer question"
)


def log(msg: str) -> None:
    print(f"[real-vllm-pd] {msg}", flush=True)


# ---------------------------------------------------------------- the pair


@dataclass
class Pair:
    model: str
    prefill: str  # URLs
    decode: str


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _script(cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(START_SCRIPT), cmd],
        env={**os.environ, "REAL_VLLM_DIR": str(REAL_DIR)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _pair_urls() -> tuple[list[str], bool]:
    """The pair's URLs, and whether this module started it (and must stop it)."""
    env_urls = os.environ.get("LBPROXY_REAL_VLLM_PD_URLS", "")
    if env_urls:
        urls = [u.strip().rstrip("/") for u in env_urls.split(",") if u.strip()]
        if len(urls) != 2 or not all(map(_up, urls)):
            pytest.skip(f"LBPROXY_REAL_VLLM_PD_URLS: needs two reachable servers: {urls}")
        return urls, False
    info = REAL_DIR / "run-pd" / "servers.json"
    urls = [s["url"] for s in json.loads(info.read_text())["servers"]] if info.is_file() else []
    if len(urls) == 2 and all(map(_up, urls)):
        return urls, False
    python = REAL_DIR / "venv" / "bin" / "python"
    if not python.exists() or not (REAL_DIR / "tiny-llama" / "config.json").is_file():
        pytest.skip(
            f"vLLM is not installed in {REAL_DIR}: run scripts/real_vllm/setup.sh or set "
            "LBPROXY_REAL_VLLM_DIR / LBPROXY_REAL_VLLM_PD_URLS"
        )
    if subprocess.run([python, "-c", "import nixl._api"], capture_output=True).returncode:
        pytest.skip(f"NIXL is not installed in {python.parent.parent}: run setup.sh again")
    log(f"starting the prefill/decode pair from {REAL_DIR} (30-90 s)")
    t0 = time.monotonic()
    try:
        done = _script("start", timeout=900)
    except subprocess.TimeoutExpired:
        _script("stop", timeout=120)
        pytest.fail("scripts/real_vllm/start_pd_servers.sh did not finish in 900 s")
    if done.returncode != 0:
        _script("stop", timeout=120)
        pytest.fail(f"start_pd_servers.sh failed:\n{done.stdout}\n{done.stderr}")
    log(f"pair up in {time.monotonic() - t0:.0f} s")
    return [s["url"] for s in json.loads(info.read_text())["servers"]], True


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    urls, started = _pair_urls()
    try:
        models = {httpx.get(f"{u}/v1/models", timeout=5).json()["data"][0]["id"] for u in urls}
        assert len(models) == 1, f"the servers serve different models: {models}"
        yield Pair(models.pop(), urls[0], urls[1])
    finally:
        if started:
            done = _script("stop", timeout=180)
            log(f"pair stopped (rc {done.returncode})")


# ---------------------------------------------------------------- lbproxy in front


@dataclass
class Proxy:
    running: RunningProxy
    access_log: Path

    @property
    def url(self) -> str:
        return self.running.url

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def proxy(
    pair: Pair, loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    access_log = tmp_path_factory.mktemp("real-pd") / "access.log"
    cfg = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "pools": [
            {
                "name": "real-pd",
                "models": [pair.model],
                "disaggregation": {"min_prompt_tokens": MIN_PROMPT_TOKENS},
                "backends": [
                    {"url": pair.prefill, "name": PREFILL, "role": "prefill"},
                    {"url": pair.decode, "name": DECODE, "role": "decode"},
                ],
            }
        ],
        "timeouts": {"connect": 5, "first_byte": 120, "idle": 60},
        # The CPU servers, niced on a busy machine, can take seconds to answer /metrics.
        "signals": {"metrics_interval": 1.0, "metrics_timeout": 5.0},
        "access_log": {"enabled": True, "path": str(access_log)},
        "expose_backend_header": True,
    }
    running = loop_thread.run(start_proxy(parse_config(cfg, "real-vllm-pd"), seed=0))
    try:
        yield Proxy(running, access_log)
    finally:
        loop_thread.run(running.close())


# ---------------------------------------------------------------- helpers


def _samples(url: str, name: str) -> dict[str, float]:
    """`name`'s samples on a /metrics page, keyed by their label text (sorted pairs)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for labels, value in re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        pairs = sorted(re.findall(r'(\w+)="([^"]*)"', labels))
        out[",".join(f"{k}={v}" for k, v in pairs if k not in ("engine", "model_name"))] = float(
            value
        )
    return out


@dataclass
class Counters:
    """The counters a split request moves: each server's prompt tokens by source, and
    lbproxy's P/D request counts and prefill histogram count."""

    prefill: dict[str, float]
    decode: dict[str, float]
    lbproxy: dict[str, float]

    @classmethod
    def read(cls, pair: Pair, proxy: Proxy) -> Counters:
        by_source = "vllm:prompt_tokens_by_source_total"
        lb = _samples(proxy.url, "lbproxy_pd_requests_total")
        lb.update(_samples(proxy.url, "lbproxy_pd_prefill_seconds_count"))
        return cls(_samples(pair.prefill, by_source), _samples(pair.decode, by_source), lb)

    def minus(self, before: Counters) -> Counters:
        def d(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            return {k: v - b.get(k, 0.0) for k, v in a.items() if v != b.get(k, 0.0)}

        return Counters(
            d(self.prefill, before.prefill),
            d(self.decode, before.decode),
            d(self.lbproxy, before.lbproxy),
        )


SPLIT = "mode=disaggregated,pool=real-pd,reason=split"
PAIR = f"decode_backend={DECODE},pool=real-pd,prefill_backend={PREFILL}"


def _long_text(tag: str, words: int = 250) -> str:
    """A prompt of a few hundred tokens that no server has seen (fresh id first)."""
    rng, vocab = Random(tag), WORDS.split()
    return f"Run {uuid.uuid4().hex} {tag}: " + " ".join(rng.choice(vocab) for _ in range(words))


def _access_line(proxy: Proxy, rid: str) -> dict[str, Any]:
    """The access-log line of request `rid` (lines are flushed in the background)."""
    deadline = time.monotonic() + 10
    while True:
        text = proxy.access_log.read_text() if proxy.access_log.exists() else ""
        for line in text.splitlines():
            rec = json.loads(line)
            if rec["request_id"] == rid:
                return rec  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"no access-log line for request {rid}"
        time.sleep(0.05)


def _rid() -> str:
    return f"real-pd-{uuid.uuid4().hex}"


def _assert_split(proxy: Proxy, rid: str, delta: Counters, prompt_tokens: int) -> None:
    assert delta.lbproxy.get(SPLIT) == 1, f"not served split: {delta.lbproxy}"
    assert delta.lbproxy.get(PAIR) == 1, f"no prefill leg on {PREFILL}->{DECODE}: {delta.lbproxy}"
    # The decode server took the whole prompt from the prefill server's KV cache...
    assert delta.decode.get("source=external_kv_transfer") == prompt_tokens, delta.decode
    assert "source=local_compute" not in delta.decode, f"decode recomputed: {delta.decode}"
    # ... which computed it (a prefix block of an earlier prompt may be a local hit).
    assert delta.prefill.get("source=local_compute", 0) > 0, delta.prefill
    assert sum(delta.prefill.values()) == prompt_tokens, delta.prefill
    line = _access_line(proxy, rid)
    assert line["pd"]["mode"] == "disaggregated", line["pd"]
    assert (line["pd"]["prefill_backend"], line["pd"]["decode_backend"]) == (PREFILL, DECODE)
    assert line["backend"] == DECODE and line["status"] == 200


def _strip(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without what differs between two runs of the same request."""
    return {k: v for k, v in answer.items() if k not in ("id", "created", "system_fingerprint")}


# ---------------------------------------------------------------- 1. split == decode alone


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_split_request_matches_the_decode_server_alone(
    pair: Pair, proxy: Proxy, route: str, stream: bool
) -> None:
    prompt = _long_text(f"{route}-{stream}")
    common: dict[str, Any] = {"model": pair.model, "max_tokens": 16, "temperature": 0}
    if stream:
        common |= {"stream": True, "stream_options": {"include_usage": True}}
    if route == "chat":
        body = common | {"messages": [{"role": "user", "content": prompt}]}
    else:
        body = common | {"prompt": prompt}
    oa = proxy.client()
    before = Counters.read(pair, proxy)
    t0 = time.monotonic()
    create = oa.chat.completions.create if route == "chat" else oa.completions.create
    rid = _rid()
    out = create(**body, extra_headers={"X-Request-Id": rid})
    if stream:
        text, usage = "", None
        for chunk in out:
            if chunk.choices:
                c = chunk.choices[0]
                text += (c.delta.content or "") if route == "chat" else c.text
            usage = chunk.usage or usage
    else:
        c = out.choices[0]
        text, usage = (c.message.content or "") if route == "chat" else c.text, out.usage
    took = time.monotonic() - t0
    assert usage is not None and usage.completion_tokens == 16
    delta = Counters.read(pair, proxy).minus(before)
    _assert_split(proxy, rid, delta, usage.prompt_tokens)

    # The same body straight to the decode server, aggregated (after the split request:
    # a cached prompt there would have spared it the pull).
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    plain = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
    alone = httpx.post(pair.decode + path, json=plain, timeout=120)
    assert alone.status_code == 200, alone.text
    ref = alone.json()["choices"][0]
    ref_text = ref["message"]["content"] if route == "chat" else ref["text"]
    assert text == ref_text
    log(
        f"{route} stream={stream}: {usage.prompt_tokens} prompt tokens pulled by the decode "
        f"server (prefill {delta.prefill}), {took:.2f} s, text {text[:40]!r}"
    )


# ---------------------------------------------------------------- 2. short stays aggregated


def test_short_prompt_stays_aggregated_on_the_decode_server(pair: Pair, proxy: Proxy) -> None:
    # Odd spacing, key order and an unknown key: what the server answers to these very
    # bytes, through lbproxy and directly, must be the same.
    raw = (
        b'{ "prompt":"Short %s",  "model" : "%s", "max_tokens":8, "temperature":0,'
        b'"echo":true ,"logprobs":1, "vendor_extra":{"k":[1, 2]} }'
    ) % (uuid.uuid4().hex[:8].encode(), pair.model.encode())
    assert len(raw) < MIN_PROMPT_TOKENS * 4
    before = Counters.read(pair, proxy)
    headers = {"Content-Type": "application/json"}
    via = httpx.post(f"{proxy.url}/v1/completions", content=raw, headers=headers, timeout=120)
    assert via.status_code == 200, via.text
    assert via.headers["x-lbproxy-backend"] == DECODE
    delta = Counters.read(pair, proxy).minus(before)
    assert delta.lbproxy == {"mode=aggregated,pool=real-pd,reason=short_prompt": 1}, delta
    assert delta.prefill == {}, f"the prefill server computed something: {delta.prefill}"
    assert delta.decode.get("source=local_compute", 0) > 0
    direct = httpx.post(f"{pair.decode}/v1/completions", content=raw, headers=headers, timeout=60)
    assert direct.status_code == 200, direct.text
    assert _strip(via.json()) == _strip(direct.json())
    assert via.json()["choices"][0]["text"].startswith("Short ")  # echo: the prompt as sent


# ---------------------------------------------------------------- 3. client fields


def test_client_fields_reach_the_decode_leg(pair: Pair, proxy: Proxy) -> None:
    prompt = _long_text("fields")
    body: dict[str, Any] = {
        "model": pair.model,
        "prompt": prompt,
        "max_tokens": 24,
        "temperature": 0,
    }
    # What the prompt gives without a stop, from the prefill server alone (aggregated
    # there: the decode server's cache stays cold, so the split request must pull).
    ref = httpx.post(f"{pair.prefill}/v1/completions", json=body, timeout=120).json()
    ref_text = ref["choices"][0]["text"]
    # A stop string that first occurs inside the text (not at its start, not at its end).
    stop = next(
        (ref_text[i : i + 3] for i in range(4, len(ref_text) - 4) if ref_text[i : i + 3].strip()
         and ref_text.find(ref_text[i : i + 3]) == i),
        None,
    )  # fmt: skip
    assert stop, f"no usable stop string in {ref_text!r}"
    before = Counters.read(pair, proxy)
    rid = _rid()
    out = proxy.client().completions.create(
        **body,
        stop=[stop],
        logprobs=2,
        top_p=0.9,
        user="real-pd-test",
        seed=7,
        extra_headers={"X-Request-Id": rid},
    )
    c = out.choices[0]
    assert out.usage is not None
    delta = Counters.read(pair, proxy).minus(before)
    _assert_split(proxy, rid, delta, out.usage.prompt_tokens)
    # stop: the text ends where the stop string began (the prefill leg has max_tokens 1
    # and no stop: the decode leg got the client's).
    assert c.finish_reason == "stop" and c.text == ref_text[: ref_text.index(stop)], (
        c.text,
        ref_text,
        stop,
    )
    assert out.usage.completion_tokens > 1
    # logprobs: one entry per generated token, each with its 2 best alternatives.
    assert c.logprobs is not None and c.logprobs.top_logprobs is not None
    assert len(c.logprobs.tokens or []) == out.usage.completion_tokens
    assert all(len(t) >= 1 for t in c.logprobs.top_logprobs)
    assert max(len(t) for t in c.logprobs.top_logprobs) == 2

    # chat: logprobs / top_logprobs and max_completion_tokens
    before = Counters.read(pair, proxy)
    rid = _rid()
    chat = proxy.client().chat.completions.create(
        extra_headers={"X-Request-Id": rid},
        model=pair.model,
        messages=[{"role": "user", "content": _long_text("chat-fields")}],
        max_completion_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    delta = Counters.read(pair, proxy).minus(before)
    assert chat.usage is not None and chat.usage.completion_tokens == 6
    _assert_split(proxy, rid, delta, chat.usage.prompt_tokens)
    lp = chat.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 6
    assert all(len(t.top_logprobs) == 3 for t in lp.content)
    log(f"fields: stop {stop!r} -> {c.text!r}; logprobs per token; chat top_logprobs 3")
