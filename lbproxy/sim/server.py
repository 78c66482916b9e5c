"""A simulated vLLM 0.32 OpenAI-compatible server: one `Engine` driven in (scaled) real time.

The driver task sleeps until the engine's step in flight ends (an arriving request wakes it
early), completes every due step one by one, hands their tokens to the waiting handlers and
publishes each step's KV events as one batch. Engine time runs at `speed` x wall time since
start. When the process cannot keep up, the engine's timeline stays right and tokens reach
the clients late, several per SSE chunk.

Faithful to a real vLLM (shapes from a captured 0.32 server): `/health`, `/v1/models`,
`/v1/completions`, `/v1/chat/completions` (stream or not), `/v1/embeddings`, `/tokenize`,
`/detokenize`, `/metrics`, `/reset_prefix_cache`, error bodies, SSE framing, and KV events
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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import random
import time
import zlib
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client.utils import floatToGoString

from lbproxy.sim.engine import Engine, EngineRequest, TokenOutput
from lbproxy.sim.hardware import HardwareProfile, load_profile
from lbproxy.tokenization import ChatTemplateError, Tokenizer, default_tokenizer

__all__ = ["KVEventPublisher", "SimServer", "SimServerHandle", "start_sim_server"]

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
SYSTEM_FINGERPRINT = f"vllm-{VLLM_VERSION}-lbproxysim"  # vLLM: vllm-<version>-<8 hex>
EMBEDDING_DIM = 384
EOS_MIN, EOS_MAX = 16, 256  # simulated EOS length range when max_tokens is absent

# vLLM's histogram buckets (vllm/v1/metrics/loggers.py, as in the captured /metrics).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")

_JSON = "application/json"
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # prometheus_client's
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"


# ------------------------------------------------------------------------------- errors
class ApiError(Exception):
    """Answered as vLLM's `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        err_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.err_type, self.param = status, err_type, param

    def response(self) -> web.Response:
        body = {"error": {"message": str(self), "type": self.err_type, "param": self.param,
                          "code": self.status}}  # fmt: skip
        return web.Response(status=self.status, body=orjson.dumps(body), content_type=_JSON)


@web.middleware
async def _errors(request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status in (404, 405):  # FastAPI's shape for unknown routes
            body = orjson.dumps({"detail": exc.reason})
            return web.Response(status=exc.status, body=body, content_type=_JSON)
        raise


# ------------------------------------------------------------------------------- metrics
class _Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(bounds) + 1)  # per bucket, the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


def _labels(**kv: str) -> str:
    # prometheus_client prints labels in declaration order; vLLM declares them sorted.
    esc = {
        k: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in kv.items()
    }
    return "{" + ",".join(f'{k}="{esc[k]}"' for k in sorted(esc)) + "}"


def _family(out: list[str], name: str, kind: str, help_: str) -> None:
    out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n")


def _created(out: list[str], name: str, help_: str, labels: str, created: float) -> None:
    _family(out, f"{name}_created", "gauge", help_)
    out.append(f"{name}_created{labels} {floatToGoString(created)}\n")


