"""lbproxy in front of two real vLLM 0.32 servers (the CPU build, a tiny local model).

Opt-in and heavy: deselected by default (pyproject's `addopts`), run with

    scripts/real_vllm/setup.sh                   # once: venv + model in ~/.cache/lbproxy-real-vllm
    pytest -m real_vllm tests/test_real_vllm.py  # starts both servers, tests, stops them

or with servers already running (`scripts/real_vllm/start_servers.sh`, then
`LBPROXY_REAL_VLLM_URLS=http://127.0.0.1:8101,http://127.0.0.1:8102 pytest -m real_vllm`;
they are left running). `LBPROXY_REAL_VLLM_DIR` points at another setup directory.
Skipped, with the reason, when neither running servers nor a setup are found.

lbproxy runs in this process (the vLLM servers are separate process trees, so its ZMQ
subscriber is not their parent's) with `precise-cache-aware` routing, the tiny model's
tokenizer and each server's KV-event endpoints, read from the server itself
(`GET /kv_event_sources`). What is checked:

1. the metrics scraper reads both servers: block size and KV blocks from
   `vllm:cache_config_info`, running / waiting requests and KV use, also in lbproxy's
   own `/metrics`;
2. after some distinct long prompts (enough to make the servers evict), a long chat
   prompt sent once and then repeated goes back to the server that cached it every time,
   with prefix speculation off (so only the KV events can tell), and that server reports
   the cached prefix in `usage.prompt_tokens_details.cached_tokens`;
3. the precise index holds, per server, exactly the block hashes that a replay of the
   server's whole event history (from seq 0, through its replay endpoint, decoded with
   `lbproxy.signals.kv_events.decode_batch`, stored minus removed as a multiset) says
   the server holds, with no gap forgotten and no event it could not apply; each server
   has published before lbproxy started, so its subscriber must have fetched that history
   through the replay endpoint;
4. lbproxy's token ids of the prompts equal the server's `/tokenize`, and precise-prefix's
   keys of the repeated prompt are all in the index for the server that cached it (keys
   the index derived from the token ids in vLLM's own events).

"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

import httpx
import pytest
import zmq

from lbproxy.config import parse_config
from lbproxy.proxy.app import RunningProxy, start_proxy
from lbproxy.proxy.pools import PoolRuntime
from lbproxy.routing.plugins.precise_prefix import SHARED_KEY, PrecisePrefixScorer
from lbproxy.routing.precise_index import PreciseIndex
from lbproxy.routing.state import RequestContext
from lbproxy.signals.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch
from lbproxy.signals.kv_subscriber import parse_replay_reply
from tests.conftest import LoopThread

pytestmark = [pytest.mark.real_vllm, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
START_SCRIPT = REPO / "scripts" / "real_vllm" / "start_servers.sh"
REAL_DIR = Path(
    os.environ.get("LBPROXY_REAL_VLLM_DIR") or Path.home() / ".cache" / "lbproxy-real-vllm"
)
CHAT = "/v1/chat/completions"
FILLERS = 8  # distinct long prompts sent before the repeated one (256 blocks > 2 x 128)
REPEATS = 5  # the repeated prompt: sent once, then this many times more
PROMPT_TOKENS = 1000  # about; below max_model_len (2048) with room for the answer
WORDS = (
    "the model server cache prefix block route token queue latency memory fleet "
    "engine batch river stone cloud forest garden window ocean red green blue quick "
    "slow bright dark early late first last alpha beta gamma delta answer question"
)


def log(msg: str) -> None:
    print(f"[real-vllm] {msg}", flush=True)


# ---------------------------------------------------------------- the servers


@dataclass
class Server:
    name: str
    url: str
    kv_endpoint: str  # as given to vLLM: tcp://*:PORT (vLLM binds, we connect)
    topic: str
    replay_endpoint: str


@dataclass
class Fleet:
    model: str
    tokenizer: Path
    servers: list[Server]
    started_here: bool = False
    notes: dict[str, Any] = field(default_factory=dict)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REAL_VLLM_DIR": str(REAL_DIR)}
    return subprocess.run(
        ["bash", str(START_SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _describe(index: int, url: str) -> Server:
    """A server's KV-event config, as it reports it (GET /kv_event_sources)."""
    r = httpx.get(f"{url}/kv_event_sources", timeout=5)
    if r.status_code != 200:
        pytest.skip(f"{url}/kv_event_sources: HTTP {r.status_code} (KV events not enabled?)")
    sources = r.json()
    cfg = sources.get("0") or next(iter(sources.values()), None)
    if not cfg or not cfg.get("enable_kv_cache_events"):
        pytest.skip(f"{url}: KV-cache events are not enabled ({sources})")
    endpoint, replay = cfg.get("endpoint", ""), cfg.get("replay_endpoint")
    if "*" not in endpoint or not replay or "*" not in replay:
        pytest.skip(
            f"{url}: needs wildcard KV-event and replay endpoints (tcp://*:PORT), as "
            f"scripts/real_vllm/start_servers.sh sets; it has {endpoint!r} / {replay!r}"
        )
    return Server(f"vllm-{index}", url, endpoint, cfg.get("topic", ""), replay)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    started = False
    env_urls = os.environ.get("LBPROXY_REAL_VLLM_URLS", "")
    if env_urls:
        urls = [u.strip().rstrip("/") for u in env_urls.split(",") if u.strip()]
        down = [u for u in urls if not _up(u)]
        if down:
            pytest.skip(f"LBPROXY_REAL_VLLM_URLS: not reachable: {', '.join(down)}")
    else:
        info = REAL_DIR / "run" / "servers.json"
        urls = [s["url"] for s in json.loads(info.read_text())["servers"]] if info.is_file() else []
        if not urls or not all(map(_up, urls)):
            if (
                not (REAL_DIR / "venv" / "bin" / "python").exists()
                or not (REAL_DIR / "tiny-llama" / "config.json").is_file()
            ):
                pytest.skip(
                    f"vLLM is not installed in {REAL_DIR}: run scripts/real_vllm/setup.sh "
                    "(3.5 GB, a few minutes) or set LBPROXY_REAL_VLLM_DIR / "
                    "LBPROXY_REAL_VLLM_URLS"
                )
            log(f"starting two vLLM servers from {REAL_DIR} (1-3 minutes)")
            t0 = time.monotonic()
            started = True
            try:
                done = _run_script("start", timeout=1200)
            except subprocess.TimeoutExpired:
                _run_script("stop", timeout=120)
                pytest.fail("scripts/real_vllm/start_servers.sh did not finish in 1200 s")
            if done.returncode != 0:
                _run_script("stop", timeout=120)
                pytest.fail(f"start_servers.sh failed:\n{done.stdout}\n{done.stderr}")
            log(f"servers up in {time.monotonic() - t0:.0f} s")
            urls = [s["url"] for s in json.loads(info.read_text())["servers"]]
    if len(urls) < 2:
        pytest.skip(f"needs two vLLM servers, got {urls}")
    try:
        servers = [_describe(i, u) for i, u in enumerate(urls)]
        models = {httpx.get(f"{u}/v1/models", timeout=5).json()["data"][0]["id"] for u in urls}
        assert len(models) == 1, f"the servers serve different models: {models}"
        tokenizer = Path(os.environ.get("LBPROXY_REAL_VLLM_TOKENIZER") or REAL_DIR / "tiny-llama")
        if not (tokenizer / "tokenizer.json").is_file() and not tokenizer.is_file():
            pytest.skip(f"no tokenizer.json at {tokenizer} (set LBPROXY_REAL_VLLM_TOKENIZER)")
        yield Fleet(models.pop(), tokenizer, servers, started)
    finally:
        if started:
            done = _run_script("stop", timeout=180)
            log(f"servers stopped (rc {done.returncode})")


