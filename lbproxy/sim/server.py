"""A simulated vLLM 0.32 OpenAI-compatible server: one `Engine` driven in (scaled) real time.

The driver task sleeps until the engine's step in flight ends (an arriving request wakes it
early), completes every due step one by one, hands their tokens to the waiting handlers and
publishes each step's KV events as one batch. Engine time runs at `speed` x wall time since
start. When the process cannot keep up, the engine's timeline stays right and tokens reach
the clients late, several per SSE chunk.

Faithful to a real vLLM (shapes from a captured 0.32 server): `/health`, `/v1/models`,
`/v1/completions`, `/v1/chat/completions` (stream or not), `/v1/responses` (text only,
stream or not; lbproxy.sim.responses_api), `/v1/embeddings`, `/tokenize`,
`/detokenize`, `/metrics`, `/reset_prefix_cache`, error bodies, SSE framing (with
`stream_options.continuous_usage_stats`, the usage so far in every chunk), and KV events
over ZMQ (PUB + optional ROUTER replay). Where it differs, on purpose:

- Tokens are random; the text is their decoding. Without `max_tokens` a request stops by a
  simulated EOS after a length in [16, 256] derived from its prompt (`finish_reason: stop`);
  vLLM's /v1/completions would default to 16 tokens. `ignore_eos` without `max_tokens` runs
  to `max_model_len`.
- `n` > 1 and batched prompts (several prompts in one completion request) are rejected with
  a 400; `logprobs`, sampling parameters and stop strings are accepted and ignored.
- Latency histograms are in *engine* seconds (wall seconds x speed), so a sped-up server
  reports what the simulated hardware would; counters and gauges come from the engine.
- `usage.prompt_tokens_details` is `{"cached_tokens": N}` when N > 0, as vLLM does with
  `--enable-prompt-tokens-details` (on by default here; `enable_prompt_tokens_details=False`
  gives vLLM's default `null`).
- Embeddings go through the engine as a one-token request each (so they load it like a
  prefill) and return a deterministic unit vector of 384 floats derived from the token ids.
- Block hashes are the engine's seeded xxh3 chain, not vLLM's sha256 (`cache_config_info`
  says `prefix_caching_hash_algo="xxhash"`); identical across servers with the same seed.

Prefill/decode disaggregation (`kv_role`, as vLLM's NixlConnector with kv_producer /
kv_consumer / kv_both; lbproxy.sim.kv_transfer and lbproxy.sim.side_channel). Without a role
`kv_transfer_params` is ignored and every answer is what it was. With one:

- producer/both: a non-streaming request with `kv_transfer_params.do_remote_decode` prefills,
  generates 1 token, answers with a top-level `kv_transfer_params` (NixlConnector's fields)
  and holds its blocks until a consumer pulls them over the side channel or
  `kv_hold_timeout` engine seconds pass (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT).
- consumer/both: a request with `kv_transfer_params.do_remote_prefill` pulls the blocks from
  remote_host:remote_port first; a refused or unreachable pull answers 500 before any byte
  (vLLM's default kv_load_failure_policy "fail"; vLLM may have started an SSE stream). Then
  the engine pays the transfer time and decodes without recomputing the prompt. Params
  without the remote_* fields are served by a local prefill, as vLLM does (it warns).
- /metrics adds vLLM's external prefix-cache, prompt-tokens-by-source and NIXL families.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
import uuid
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from lbproxy.aio import cancel_and_wait
from lbproxy.bind import address_in_use, probe_listen
from lbproxy.sim import responses_api, side_channel
from lbproxy.sim.engine import Engine, EngineRequest, TokenOutput
from lbproxy.sim.hardware import HardwareProfile, load_profile
from lbproxy.sim.kv_publisher import KVEventPublisher, bind_endpoint, on_host
from lbproxy.sim.kv_transfer import (
    DEFAULT_HOLD_TIMEOUT_S,
    KV_ROLES,
    HoldLedger,
    LinkTable,
    is_consumer,
    is_producer,
)
from lbproxy.sim.metrics import METRICS_CONTENT_TYPE, SimMetrics
from lbproxy.sim.openai_api import (
    EMBEDDING_DIM,
    JSON,
    SYSTEM_FINGERPRINT,
    ApiError,
    chat_ids,
    check_ids,
    embedding,
    error_middleware,
    generation_limits,
    int_param,
    models_body,
    prompt_ids,
    read_body,
    request_id,
)
from lbproxy.sim.stream_chunks import chunk_due
from lbproxy.tokenization.tokenizer import Tokenizer, default_tokenizer

__all__ = ["KVEventPublisher", "SimServer", "SimServerHandle", "start_sim_server"]

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"


# ------------------------------------------------------------------------------- requests
class _Live:
    """One request in the engine, shared by the driver (producer) and its handler."""

    __slots__ = ("arrival", "cached", "eos", "finished", "ids", "interval", "last", "pull",
                 "reason", "req", "sent", "stream", "waiter")  # fmt: skip

    def __init__(self, req: EngineRequest, arrival: float, stream: bool, interval: int, eos: bool):
        self.req = req
        self.arrival = arrival
        self.stream = stream
        self.interval = interval
        self.eos = eos  # max_tokens was our simulated EOS: report "stop", hide the EOS token
        self.ids: list[int] = []
        self.sent = 0
        self.last = -1.0
        self.cached = 0
        self.finished = False
        self.reason: str | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.pull: _Pull | None = None  # P/D consumer: blocks being read from a producer


@dataclass(slots=True)
class _Pull:
    host: str
    port: int
    request_id: str  # the producer's remote_request_id
    gbps: float


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class SimServer:
    """The aiohttp application around one Engine. Use `start_sim_server` to run one."""

    def __init__(
        self,
        profile: HardwareProfile,
        model: str,
        *,
        tokenizer: Tokenizer,
        speed: float = 1.0,
        stream_interval: int = 1,
        seed: int = 0,
        publisher: KVEventPublisher | None = None,
        enable_prompt_tokens_details: bool = True,
        kv_role: str | None = None,
        kv_hold_timeout: float = DEFAULT_HOLD_TIMEOUT_S,
        kv_links: LinkTable | None = None,
        kv_engine_id: str | None = None,
    ) -> None:
        if kv_role is not None and kv_role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {', '.join(KV_ROLES)}, got {kv_role!r}")
        if not speed > 0 or not math.isfinite(speed):
            raise ValueError(f"speed must be a positive number, got {speed!r}")
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval!r}")
        self.profile = profile
        self.model = model
        self.tokenizer = tokenizer
        self.speed = float(speed)
        self.stream_interval = stream_interval
        self.seed = seed
        self.publisher = publisher
        self.prompt_details = enable_prompt_tokens_details
        self.max_model_len = profile.max_model_len
        self.engine = Engine(profile, seed=seed, vocab_size=tokenizer.vocab_size)
        self._live: dict[str, _Live] = {}
        self._next_id = 0
        self._t0 = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._driver_wake: asyncio.Future[None] | None = None
        self._driver: asyncio.Task[None] | None = None
        self._closing = False
        self.metrics = SimMetrics()
        self._model_json = orjson.dumps(model)
        # P/D (see the module docstring).
        self.kv_role = kv_role
        self.kv_links = kv_links or LinkTable()
        self.kv_engine_id = kv_engine_id or str(uuid.uuid4())  # vLLM: a uuid4 per engine
        self.kv_ledger = (
            HoldLedger(self.kv_engine_id, kv_hold_timeout) if is_producer(kv_role) else None
        )
        self.kv_host = "127.0.0.1"
        self.side_channel: side_channel.SideChannelServer | None = None
        self._pd_session: aiohttp.ClientSession | None = None
        self._pd_tasks: set[asyncio.Task[None]] = set()
        self._expiry_timer: asyncio.TimerHandle | None = None
        self.app = self._make_app()

    # ---------------------------------------------------------------- lifecycle
    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/reset_prefix_cache", self._reset_prefix_cache)
        return app

    def start(self) -> None:
        """Start the clock and the driver task (in the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._driver = self._loop.create_task(self._drive(), name=f"sim-driver-{self.model}")

    async def stop(self) -> None:
        """End every live request (finish_reason abort) and stop the driver."""
        self._closing = True
        for st in list(self._live.values()):
            self._finish_aborted(st)
        await cancel_and_wait(self._driver)
        await self._stop_pd()
        if self.publisher is not None:
            await self.publisher.close()

    def now(self) -> float:
        """Engine time: speed x wall seconds since start."""
        assert self._loop is not None
        return (self._loop.time() - self._t0) * self.speed

    # ---------------------------------------------------------------- driver
    async def _drive(self) -> None:
        engine = self.engine
        loop = self._loop
        assert loop is not None
        while True:
            t = engine.next_event_time()
            if t is None:
                await self._sleep(loop, None)
                continue
            now = self.now()
            if t > now:
                await self._sleep(loop, (t - now) / self.speed)
                continue
            self._run_due(now)
            # Let handlers and new arrivals run before the next step, even when behind.
            await asyncio.sleep(0)

    async def _sleep(self, loop: asyncio.AbstractEventLoop, delay: float | None) -> None:
        fut = self._driver_wake = loop.create_future()
        timer = loop.call_later(delay, _wake, fut) if delay is not None else None
        try:
            await fut
        finally:
            self._driver_wake = None
            if timer is not None:
                timer.cancel()

    def _run_due(self, now: float) -> None:
        """Complete the engine steps ending by `now`, one at a time: hand out their tokens
        and publish one KV-event batch per step that produced events (as vLLM does).

        Called by the driver, and before any add/abort: those would otherwise complete the
        due steps themselves, merging their events and holding their tokens back.
        """
        engine = self.engine
        publisher = self.publisher
        while (t := engine.next_event_time()) is not None and t <= now:
            outputs = engine.step(t)
            if outputs:
                self._dispatch(outputs)
            events = engine.drain_kv_events()
            if events and publisher is not None:
                try:
                    publisher.publish(events)
                except Exception:  # a publishing fault must not stop the engine
                    log.exception("KV event publishing failed")

    def _dispatch(self, outputs: list[TokenOutput]) -> None:
        live = self._live
        metrics = self.metrics
        for out in outputs:
            st = live.get(out.request_id)
            if st is None:
                continue
            t = out.time
            if st.last < 0:
                metrics.ttft.observe(t - st.arrival)
                st.cached = out.num_cached_tokens
                if st.pull is not None:  # its KV arrived before this first token
                    self._pull_done(st)
            else:
                metrics.itl.observe(t - st.last)
            st.last = t
            st.ids.extend(out.new_token_ids)
            if out.finished:
                reason = out.finish_reason or "stop"
                if st.eos and reason == "length":
                    reason = "stop"
                st.reason = reason
                st.finished = True
                metrics.e2e.observe(t - st.arrival)
                metrics.success[reason] = metrics.success.get(reason, 0) + 1
                del live[out.request_id]
            elif not (
                st.stream
                and chunk_due(len(st.ids) - st.sent, st.interval, first=not st.sent, finished=False)
            ):
                continue  # nothing to send yet
            _wake(st.waiter)

    # ---------------------------------------------------------------- engine access
    def _submit(
        self,
        prompt: list[int],
        max_tokens: int,
        min_tokens: int,
        stream: bool,
        eos: bool,
        hold_kv: bool = False,
        remote_kv_gbps: float | None = None,
    ) -> _Live:
        if self._closing:
            raise ApiError("server is shutting down", 503, "ServiceUnavailableError")
        self._next_id += 1
        now = self.now()
        req = EngineRequest(
            str(self._next_id), prompt, max_tokens, min_tokens, now, hold_kv, remote_kv_gbps
        )
        st = _Live(req, now, stream, self.stream_interval, eos)
        self._run_due(now)
        try:
            self.engine.add_request(req, now)
        except ValueError as exc:
            raise ApiError(str(exc)) from exc
        self._live[req.request_id] = st
        _wake(self._driver_wake)
        return st

    def _abort(self, st: _Live) -> None:
        """The client went away: free the request's blocks now."""
        if st.finished:
            return
        now = self.now()
        self._run_due(now)
        if st.finished:  # it finished in a step that just completed
            return
        self.engine.abort(st.req.request_id, now)
        self._finish_aborted(st)

    def _finish_aborted(self, st: _Live) -> None:
        self._live.pop(st.req.request_id, None)
        st.finished = True
        st.reason = "abort"
        self.metrics.success["abort"] += 1
        _wake(st.waiter)

    async def _wait(self, st: _Live) -> None:
        assert self._loop is not None
        fut = st.waiter = self._loop.create_future()
        await fut

    # ---------------------------------------------------------------- P/D
    async def start_side_channel(self, host: str, port: int) -> int:
        """Start a producer's side channel on host:port (0: a free port)."""
        assert self.kv_ledger is not None
        self.kv_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        sc = side_channel.SideChannelServer(
            self.kv_ledger, self.profile.name, self.now, self._release_hold, self._abort_pull
        )
        await sc.start(host, port)
        self.side_channel = sc
        return sc.port

    async def _stop_pd(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        for task in list(self._pd_tasks):
            await cancel_and_wait(task)
        if self._pd_session is not None:
            await self._pd_session.close()
        if self.side_channel is not None:
            await self.side_channel.close()

    def _spawn(self, coro: Any) -> None:
        assert self._loop is not None
        if self._closing:  # stop() is closing the session: the producer's timeout frees
            coro.close()
            return
        task = self._loop.create_task(coro)
        self._pd_tasks.add(task)
        task.add_done_callback(self._pd_tasks.discard)

    def _hold(self, st: _Live, rid: str) -> dict[str, Any] | None:
        """Register a finished prefill's blocks for remote decode; its kv_transfer_params."""
        ledger = self.kv_ledger
        assert ledger is not None and self.side_channel is not None and self._loop is not None
        eng_id = st.req.request_id
        block_ids = self.engine.held_block_ids(eng_id)
        if block_ids is None:
            return None
        remote_id = f"{rid}-{int(eng_id):08x}"  # vLLM: the API id plus a random suffix
        n = len(st.req.prompt_token_ids)
        ledger.hold(remote_id, block_ids, n, self.now(), eng_id)
        self._arm_expiry()
        # NixlConnector.request_finished's fields, in its order (0.32 adds the last two).
        return {"do_remote_prefill": True, "do_remote_decode": False,
                "remote_block_ids": [block_ids], "remote_engine_id": self.kv_engine_id,
                "remote_request_id": remote_id, "remote_host": self.kv_host,
                "remote_port": self.side_channel.port, "tp_size": 1, "remote_num_tokens": n,
                "transfer_mode": "pull"}  # fmt: skip

    def _release_hold(self, remote_id: str) -> None:
        """Free a held request's blocks (pulled, or expired)."""
        assert self.kv_ledger is not None
        entry = self.kv_ledger.release(remote_id)
        if entry is None:
            return
        now = self.now()
        self._run_due(now)
        self.engine.release_held(entry.engine_request_id, now)
        _wake(self._driver_wake)

    def _abort_pull(self, remote_id: str) -> None:
        assert self.kv_ledger is not None
        self.kv_ledger.abort_pull(remote_id)
        self._expire_holds()

    def _expire_holds(self) -> None:
        ledger = self.kv_ledger
        if ledger is None:
            return
        for remote_id in ledger.expired(self.now()):
            self._release_hold(remote_id)
            self.metrics.nixl_expired += 1
        self._arm_expiry()

    def _arm_expiry(self) -> None:
        """One timer, for the earliest hold to run out."""
        assert self.kv_ledger is not None and self._loop is not None
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        when = self.kv_ledger.next_expiry()
        if when is not None and not self._closing:
            delay = max(0.0, when - self.now()) / self.speed + 0.001  # past it, not on it
            self._expiry_timer = self._loop.call_later(delay, self._expire_holds)

    def _session(self) -> aiohttp.ClientSession:
        if self._pd_session is None:
            self._pd_session = aiohttp.ClientSession()
        return self._pd_session

    async def _begin_pull(self, params: dict[str, Any]) -> _Pull | None:
        """Start reading a producer's blocks; None for params without the remote_* fields
        (vLLM warns and prefills locally); ApiError 500 when the read fails (vLLM's default
        kv_load_failure_policy "fail", vllm/config/kv_transfer.py)."""
        if self._closing:
            raise ApiError("server is shutting down", 503, "ServiceUnavailableError")
        host, port = params.get("remote_host"), params.get("remote_port")
        remote_id = params.get("remote_request_id")
        if not (isinstance(host, str) and host and type(port) is int and 0 < port < 65536
                and isinstance(remote_id, str) and params.get("remote_engine_id")
                and params.get("remote_block_ids")):  # fmt: skip
            log.warning("Got invalid KVTransferParams: %s. This request will not utilize "
                        "KVTransfer", params)  # fmt: skip
            return None
        try:
            answer = await side_channel.pull(
                self._session(),
                host,
                port,
                params.get("remote_engine_id"),
                remote_id,
                params.get("remote_block_ids"),
            )
        except side_channel.PullFailed as exc:
            self.metrics.nixl_failed += 1
            raise ApiError(
                f"KV load failure for request {remote_id!r}: {exc}", 500, "InternalServerError"
            ) from None
        except asyncio.CancelledError:  # the client left: the producer may have begun the read
            self._spawn(self._release_remote(_Pull(host, port, remote_id, 0.0), False))
            raise
        pull = _Pull(host, port, remote_id, 0.0)
        vendor = answer.get("vendor")
        pull.gbps = self.kv_links.gbps(
            self.profile.name, vendor if isinstance(vendor, str) else self.profile.name
        )
        return pull

    def _pull_done(self, st: _Live) -> None:
        pull, st.pull = st.pull, None
        assert pull is not None
        req = st.req
        if req.kv_transfer_s is not None:
            self.metrics.nixl_xfer.observe(req.kv_transfer_s)
            self.metrics.nixl_bytes.observe(req.kv_transfer_bytes)
        self._spawn(self._release_remote(pull, True))

    async def _release_remote(self, pull: _Pull, done: bool) -> None:
        await side_channel.release(self._session(), pull.host, pull.port, pull.request_id, done)

    # ---------------------------------------------------------------- handlers
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _models(self, request: web.Request) -> web.Response:
        return web.Response(body=models_body(self.model, self.max_model_len), content_type=JSON)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, self.model)
        prompt = prompt_ids(body, self.tokenizer)
        return await self._generate(request, body, prompt, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, self.model)
        prompt = chat_ids(body, self.tokenizer)
        return await self._generate(request, body, prompt, chat=True)

    async def _generate(
        self, request: web.Request, body: dict[str, Any], prompt: list[int], chat: bool
    ) -> web.StreamResponse:
        max_tokens, min_tokens, eos = generation_limits(
            body, prompt, chat, self.max_model_len, self.seed
        )
        stream = bool(body.get("stream"))
        opts = body.get("stream_options")
        include_usage = stream and isinstance(opts, dict) and bool(opts.get("include_usage"))
        # vLLM: continuous usage stats only together with include_usage.
        continuous = include_usage and bool(opts.get("continuous_usage_stats"))
        header_id = request.headers.get("X-Request-Id")
        rid = ("chatcmpl-" if chat else "cmpl-") + (header_id or request_id())
        headers = {"X-Request-Id": header_id} if header_id else None
        hold = False
        if self.kv_role is not None and isinstance(body.get("kv_transfer_params"), dict):
            st, hold = await self._submit_pd(
                body["kv_transfer_params"], prompt, max_tokens, min_tokens, eos, stream
            )
        else:
            st = self._submit(prompt, max_tokens, min_tokens, stream, eos)
        try:
            if stream:
                return await self._stream(
                    request, st, rid, chat, include_usage, continuous, headers
                )
            while not st.finished:
                await self._wait(st)
            kv_out = self._hold(st, rid) if hold and st.reason != "abort" else None
            return self._full_response(st, rid, chat, headers, kv_out)
        finally:
            if not st.finished:  # cancelled (client gone) or failed mid-way
                self._abort(st)

    async def _submit_pd(
        self,
        params: dict[str, Any],
        prompt: list[int],
        max_tokens: int,
        min_tokens: int,
        eos: bool,
        stream: bool,
    ) -> tuple[_Live, bool]:
        """Submit a request carrying kv_transfer_params on a server with a kv_role: a
        prefill whose blocks are held for a consumer (then True), or a decode that pulls
        them first."""
        hold = bool(params.get("do_remote_decode")) and self.kv_ledger is not None and not stream
        pull = None
        if hold:
            max_tokens, min_tokens, eos = 1, 0, False  # the prefill side generates 1 token
        elif params.get("do_remote_prefill") and is_consumer(self.kv_role):
            pull = await self._begin_pull(params)
        try:
            st = self._submit(
                prompt, max_tokens, min_tokens, stream, eos, hold, pull.gbps if pull else None
            )
        except BaseException:
            if pull is not None:
                self._spawn(self._release_remote(pull, False))
            raise
        st.pull = pull
        return st, hold

    def _usage(self, st: _Live, full: bool) -> dict[str, Any]:
        p, c = len(st.req.prompt_token_ids), len(st.ids)
        usage: dict[str, Any] = {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c}
        details = {"cached_tokens": st.cached} if self.prompt_details and st.cached else None
        if full:
            usage["prompt_tokens_details"] = details
            usage["completion_tokens_details"] = None
        elif details is not None:
            usage["prompt_tokens_details"] = details
        return usage

    def _text(self, st: _Live, ids: list[int]) -> str:
        if st.eos and st.finished and ids and st.reason == "stop":
            ids = ids[:-1]  # the simulated EOS token is special: not shown
        return self.tokenizer.decode_fast(ids)

    def _full_response(
        self,
        st: _Live,
        rid: str,
        chat: bool,
        headers: dict[str, str] | None,
        kv_params: dict[str, Any] | None = None,
    ) -> web.Response:
        text = self._text(st, st.ids)
        created = int(time.time())
        if st.reason == "abort":
            raise ApiError("The request was aborted.", 500, "InternalServerError")
        if chat:
            message = {"role": "assistant", "content": text, "refusal": None,
                       "annotations": None, "audio": None, "function_call": None,
                       "reasoning": None}  # fmt: skip
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": st.reason, "stop_reason": None, "token_ids": None,
                      "routed_experts": None}  # fmt: skip
            resp: dict[str, Any] = {"id": rid, "object": "chat.completion", "created": created,
                                    "model": self.model, "choices": [choice],
                                    "service_tier": None,
                                    "system_fingerprint": SYSTEM_FINGERPRINT,
                                    "usage": self._usage(st, True), "prompt_logprobs": None,
                                    "prompt_token_ids": None, "prompt_text": None,
                                    "kv_transfer_params": kv_params,
                                    "ec_transfer_params": None, "metrics": None}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": st.reason,
                      "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                      "prompt_token_ids": None, "routed_experts": None}  # fmt: skip
            resp = {"id": rid, "object": "text_completion", "created": created,
                    "model": self.model, "choices": [choice], "service_tier": None,
                    "system_fingerprint": SYSTEM_FINGERPRINT, "usage": self._usage(st, True),
                    "kv_transfer_params": kv_params, "ec_transfer_params": None,
                    "metrics": None}  # fmt: skip
        return web.Response(body=orjson.dumps(resp), content_type=JSON, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        st: _Live,
        rid: str,
        chat: bool,
        include_usage: bool,
        continuous: bool,
        headers: dict[str, str] | None,
    ) -> web.StreamResponse:
        """SSE chunks as vLLM writes them. With `continuous` (`stream_options:
        {"include_usage": true, "continuous_usage_stats": true}`) every chunk carries the
        request's usage so far, `{"prompt_tokens", "total_tokens", "completion_tokens"}`
        after `choices` (chat chunks add `"completion_tokens_details": null`, and the chat
        role chunk counts 0 completion tokens), as vLLM's serving_completion.py and
        serving_chat.py do; the final usage chunk follows as without it."""
        resp = web.StreamResponse(headers={**_SSE_HEADERS, **(headers or {})})
        await resp.prepare(request)
        created = int(time.time())
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        head = (b'data: {"id":"' + rid.encode() + b'","object":"' + obj + b'","created":'
                + str(created).encode() + b',"model":' + self._model_json)  # fmt: skip
        n_prompt = len(st.req.prompt_token_ids)
        if chat:
            pre = head + b',"choices":[{"index":0,"delta":{"content":'
            mid, tail = b"}", b',"token_ids":null}]'
            choice = {"index": 0, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}  # fmt: skip
            role: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk",
                                    "created": created, "model": self.model,
                                    "choices": [choice]}  # fmt: skip
            if continuous:
                role["usage"] = {"prompt_tokens": n_prompt, "total_tokens": n_prompt,
                                 "completion_tokens": 0,
                                 "completion_tokens_details": None}  # fmt: skip
            role.update(prompt_token_ids=None, prompt_text=None)
            first = b"data: " + orjson.dumps(role) + b"\n\n"
            # vLLM sets stop_reason on a chat chunk only with the finish_reason.
            running = mid + b',"logprobs":null,"finish_reason":null' + tail
            usage_end = b',"completion_tokens_details":null}}\n\n'
        else:
            pre = head + b',"choices":[{"index":0,"text":'
            mid, tail = b"", b',"prompt_token_ids":null,"token_ids":null}]'
            first = b""
            running = b',"logprobs":null,"finish_reason":null,"stop_reason":null' + tail
            usage_end = b"}}\n\n"

        def close(sent: int) -> bytes:
            """The end of a chunk after `choices`: its usage so far, when asked for."""
            if not continuous:
                return b"}\n\n"
            return (b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d'
                    % (n_prompt, n_prompt + sent, sent) + usage_end)  # fmt: skip

        try:
            while True:
                if st.sent == len(st.ids) and not st.finished:
                    await self._wait(st)
                    continue
                ids = st.ids[st.sent :]
                st.sent += len(ids)
                parts = [first] if first else []
                first = b""
                if not st.finished:
                    text = orjson.dumps(self.tokenizer.decode_fast(ids))
                    parts.append(pre + text + running + close(st.sent))
                    await resp.write(b"".join(parts))
                    continue
                done = (mid + b',"logprobs":null,"finish_reason":"' + st.reason.encode()
                        + b'","stop_reason":null' + tail)  # fmt: skip
                parts.append(pre + orjson.dumps(self._text(st, ids)) + done + close(st.sent))
                if include_usage:
                    usage = {"id": rid, "object": obj.decode(), "created": created,
                             "model": self.model, "choices": [], "usage": self._usage(st, False),
                             "system_fingerprint": SYSTEM_FINGERPRINT}  # fmt: skip
                    parts.append(b"data: " + orjson.dumps(usage) + b"\n\n")
                parts.append(_DONE)
                await resp.write(b"".join(parts))
                break
            await resp.write_eof()
        except ConnectionResetError:
            self._abort(st)  # the client went away between two chunks
        return resp

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """/v1/responses: the Responses API for text (see lbproxy.sim.responses_api)."""
        body = await read_body(request, self.model)
        chat = {k: body[k] for k in ("chat_template_kwargs",) if k in body}
        prompt = chat_ids({**chat, "messages": responses_api.chat_messages(body)}, self.tokenizer)
        limits = {"max_tokens": body.get("max_output_tokens"), "seed": body.get("seed")}
        max_tokens, min_tokens, eos = generation_limits(
            {k: v for k, v in limits.items() if v is not None},
            prompt,
            False,
            self.max_model_len,
            self.seed,
        )
        shape = responses_api.ResponseShape(body, self.model, body.get("max_output_tokens"))
        stream = bool(body.get("stream"))
        st = self._submit(prompt, max_tokens, min_tokens, stream, eos)
        try:
            if stream:
                return await self._responses_stream(request, st, shape)
            while not st.finished:
                await self._wait(st)
            if st.reason == "abort":
                raise ApiError("The request was aborted.", 500, "InternalServerError")
            message = shape.message(self._text(st, st.ids), "completed")
            resp = shape.response(
                responses_api.final_status(st.reason),
                [message],
                self._responses_usage(st),
                st.reason,
            )
            return web.Response(body=orjson.dumps(resp), content_type=JSON)
        finally:
            if not st.finished:  # cancelled (client gone) or failed mid-way
                self._abort(st)

    def _responses_usage(self, st: _Live) -> dict[str, Any]:
        cached = st.cached if self.prompt_details else 0
        return responses_api.usage(len(st.req.prompt_token_ids), len(st.ids), cached)

    async def _responses_stream(
        self, request: web.Request, st: _Live, shape: responses_api.ResponseShape
    ) -> web.StreamResponse:
        """The Responses API's SSE events (`event: <type>` + `data: {...}`), as vLLM sends
        them: created, in_progress, the message item and its text part added, one
        output_text.delta per chunk, then the done events and completed (or incomplete)."""
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        seq = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal seq
            data = orjson.dumps({"type": kind, **fields, "sequence_number": seq})
            seq += 1
            return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

        item = {"item_id": shape.msg_id, "output_index": 0, "content_index": 0}
        running = shape.response("in_progress", [], None)
        empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": None}
        parts: list[str] = []
        try:
            await resp.write(
                event("response.created", response=running)
                + event("response.in_progress", response=running)
                + event(
                    "response.output_item.added",
                    output_index=0,
                    item=shape.message("", "in_progress"),
                )
                + event("response.content_part.added", **item, part=empty_part)
            )
            while True:
                if st.sent == len(st.ids) and not st.finished:
                    await self._wait(st)
                    continue
                ids = st.ids[st.sent :]
                st.sent += len(ids)
                text = self._text(st, ids) if st.finished else self.tokenizer.decode_fast(ids)
                out = b""
                if text:
                    parts.append(text)
                    out = event("response.output_text.delta", **item, delta=text, logprobs=[])
                if not st.finished:
                    await resp.write(out)
                    continue
                if st.reason == "abort":
                    break
                full = "".join(parts)
                message = shape.message(full, "completed")
                status = responses_api.final_status(st.reason)
                final = shape.response(status, [message], self._responses_usage(st), st.reason)
                await resp.write(
                    out
                    + event("response.output_text.done", **item, text=full, logprobs=[])
                    + event("response.content_part.done", **item, part={**empty_part, "text": full})
                    + event("response.output_item.done", output_index=0, item=message)
                    + event(f"response.{status}", response=final)
                )
                break
            await resp.write_eof()
        except ConnectionResetError:
            self._abort(st)  # the client went away between two chunks
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await read_body(request, self.model)
        inputs = body.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
        ):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise ApiError("input must be a string, a list of strings or token ids", param="input")
        prompts = [prompt_ids({"input": x}, self.tokenizer, "input") for x in inputs]
        for p in prompts:
            if len(p) >= self.max_model_len:
                raise ApiError(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your request has {len(p)} input tokens. Please reduce the length "
                    "of the input messages."
                )
        dims = int_param(body, "dimensions", 1) or EMBEDDING_DIM
        if dims > EMBEDDING_DIM:
            raise ApiError(f"dimensions must be at most {EMBEDDING_DIM}", param="dimensions")
        b64 = body.get("encoding_format") == "base64"
        lives = [self._submit(p, 1, 0, False, False) for p in prompts]
        try:
            for st in lives:
                while not st.finished:
                    await self._wait(st)
        finally:
            for st in lives:
                self._abort(st)
        data = []
        for i, p in enumerate(prompts):
            vec = embedding(p, dims)
            value: Any = base64.b64encode(array("f", vec).tobytes()).decode() if b64 else vec
            data.append({"index": i, "object": "embedding", "embedding": value})
        n = sum(len(p) for p in prompts)
        resp = {"id": f"embd-{request_id()}", "object": "list", "created": int(time.time()),
                "model": self.model, "data": data,
                "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                          "prompt_tokens_details": None}}  # fmt: skip
        return web.Response(body=orjson.dumps(resp), content_type=JSON)

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await read_body(request, self.model)
        if "messages" in body:
            ids = chat_ids(body, self.tokenizer)
        elif isinstance(body.get("prompt"), str):
            add_special = body.get("add_special_tokens", True) is not False
            ids = self.tokenizer.encode(body["prompt"], add_special_tokens=add_special)
        else:
            raise ApiError("prompt (a string) or messages is required", param="prompt")
        strs = None
        if body.get("return_token_strs"):
            strs = [self.tokenizer.tokenizer.id_to_token(i) for i in ids]
        resp = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                "token_strs": strs}  # fmt: skip
        return web.Response(body=orjson.dumps(resp), content_type=JSON)

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await read_body(request, self.model)
        tokens = body.get("tokens")
        if not isinstance(tokens, list):
            raise ApiError("tokens must be a list of token ids", param="tokens")
        text = self.tokenizer.decode(check_ids(tokens, self.tokenizer.vocab_size))
        return web.Response(body=orjson.dumps({"prompt": text}), content_type=JSON)

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        # vLLM answers 200 even when running requests make the reset fail (it only logs).
        if not self.engine.reset_prefix_cache():
            log.warning("prefix cache not reset: requests are holding blocks")
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.render_metrics().encode()
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    def render_metrics(self) -> str:
        """This server's /metrics page (prometheus text 0.0.4, vLLM's families)."""
        text = self.metrics.render(self.engine, self.profile, self.model)
        if self.kv_role is None:
            return text
        return text + self.metrics.render_kv_transfer(self.engine, self.model)