# ------------------------------------------------------------------------------- KV events
class KVEventPublisher:
    """vLLM's ZmqEventPublisher: PUB frames (topic, 8-byte big-endian seq, msgpack batch).

    Binds when the endpoint holds `*`, `::` or `0.0.0.0` (or is ipc/inproc), else connects,
    as vLLM does. The optional replay ROUTER answers `[b"", start_seq]` with one
    `[b"", seq, payload]` per buffered batch from start_seq on, then `[b"", -1, b""]`.
    `publish` never blocks: a PUB drops at its high-water mark.
    """

    END_SEQ = (-1).to_bytes(8, "big", signed=True)

    def __init__(
        self,
        endpoint: str,
        topic: str = "kv-events",
        replay_endpoint: str | None = None,
        *,
        buffer_steps: int = 1000,
        hwm: int = 100_000,
        dp_rank: int = 0,
    ) -> None:
        from lbproxy.signals import kv_events  # the wire format lives with its decoder

        self._wire = kv_events
        self.topic = topic
        self._topic = topic.encode()
        self._seq = 0
        self._dp_rank = dp_rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._pub = zmq.Context.instance().socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        binds = any(s in endpoint for s in ("*", "::", "0.0.0.0")) or endpoint.startswith(
            ("ipc://", "inproc://")
        )
        try:
            if binds:
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
        except zmq.ZMQError as exc:
            self._pub.close()
            raise ValueError(f"kv events endpoint {endpoint!r}: {exc}") from exc
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT) if binds else endpoint
        self.replay_endpoint: str | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        if replay_endpoint:
            router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            try:
                router.bind(replay_endpoint)
            except zmq.ZMQError as exc:
                router.close()
                self._pub.close()
                raise ValueError(f"kv events replay endpoint {replay_endpoint!r}: {exc}") from exc
            self._router = router
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: Sequence[Any], ts: float | None = None) -> None:
        """Send one batch (engine events: BlockStored / BlockRemoved / AllBlocksCleared)."""
        wire = self._wire
        converted: list[Any] = []
        for ev in events:
            kind = type(ev).__name__
            if kind == "BlockStored":
                converted.append(
                    wire.vllm_block_stored(
                        ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size
                    )
                )
            elif kind == "BlockRemoved":
                # vLLM 0.32 sends one BlockRemoved per evicted block.
                converted.extend(wire.vllm_block_removed([h]) for h in ev.block_hashes)
            elif kind == "AllBlocksCleared":
                converted.append(wire.AllBlocksCleared())
        payload = wire.encode_batch(time.time() if ts is None else ts, converted, self._dp_rank)
        seq = self._seq
        self._seq = seq + 1
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), zmq.NOBLOCK)
        self._buffer.append((seq, payload))

    async def _serve_replay(self) -> None:
        router = self._router
        assert router is not None
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3:
                log.warning("invalid KV-event replay request: %d frames", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await router.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            await router.send_multipart((client, b"", self.END_SEQ, b""))

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        if self._router is not None:
            self._router.close()
        self._pub.close()


# ------------------------------------------------------------------------------- requests
class _Live:
    """One request in the engine, shared by the driver (producer) and its handler."""

    __slots__ = ("arrival", "cached", "eos", "finished", "ids", "interval", "last", "reason",
                 "req", "sent", "stream", "waiter")  # fmt: skip

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


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def _rid() -> str:
    return os.urandom(8).hex()


def _int_param(body: dict[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{key} must be an integer, got {value!r}", param=key)
    if value < minimum:
        raise ApiError(f"{key} must be at least {minimum}, got {value}.", param=key)
    return value


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
    ) -> None:
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
        self._created = time.time()
        self._ttft = _Histogram(TTFT_BUCKETS)
        self._itl = _Histogram(ITL_BUCKETS)
        self._e2e = _Histogram(E2E_BUCKETS)
        self._success = dict.fromkeys(FINISH_REASONS, 0)
        self._model_json = orjson.dumps(model)
        self.app = self._make_app()

    # ---------------------------------------------------------------- lifecycle
    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
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
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
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
        for out in outputs:
            st = live.get(out.request_id)
            if st is None:
                continue
            t = out.time
            if st.last < 0:
                self._ttft.observe(t - st.arrival)
                st.cached = out.num_cached_tokens
            else:
                self._itl.observe(t - st.last)
            st.last = t
            st.ids.extend(out.new_token_ids)
            if out.finished:
                reason = out.finish_reason or "stop"
                if st.eos and reason == "length":
                    reason = "stop"
                st.reason = reason
                st.finished = True
                self._e2e.observe(t - st.arrival)
                self._success[reason] = self._success.get(reason, 0) + 1
                del live[out.request_id]
            elif not st.stream or (st.sent and len(st.ids) - st.sent < st.interval):
                continue  # nothing to send yet: the first token goes out at once
            _wake(st.waiter)

    # ---------------------------------------------------------------- engine access
    def _submit(
        self, prompt: list[int], max_tokens: int, min_tokens: int, stream: bool, eos: bool
    ) -> _Live:
        if self._closing:
            raise ApiError("server is shutting down", 503, "ServiceUnavailableError")
        self._next_id += 1
        now = self.now()
        req = EngineRequest(str(self._next_id), prompt, max_tokens, min_tokens, now)
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
        self._success["abort"] += 1
        _wake(st.waiter)

    async def _wait(self, st: _Live) -> None:
        assert self._loop is not None
        fut = st.waiter = self._loop.create_future()
        await fut

    # ---------------------------------------------------------------- parsing
    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(f"JSON decode error: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model:
            raise ApiError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")
        return body

    def _check_ids(self, ids: list[Any]) -> list[int]:
        vocab = self.tokenizer.vocab_size
        # Cheap whole-list checks first (prompts run to thousands of ids), details after.
        if all(type(t) is int for t in ids) and (not ids or (min(ids) >= 0 and max(ids) < vocab)):
            return ids
        for t in ids:
            if type(t) is not int:
                raise ApiError(f"token ids must be integers, got {t!r}", param="prompt")
            if not 0 <= t < vocab:
                raise ApiError(f"Token id {t} is out of vocabulary", param="prompt")
        return ids

    def _prompt_ids(self, body: dict[str, Any], key: str = "prompt") -> list[int]:
        prompt = body.get(key)
        add_special = body.get("add_special_tokens", True) is not False
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special)
        elif (
            isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
        ):
            raise ApiError(
                "batched prompts are not supported by the simulator; send one prompt per request",
                param=key,
            )
        elif isinstance(prompt, list):
            ids = self._check_ids(prompt)
        else:
            raise ApiError(f"{key} must be a string, a list of token ids or a list of strings")
        if not ids:
            raise ApiError("Prompt cannot be empty", param=key)
        return ids

    def _chat_ids(self, body: dict[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("messages must be a non-empty list", param="messages")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ApiError("chat_template_kwargs must be an object", param="chat_template_kwargs")
        try:
            text = self.tokenizer.render_chat(
                messages,
                add_generation_prompt=body.get("add_generation_prompt", True) is not False,
                tools=body.get("tools"),
                **kwargs,
            )
        except ChatTemplateError as exc:
            raise ApiError(str(exc), param="messages") from None
        add_special = body.get("add_special_tokens", False) is True
        return self.tokenizer.encode(text, add_special_tokens=add_special)

    def _limits(self, body: dict[str, Any], prompt: list[int], chat: bool) -> tuple[int, int, bool]:
        """(max_tokens for the engine, min_tokens, simulated EOS?) with vLLM's checks."""
        n = body.get("n")
        if n is not None and n != 1:
            raise ApiError("n > 1 is not supported by the simulator", param="n")
        if body.get("stream_options") is not None and not body.get("stream"):
            raise ApiError("Stream options can only be defined when `stream=True`.")
        max_tokens = _int_param(body, "max_completion_tokens", 1) if chat else None
        if max_tokens is None:
            max_tokens = _int_param(body, "max_tokens", 1)
        min_tokens = _int_param(body, "min_tokens", 0) or 0
        plen, limit = len(prompt), self.max_model_len
        if plen >= limit:
            raise ApiError(
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {plen} input tokens. Please reduce the length of the input messages."
            )
        room = limit - plen
        if max_tokens is not None:
            if max_tokens > room:
                raise ApiError(
                    f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
                    f"model's maximum context length is {limit} tokens and your request has "
                    f"{plen} input tokens ({max_tokens} > {limit} - {plen})."
                )
            if min_tokens > max_tokens:
                raise ApiError(
                    f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                    f"got {min_tokens}."
                )
            return max_tokens, min_tokens, False
        if body.get("ignore_eos"):
            return room, min_tokens, False
        # Simulated EOS: a length the same prompt always gets (like greedy decoding would).
        h = zlib.crc32(array("q", prompt).tobytes(), self.seed & 0xFFFFFFFF)
        if isinstance(body.get("seed"), int):
            h = zlib.crc32(str(body["seed"]).encode(), h)
        length = max(EOS_MIN + h % (EOS_MAX - EOS_MIN + 1), min_tokens)
        if length >= room:
            return room, min_tokens, False  # capped by the context: a "length" finish
        return length, min_tokens, True

    # ---------------------------------------------------------------- handlers
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        card = {
            "id": self.model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{_rid()}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        body = orjson.dumps({"object": "list", "data": [card]})
        return web.Response(body=body, content_type=_JSON)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = self._prompt_ids(body)
        return await self._generate(request, body, prompt, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = self._chat_ids(body)
        return await self._generate(request, body, prompt, chat=True)

    async def _generate(
        self, request: web.Request, body: dict[str, Any], prompt: list[int], chat: bool
    ) -> web.StreamResponse:
        max_tokens, min_tokens, eos = self._limits(body, prompt, chat)
        stream = bool(body.get("stream"))
        opts = body.get("stream_options")
        include_usage = stream and isinstance(opts, dict) and bool(opts.get("include_usage"))
        header_id = request.headers.get("X-Request-Id")
        rid = ("chatcmpl-" if chat else "cmpl-") + (header_id or _rid())
        headers = {"X-Request-Id": header_id} if header_id else None
        st = self._submit(prompt, max_tokens, min_tokens, stream, eos)
        try:
            if stream:
                return await self._stream(request, st, rid, chat, include_usage, headers)
            while not st.finished:
                await self._wait(st)
            return self._full_response(st, rid, chat, headers)
        finally:
            if not st.finished:  # cancelled (client gone) or failed mid-way
                self._abort(st)

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
        self, st: _Live, rid: str, chat: bool, headers: dict[str, str] | None
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
                                    "kv_transfer_params": None, "ec_transfer_params": None,
                                    "metrics": None}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": st.reason,
                      "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                      "prompt_token_ids": None, "routed_experts": None}  # fmt: skip
            resp = {"id": rid, "object": "text_completion", "created": created,
                    "model": self.model, "choices": [choice], "service_tier": None,
                    "system_fingerprint": SYSTEM_FINGERPRINT, "usage": self._usage(st, True),
                    "kv_transfer_params": None, "ec_transfer_params": None,
                    "metrics": None}  # fmt: skip
        return web.Response(body=orjson.dumps(resp), content_type=_JSON, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        st: _Live,
        rid: str,
        chat: bool,
        include_usage: bool,
        headers: dict[str, str] | None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**_SSE_HEADERS, **(headers or {})})
        await resp.prepare(request)
        created = int(time.time())
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        head = (b'data: {"id":"' + rid.encode() + b'","object":"' + obj + b'","created":'
                + str(created).encode() + b',"model":' + self._model_json)  # fmt: skip
        if chat:
            pre = head + b',"choices":[{"index":0,"delta":{"content":'
            mid, tail = b"}", b',"token_ids":null}]}\n\n'
            role = orjson.dumps({"id": rid, "object": "chat.completion.chunk",
                                 "created": created, "model": self.model,
                                 "choices": [{"index": 0,
                                              "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}],
                                 "prompt_token_ids": None, "prompt_text": None})  # fmt: skip
            first = b"data: " + role + b"\n\n"
            # vLLM sets stop_reason on a chat chunk only with the finish_reason.
            running = mid + b',"logprobs":null,"finish_reason":null' + tail
        else:
            pre = head + b',"choices":[{"index":0,"text":'
            mid, tail = b"", b',"prompt_token_ids":null,"token_ids":null}]}\n\n'
            first = b""
            running = b',"logprobs":null,"finish_reason":null,"stop_reason":null' + tail
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
                    parts.append(pre + orjson.dumps(self.tokenizer.decode_fast(ids)) + running)
                    await resp.write(b"".join(parts))
                    continue
                done = (mid + b',"logprobs":null,"finish_reason":"' + st.reason.encode()
                        + b'","stop_reason":null' + tail)  # fmt: skip
                parts.append(pre + orjson.dumps(self._text(st, ids)) + done)
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

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        inputs = body.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
        ):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise ApiError("input must be a string, a list of strings or token ids", param="input")
        prompts = [self._prompt_ids({"input": x}, "input") for x in inputs]
        for p in prompts:
            if len(p) >= self.max_model_len:
                raise ApiError(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your request has {len(p)} input tokens. Please reduce the length "
                    "of the input messages."
                )
        dims = _int_param(body, "dimensions", 1) or EMBEDDING_DIM
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
            vec = _embedding(p, dims)
            value: Any = base64.b64encode(array("f", vec).tobytes()).decode() if b64 else vec
            data.append({"index": i, "object": "embedding", "embedding": value})
        n = sum(len(p) for p in prompts)
        resp = {"id": f"embd-{_rid()}", "object": "list", "created": int(time.time()),
                "model": self.model, "data": data,
                "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                          "prompt_tokens_details": None}}  # fmt: skip
        return web.Response(body=orjson.dumps(resp), content_type=_JSON)

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if "messages" in body:
            ids = self._chat_ids(body)
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
        return web.Response(body=orjson.dumps(resp), content_type=_JSON)

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list):
            raise ApiError("tokens must be a list of token ids", param="tokens")
        text = self.tokenizer.decode(self._check_ids(tokens))
        return web.Response(body=orjson.dumps({"prompt": text}), content_type=_JSON)

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        # vLLM answers 200 even when running requests make the reset fail (it only logs).
        if not self.engine.reset_prefix_cache():
            log.warning("prefix cache not reset: requests are holding blocks")
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.render_metrics().encode()
        return web.Response(body=body, headers={"Content-Type": _METRICS_CONTENT_TYPE})

    # ---------------------------------------------------------------- /metrics
    def render_metrics(self) -> str:
        """vLLM's names, HELP texts, types, labels and buckets (prometheus text 0.0.4)."""
        eng = self.engine
        lab = _labels(engine="0", model_name=self.model)
        created = self._created
        out: list[str] = []
        gauges = (
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             eng.num_running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             eng.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             eng.kv_cache_usage),
        )  # fmt: skip
        for name, help_, value in gauges:
            _family(out, name, "gauge", help_)
            out.append(f"{name}{lab} {floatToGoString(value)}\n")
        counters = (
            ("vllm:prefix_cache_queries",
             "Prefix cache queries, in terms of number of queried tokens.",
             eng.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             eng.prefix_cache_hits),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
             eng.num_preemptions),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", eng.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.",
             eng.generation_tokens),
        )  # fmt: skip
        for name, help_, value in counters:
            _family(out, f"{name}_total", "counter", help_)
            out.append(f"{name}_total{lab} {floatToGoString(value)}\n")
            _created(out, name, help_, lab, created)
        name, help_ = "vllm:request_success", "Count of successfully processed requests."
        _family(out, f"{name}_total", "counter", help_)
        for reason in FINISH_REASONS:
            rl = _labels(engine="0", finished_reason=reason, model_name=self.model)
            out.append(f"{name}_total{rl} {floatToGoString(self._success[reason])}\n")
        _family(out, f"{name}_created", "gauge", help_)
        for reason in FINISH_REASONS:
            rl = _labels(engine="0", finished_reason=reason, model_name=self.model)
            out.append(f"{name}_created{rl} {floatToGoString(created)}\n")
        hists = (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
             self._ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
             self._itl),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
             self._e2e),
        )  # fmt: skip
        for name, help_, h in hists:
            _family(out, name, "histogram", help_)
            cumulative = 0
            les = [*map(floatToGoString, h.bounds), "+Inf"]
            for le, count in zip(les, h.counts, strict=True):
                cumulative += count
                bl = _labels(engine="0", le=le, model_name=self.model)
                out.append(f"{name}_bucket{bl} {floatToGoString(cumulative)}\n")
            out.append(f"{name}_count{lab} {floatToGoString(cumulative)}\n")
            out.append(f"{name}_sum{lab} {floatToGoString(h.sum)}\n")
            _created(out, name, help_, lab, created)
        _family(out, "vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
        out.append(f"vllm:cache_config_info{self._cache_config_labels()} 1.0\n")
        return "".join(out)

    def _cache_config_labels(self) -> str:
        p = self.profile
        kv_tokens = p.num_gpu_blocks * p.block_size
        return _labels(
            _block_size_resolved="True",
            block_size=str(p.block_size),
            cache_dtype="auto",
            effective_attention_block_size=str(p.block_size),
            enable_prefix_caching="True",
            engine="0",
            gpu_memory_utilization="0.92",
            is_attention_free="False",
            kv_cache_max_concurrency=str(kv_tokens / p.max_model_len),
            kv_cache_memory_bytes="None",
            kv_cache_size_tokens=str(kv_tokens),
            num_cpu_blocks="None",
            num_gpu_blocks=str(p.num_gpu_blocks),
            num_gpu_blocks_override="None",
            prefix_caching_hash_algo="xxhash",
            sliding_window="None",
            user_specified_block_size="False",
        )


def _embedding(ids: list[int], dims: int) -> list[float]:
    """A unit vector that depends only on the token ids (and is cheap: one seeded RNG)."""
    rng = random.Random(zlib.crc32(array("q", ids).tobytes()))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


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
) -> SimServerHandle:
    """Start one simulated vLLM server in the running loop (port 0: an ephemeral port).

    `profile` is a HardwareProfile, a shipped profile name or a YAML path; `tokenizer` a
    Tokenizer, a tokenizer.json path or None for the shipped one. Raises ValueError for bad
    settings and OSError when the port is taken.
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
    publisher = (
        KVEventPublisher(kv_events, kv_events_topic, kv_events_replay) if kv_events else None
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
    except BaseException:
        await runner.cleanup()
        if publisher is not None:
            await publisher.close()
        raise
    bound_port = runner.addresses[0][1]
    server.start()
    url_host = f"[{host}]" if ":" in host else host
    return SimServerHandle(f"http://{url_host}:{bound_port}", host, bound_port, server, runner)