# ---------------------------------------------------------------- lbproxy in front


@dataclass
class Proxy:
    running: RunningProxy
    pool: PoolRuntime
    index: PreciseIndex
    scorer: PrecisePrefixScorer


@pytest.fixture(scope="module")
def proxy(fleet: Fleet, loop_thread: LoopThread) -> Iterator[Proxy]:
    cfg = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "pools": [
            {
                "name": "real",
                "models": [fleet.model],
                # precise-cache-aware, with speculation off: a repeat can only find the
                # server that cached its prompt through that server's KV events.
                "routing": {
                    "profile": "precise-cache-aware",
                    "scorers": [
                        {"type": "precise-prefix", "weight": 3, "speculative_ttl": 0},
                        {"type": "queue", "weight": 2},
                        {"type": "kv-cache-util", "weight": 2},
                    ],
                },
                "tokenizer": str(fleet.tokenizer),
                "backends": [
                    {
                        "url": s.url,
                        "name": s.name,
                        "vendor": "vllm-cpu",
                        "kv_events": {
                            "endpoint": s.kv_endpoint,
                            "topic": s.topic,
                            "replay_endpoint": s.replay_endpoint,
                        },
                    }
                    for s in fleet.servers
                ],
            }
        ],
        "signals": {"metrics_interval": 0.5, "metrics_max_age": 5.0},
        "timeouts": {"connect": 5, "first_byte": 120, "idle": 60},
        "expose_backend_header": True,
    }
    # History from before lbproxy joins: its subscriber must fetch it through the replay
    # endpoints when the next live batch shows the gap.
    _poke(fleet, "before lbproxy")
    running = loop_thread.run(start_proxy(parse_config(cfg, "real-vllm"), seed=0))
    try:
        pool = running.state.pools.pools[0]
        index = pool.bctx.shared[SHARED_KEY]
        scorer = next(
            ws.scorer for ws in pool.router.scorers if isinstance(ws.scorer, PrecisePrefixScorer)
        )
        assert scorer.index is index
        yield Proxy(running, pool, index, scorer)
    finally:
        loop_thread.run(running.close())