# ------------------------------------------------------------------------------- running
@dataclass
class SimServerHandle:
    """A running simulated server; `await close()` stops it and frees its ports."""

    url: str
    host: str
    port: int
    server: SimServer
    runner: web.AppRunner

    @property
    def engine(self) -> Engine:
        return self.server.engine

    @property
    def model(self) -> str:
        return self.server.model

    @property
    def kv_side_channel_port(self) -> int | None:
        sc = self.server.side_channel
        return sc.port if sc else None

    @property
    def kv_events_endpoint(self) -> str | None:
        pub = self.server.publisher
        return pub.endpoint if pub else None

    @property
    def kv_events_replay_endpoint(self) -> str | None:
        pub = self.server.publisher
        return pub.replay_endpoint if pub else None

    async def close(self) -> None:
        await self.server.stop()
        await self.runner.cleanup()


async def start_sim_server(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    profile: str | HardwareProfile,
    model: str,
    speed: float = 1.0,
    stream_interval: int = 1,
    kv_events: str | None = None,
    kv_events_topic: str = "kv-events",
    kv_events_replay: str | None = None,
    tokenizer: Tokenizer | str | Path | None = None,
    seed: int = 0,
    enable_prompt_tokens_details: bool = True,
    kv_role: str | None = None,
    kv_side_channel_port: int = 0,
    kv_hold_timeout: float = DEFAULT_HOLD_TIMEOUT_S,
    kv_links: LinkTable | None = None,
    kv_engine_id: str | None = None,
) -> SimServerHandle:
    """Start one simulated vLLM server in the running loop (port 0: an ephemeral port).

    `profile` is a HardwareProfile, a shipped profile name or a YAML path; `tokenizer` a
    Tokenizer, a tokenizer.json path or None for the shipped one. Raises ValueError for bad
    settings and OSError when the port is taken.

    `kv_role` (producer, consumer, both; None: no P/D) makes it a P/D server (see the module
    docstring); a producer's side channel listens on `kv_side_channel_port` (0: a free port)
    on the same host.
    """
    prof = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
    if tokenizer is None:
        tok = default_tokenizer()
    elif isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = Tokenizer.from_file(tokenizer)
    if kv_events_replay and not kv_events:
        raise ValueError("kv_events_replay needs kv_events (the PUB endpoint) too")
    # A taken port fails before the KV sockets are bound and the engine built.
    await probe_listen(host, port)
    publisher = None
    if kv_events:
        publisher = KVEventPublisher(
            on_host(kv_events, host),
            kv_events_topic,
            on_host(kv_events_replay, host) if kv_events_replay else None,
            bind=bind_endpoint(kv_events),  # vLLM's rule, on the endpoint as given
        )
    try:
        server = SimServer(
            prof,
            model,
            tokenizer=tok,
            speed=speed,
            stream_interval=stream_interval,
            seed=seed,
            publisher=publisher,
            enable_prompt_tokens_details=enable_prompt_tokens_details,
            kv_role=kv_role,
            kv_hold_timeout=kv_hold_timeout,
            kv_links=kv_links,
            kv_engine_id=kv_engine_id,
        )
    except BaseException:
        if publisher is not None:
            await publisher.close()
        raise
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the
    # request in the engine (vLLM does the same on disconnect).
    runner = web.AppRunner(
        server.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException as e:
        await runner.cleanup()
        if publisher is not None:
            await publisher.close()
        if isinstance(e, OSError):
            raise address_in_use(e, host, port) from None
        raise
    if server.kv_ledger is not None:
        try:
            await server.start_side_channel(host, kv_side_channel_port)
        except BaseException as e:
            await runner.cleanup()
            if publisher is not None:
                await publisher.close()
            if isinstance(e, OSError):
                raise address_in_use(e, host, kv_side_channel_port) from None
            raise
    bound_port = runner.addresses[0][1]
    server.start()
    url_host = f"[{host}]" if ":" in host else host
    return SimServerHandle(f"http://{url_host}:{bound_port}", host, bound_port, server, runner)