def _poke(fleet: Fleet, why: str) -> None:
    """A short new prompt (a few full blocks) sent straight to each server."""
    for s in fleet.servers:
        prompt = f"{why} {uuid.uuid4().hex}: " + " ".join(WORDS.split()[::-1] * 3)
        r = httpx.post(
            f"{s.url}/v1/completions",
            json={"model": fleet.model, "prompt": prompt, "max_tokens": 1},
            timeout=120,
        )
        assert r.status_code == 200, r.text


def _wait(what: str, check: Any, timeout: float, interval: float = 0.25) -> Any:
    """Poll `check()` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- 1. metrics


def test_scraper_reads_both_servers(fleet: Fleet, proxy: Proxy) -> None:
    eps = {ep.name: ep for ep in proxy.pool.endpoints}

    def all_scraped() -> bool:
        return all(
            eps[s.name].metrics is not None and eps[s.name].metrics.block_size is not None
            for s in fleet.servers
        )

    _wait("a /metrics scrape of both servers", all_scraped, 30)
    for s in fleet.servers:
        page = httpx.get(f"{s.url}/metrics", timeout=5).text
        info = re.search(r"^vllm:cache_config_info\{([^}]*)\}", page, re.M)
        assert info, f"{s.url}/metrics has no vllm:cache_config_info"
        labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
        m = eps[s.name].metrics
        assert m is not None
        assert m.block_size == int(labels["block_size"])
        assert m.num_gpu_blocks == int(labels["num_gpu_blocks"]) > 0
        assert m.num_running is not None and m.num_waiting is not None
        assert m.kv_cache_usage is not None and 0 <= m.kv_cache_usage <= 1
        log(
            f"{s.name}: block_size {m.block_size}, num_gpu_blocks {m.num_gpu_blocks}, "
            f"running {m.num_running}, waiting {m.num_waiting}, kv use {m.kv_cache_usage}"
        )
        fleet.notes.setdefault("geometry", {})[s.name] = (m.block_size, m.num_gpu_blocks)

    text = httpx.get(f"{proxy.running.url}/metrics", timeout=5).text
    for s in fleet.servers:
        for gauge in (
            "lbproxy_backend_waiting_requests",
            "lbproxy_backend_running_requests",
            "lbproxy_backend_kv_cache_usage_ratio",
        ):
            line = re.search(rf'^{gauge}\{{[^}}]*backend="{s.name}"[^}}]*\}} (\S+)$', text, re.M)
            assert line, f"lbproxy /metrics lacks {gauge} for {s.name}"
            assert float(line.group(1)) >= 0
        ages = re.search(
            rf'^lbproxy_backend_scrape_age_seconds\{{[^}}]*backend="{s.name}"[^}}]*\}} (\S+)$',
            text,
            re.M,
        )
        assert ages and float(ages.group(1)) < 5, f"{s.name}: scrape age {ages}"


# ---------------------------------------------------------------- 2. routing


def _text(rng: Random, min_tokens: int, proxy: Proxy, head: str) -> str:
    """English-looking text of at least `min_tokens` tokens (counted with lbproxy's
    tokenizer) starting with `head`."""
    words = WORDS.split()
    assert proxy.pool.tokenize is not None
    text = head
    for _ in range(100):  # bounded: each round adds ~200 words
        text += " " + " ".join(rng.choice(words) for _ in range(200)) + "."
        if len(proxy.pool.tokenize.encode(text)) >= min_tokens:
            return text
    raise AssertionError("could not build a long enough prompt")


@dataclass
class Scenario:
    body: dict[str, Any]
    served: list[str]
    cached_tokens: list[int]
    prompt_tokens: int
    filler_bodies: list[dict[str, Any]]
    filler_served: list[str]


def _post(client: httpx.Client, url: str, route: str, body: dict[str, Any]) -> httpx.Response:
    r = client.post(url + route, json=body)
    assert r.status_code == 200, f"{route}: {r.status_code} {r.text[:300]}"
    return r


@pytest.fixture(scope="module")
def scenario(fleet: Fleet, proxy: Proxy) -> Scenario:
    """Distinct long prompts (evictions), then one long chat prompt sent 1 + REPEATS times."""
    rng = Random(7)
    run = uuid.uuid4().hex[:12]  # servers may be reused: nothing of this run is cached yet
    url = proxy.running.url
    fillers = [
        {
            "model": fleet.model,
            "prompt": _text(rng, PROMPT_TOKENS, proxy, f"Run {run}, filler {i}:"),
            "max_tokens": 8,
            "temperature": 0,
        }
        for i in range(FILLERS)
    ]
    system = _text(rng, PROMPT_TOKENS, proxy, f"Run {run}. You are a routing test.")
    body = {
        "model": fleet.model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Which server holds this prompt?"},
        ],
        "max_tokens": 8,
        "temperature": 0,
    }
    assert proxy.pool.tokenize is not None
    ids = proxy.pool.tokenize.ids_for_body(body, CHAT)
    eps = {ep.name: ep for ep in proxy.pool.endpoints}
    served: list[str] = []
    cached: list[int] = []
    filler_served: list[str] = []
    t0 = time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(180.0)) as client:
        for f in fillers:
            r = _post(client, url, "/v1/completions", f)
            filler_served.append(r.headers["x-lbproxy-backend"])
        for i in range(1 + REPEATS):
            r = _post(client, url, CHAT, body)
            served.append(r.headers["x-lbproxy-backend"])
            usage = r.json()["usage"]
            cached.append((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            prompt_tokens = usage["prompt_tokens"]
            if i == 0:  # the repeats must find the blocks through the KV events alone
                first = served[0]
                keys = proxy.index.keys_for(ids, proxy.scorer.block_size_of(eps[first]))
                _wait(
                    f"the KV events of {first} for the prompt's {len(keys)} blocks",
                    lambda first=first, keys=keys: set(keys) <= proxy.index.blocks_of(first),
                    30,
                )
    log(
        f"{FILLERS} fillers went to {collections.Counter(filler_served)}; the repeated prompt "
        f"({prompt_tokens} tokens) to {served}, cached_tokens {cached} "
        f"({time.monotonic() - t0:.1f} s)"
    )
    return Scenario(body, served, cached, prompt_tokens, fillers, filler_served)


def test_repeated_prompt_goes_back_to_the_server_that_cached_it(
    fleet: Fleet, proxy: Proxy, scenario: Scenario
) -> None:
    first = scenario.served[0]
    assert scenario.served == [first] * (1 + REPEATS), scenario.served
    assert scenario.cached_tokens[0] == 0, "the first request found its prompt cached"
    bs = proxy.index.block_size_of(first)
    assert bs is not None
    # vLLM reuses whole blocks, and at most prompt_tokens - 1 tokens (the last one is
    # recomputed for its logits).
    expect = (scenario.prompt_tokens - 1) // bs * bs
    assert scenario.cached_tokens[1:] == [expect] * REPEATS, scenario.cached_tokens
    fleet.notes["cached"] = (scenario.prompt_tokens, scenario.cached_tokens)


# ---------------------------------------------------------------- 3. index == events


def _replay_all(server: Server, timeout: float = 10.0) -> list[tuple[int, bytes]]:
    """Every batch the server still buffers, from seq 0, through its replay endpoint."""
    endpoint = server.replay_endpoint.replace("*", "127.0.0.1")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart([b"", (0).to_bytes(8, "big")])
        out: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):  # bounded; vLLM buffers 10,000 batches by default
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                raise AssertionError(f"replay from {endpoint} timed out after {len(out)} batches")
            seq, payload = parse_replay_reply(sock.recv_multipart())
            if seq == -1:
                return out
            out.append((seq, payload))
        raise AssertionError("replay did not end")
    finally:
        sock.close(0)
        ctx.term()


@dataclass
class History:
    batches: int
    last_seq: int
    held: collections.Counter[int]
    stored: int
    removed: int
    cleared: int


def _history(server: Server) -> History:
    batches = _replay_all(server)
    seqs = [s for s, _ in batches]
    assert seqs == list(range(len(seqs))), (
        f"{server.name}: the replay does not cover the history from seq 0 "
        f"(first {seqs[:3]}, {len(seqs)} batches)"
    )
    held: collections.Counter[int] = collections.Counter()
    stored = removed = cleared = 0
    for _, payload in batches:
        for e in decode_batch(payload).events:
            if isinstance(e, BlockStored):
                assert (e.medium or "GPU").upper() == "GPU" and not e.group_idx and not e.lora_id
                hashes = list(e.block_hashes)
                if e.parent_block_hash is None and held[hashes[0]] > 0:
                    # kv_cache_report_mode=full re-announces reused blocks: not new copies
                    hashes = [h for h in hashes if held[h] == 0]
                held.update(hashes)
                stored += len(hashes)
            elif isinstance(e, BlockRemoved):
                for h in e.block_hashes:
                    assert held[h] > 0, f"{server.name}: BlockRemoved of {h}, never stored"
                    held[h] -= 1
                    removed += 1
            elif isinstance(e, AllBlocksCleared):
                held.clear()
                cleared += 1
    held = +held  # drop zero counts
    return History(len(batches), seqs[-1] if seqs else -1, held, stored, removed, cleared)


def test_index_matches_the_servers_kv_event_history(
    fleet: Fleet, proxy: Proxy, scenario: Scenario
) -> None:
    sub = proxy.running.state.kv_subscriber
    assert sub is not None
    _poke(fleet, "live batch")  # each server publishes again: lbproxy sees any gap now
    total_removed = 0
    for s in fleet.servers:
        source = f"real/{s.name}"
        hist = _history(s)
        # lbproxy may still be applying the last batches: wait until it has seen them.
        want = set(hist.held)
        _wait(
            f"lbproxy to apply {s.name}'s events up to seq {hist.last_seq}",
            lambda s=s, want=want: proxy.index.engine_hashes_of(s.name) == want,
            20,
        )
        hist = _history(s)  # nothing runs now: the history must not have moved on
        ours = proxy.index.engine_hashes_of(s.name)
        assert ours == set(hist.held), (
            f"{s.name}: index has {len(ours)} hashes, events say {len(hist.held)}: "
            f"{len(ours - set(hist.held))} extra, {len(set(hist.held) - ours)} missing"
        )
        assert sub.forgets[source] == 0 and sub.decode_errors[source] == 0
        assert sub.replays[source] >= 1, "lbproxy joined late but replayed nothing"
        log(
            f"{s.name}: {hist.batches} batches (seq 0..{hist.last_seq}), {hist.stored} blocks "
            f"stored, {hist.removed} removed, {hist.cleared} clears -> {len(hist.held)} held "
            f"({sum(hist.held.values())} physical); index engine hashes {len(ours)}: equal; "
            f"subscriber replays {sub.replays[source]}, gaps {sub.gaps[source]}"
        )
        fleet.notes.setdefault("history", {})[s.name] = (
            hist.batches,
            hist.stored,
            hist.removed,
            len(ours),
        )
        total_removed += hist.removed
    stats = proxy.index.stats()
    for counter in ("orphan_blocks", "malformed_events", "unknown_removed", "skipped_blocks"):
        assert stats[counter] == 0, (counter, stats)
    assert total_removed > 0, "no server evicted anything: the check saw no BlockRemoved"
    log(f"index stats: {stats}")


# ---------------------------------------------------------------- 4. tokens and keys


def test_tokenisation_and_keys_match_vllm(fleet: Fleet, proxy: Proxy, scenario: Scenario) -> None:
    tokenize = proxy.pool.tokenize
    assert tokenize is not None
    by_name = {s.name: s for s in fleet.servers}
    holder = by_name[scenario.served[0]]
    others = [s for s in fleet.servers if s is not holder]

    # Chat: rendered with the chat template, then encoded, by vLLM and by lbproxy.
    r = httpx.post(
        f"{holder.url}/tokenize",
        json={
            "model": fleet.model,
            "messages": scenario.body["messages"],
            "add_generation_prompt": True,
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    vllm_ids = r.json()["tokens"]
    ours = tokenize.ids_for_body(scenario.body, CHAT)
    assert ours == vllm_ids, "lbproxy's chat token ids differ from vLLM's /tokenize"
    assert len(vllm_ids) == scenario.prompt_tokens

    # Completions: the prompt encoded with the BOS the tokenizer adds.
    for body in scenario.filler_bodies[:3]:
        r = httpx.post(
            f"{holder.url}/tokenize",
            json={"model": fleet.model, "prompt": body["prompt"]},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert tokenize.ids_for_body(body, "/v1/completions") == r.json()["tokens"]

    # precise-prefix's keys of the repeated prompt, computed by the scorer itself from a
    # request context as the proxy builds one, are all held for the server that cached
    # it: the index derived them from the token ids in that server's BlockStored events.
    ctx = RequestContext(model=fleet.model, body=scenario.body, route=CHAT, _tokenize=tokenize)
    assert ctx.token_ids() == vllm_ids
    bs = proxy.index.block_size_of(holder.name)
    assert bs is not None
    keys = proxy.scorer.keys(ctx, bs)
    assert len(keys) == len(vllm_ids) // bs
    held = proxy.index.blocks_of(holder.name)
    missing = [i for i, k in enumerate(keys) if k not in held]
    assert not missing, f"blocks {missing} of {len(keys)} not in {holder.name}'s index"
    for other in others:
        assert keys[0] not in proxy.index.blocks_of(other.name)
    eps = {ep.name: ep for ep in proxy.pool.endpoints}
    names = [s.name for s in fleet.servers]
    scores = proxy.scorer.score(ctx, [eps[n] for n in names], time.monotonic())
    assert dict(zip(names, scores, strict=True))[holder.name] == 1.0, scores
    log(
        f"{len(vllm_ids)} token ids equal to vLLM's /tokenize; {len(keys)} precise-prefix "
        f"keys (block size {bs}) all in {holder.name}'s index"
    )


# ---------------------------------------------------------------- 5. a known gap

_FULL_REPORT = {"kv_cache_report_mode": "full"}


def test_full_report_mode_leaves_no_stale_blocks(
    fleet: Fleet, proxy: Proxy, scenario: Scenario
) -> None:
    """A prompt sent twice with `kv_cache_report_mode: full`, then evicted by other prompts
    sent straight to its server: the index must not claim more of it than vLLM holds."""
    rng = Random(11)
    run = uuid.uuid4().hex[:12]
    body = {
        "model": fleet.model,
        "prompt": _text(rng, PROMPT_TOKENS, proxy, f"Run {run}, full report mode:"),
        "max_tokens": 2,
        "temperature": 0,
        "vllm_xargs": _FULL_REPORT,
    }
    with httpx.Client(timeout=httpx.Timeout(180.0)) as client:
        first = _post(client, proxy.running.url, "/v1/completions", body)
        holder = next(s for s in fleet.servers if s.name == first.headers["x-lbproxy-backend"])
        second = _post(client, holder.url, "/v1/completions", body)
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        # Enough other prompts to evict every block of it (LRU: its blocks go first).
        blocks = int(fleet.notes.get("geometry", {}).get(holder.name, (32, 128))[1])
        for i in range(blocks * 32 // PROMPT_TOKENS + 2):
            filler = {
                "model": fleet.model,
                "prompt": _text(rng, PROMPT_TOKENS, proxy, f"Run {run}, evict {i}:"),
                "max_tokens": 2,
                "temperature": 0,
            }
            _post(client, holder.url, "/v1/completions", filler)
        hist = _history(holder)
        _wait(
            f"lbproxy to apply {holder.name}'s events",
            lambda: proxy.index.engine_hashes_of(holder.name) >= set(hist.held),
            20,
        )
        assert proxy.pool.tokenize is not None
        ids = proxy.pool.tokenize.ids_for_body(body, "/v1/completions")
        bs = proxy.index.block_size_of(holder.name) or 32
        keys = proxy.index.keys_for(ids, bs)
        claimed = proxy.index.match_keys(keys, [holder.name]).get(holder.name, 0)
        plain = {k: v for k, v in body.items() if k != "vllm_xargs"}
        again = _post(client, holder.url, "/v1/completions", plain).json()["usage"]
        cached = (again.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    log(f"full report mode: index claims {claimed} blocks, vLLM had {cached // bs}")
    assert claimed * bs <= cached, (
        f"the index claims {claimed} blocks of the prompt on {holder.name}, vLLM had "
        f"{cached // bs} cached"
    )
