"""Live load generator: open-loop Poisson arrivals against an OpenAI-compatible target.

Each rate step sends the workload's requests at `stats.poisson_arrivals` times (the same
schedule `lbproxy simulate` offers), streaming, each with `ignore_eos` and
`stream_options: {"include_usage": true, "continuous_usage_stats": true}`. A request's
chunks are timed as they arrive: the first token chunk gives TTFT, the gaps between chunks
the ITL. Output tokens come from the latest `usage` the request received (vLLM, and
`lbproxy sim`, put one in every chunk with `continuous_usage_stats`), so a request cut at
the deadline counts exactly the tokens it got; only a server that sends no usage at all
makes it fall back to counting token chunks. At the step's deadline (`duration + drain`)
requests still open are cancelled, which closes their connections (the server aborts
them), and recorded as incomplete. Bounded in count (`max_requests`) and in time (the
deadline).

A response 429 or 503 (lbproxy's flow control shedding it) is recorded as "rejected"; the
`x-lbproxy-queue-wait` response header (seconds, decimal) becomes the record's
`queue_wait`. With traffic classes (`mix`, see `bench/mix.py`) each request carries its
class (`klass`) and is sent with the headers `x-tenant: <class>` and
`x-lbproxy-priority: <priority>`.

`time_scale` is for targets that run faster than real time (a simulated fleet with
`speed: X`): arrivals are sent `time_scale` times faster and every measured time is
multiplied back, so results are in the target's time and compare with `lbproxy simulate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from lbproxy.bench.mix import FLOW_HEADER, PRIORITY_HEADER, TrafficClass, class_sequence
from lbproxy.bench.report import RunResult, StepResult
from lbproxy.bench.stats import RequestRecord, poisson_arrivals, summarize_step
from lbproxy.bench.workloads import Request, Workload
from lbproxy.config import Signals
from lbproxy.sim.fleet import FleetSpec

StepProgress = Callable[[str, float, int], Callable[[int], None]]

QUEUE_WAIT_HEADER = "x-lbproxy-queue-wait"
REJECTED_STATUSES = (429, 503)  # lbproxy's answers when flow control sheds a request


@dataclass(slots=True)
class LoadOptions:
    target: str  # base URL, e.g. http://127.0.0.1:8080 (a trailing /v1 is accepted)
    model: str
    duration: float
    drain: float | None = None  # default: duration
    time_scale: float = 1.0
    max_requests: int | None = None  # per step
    seed: int = 0
    session_header: str = "x-session-id"
    headers: dict[str, str] = field(default_factory=dict)
    # Ask for usage in every chunk (vLLM's stream_options.continuous_usage_stats).
    continuous_usage: bool = True
    slo_ttft: float = 5.0
    slo_itl: float = 0.1
    warmup: float = 0.0  # seconds of each step's arrivals not counted (see summarize_step)
    mix: list[TrafficClass] | None = None

    def __post_init__(self) -> None:
        if not self.duration > 0:
            raise ValueError(f"duration must be > 0, got {self.duration}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        if self.drain is not None and self.drain < 0:
            raise ValueError(f"drain must be >= 0, got {self.drain}")
        base = self.target.rstrip("/")
        self.target = base[:-3] if base.endswith("/v1") else base


# ------------------------------------------------------------------------------ SSE
class StreamParser:
    """Sans-IO: feed the body's bytes as they arrive with the time they arrived.

    Token chunks are those with a completion `text` or a chat `delta.content` (the chat
    role announcement is not a token). `usage` is the latest usage object seen (every
    chunk's with continuous usage stats, else the final chunk's) and `completion_tokens`
    its count; an `{"error": ...}` event sets `error`. Only chunks that may carry usage,
    an error or the chat role are parsed as JSON; plain token chunks are just counted.
    """

    __slots__ = (
        "_buf",
        "chunks",
        "completion_tokens",
        "done",
        "error",
        "first",
        "gaps",
        "last",
        "usage",
    )

    def __init__(self) -> None:
        self._buf = b""
        self.chunks = 0
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []
        self.usage: dict | None = None
        self.completion_tokens: int | None = None
        self.error: str | None = None
        self.done = False

    def feed(self, data: bytes, now: float) -> None:
        buf = self._buf + data
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            self._event(buf[start:end], now)
            start = end + 2
        self._buf = buf[start:]

    def _event(self, event: bytes, now: float) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue  # comments, event names, ids
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            # Most chunks are plain tokens: parse JSON only when a chunk may be more.
            special = b'"usage"' in payload or b'"error"' in payload or b'"role"' in payload
            if special and not self._structured(payload):
                continue
            self._token(now)

    def _structured(self, payload: bytes) -> bool:
        """Parse a chunk that may carry usage, an error or the chat role; True if it is
        (also) a token chunk."""
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.error = f"malformed SSE chunk: {payload[:80]!r}"
            return False
        if not isinstance(obj, dict):
            return False
        if "error" in obj:
            err = obj["error"]
            self.error = str(err.get("message", err) if isinstance(err, dict) else err)
            return False
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            n = usage.get("completion_tokens")
            if isinstance(n, int) and not isinstance(n, bool):
                self.completion_tokens = n
        choices = obj.get("choices") or []
        if not choices:
            return False
        choice = choices[0]
        if "text" in choice:
            return True
        delta = choice.get("delta") or {}
        return "content" in delta and "role" not in delta

    def _token(self, now: float) -> None:
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.chunks += 1


# ------------------------------------------------------------------------------ requests
async def _send(
    session: aiohttp.ClientSession,
    opts: LoadOptions,
    req: Request,
    rec: RequestRecord,
    clock: Callable[[], float],
    klass: TrafficClass | None = None,
) -> None:
    url = opts.target + req.route
    headers = {"Content-Type": "application/json", **opts.headers}
    if req.session is not None:
        headers[opts.session_header] = req.session
    if klass is not None:
        headers[FLOW_HEADER] = klass.name
        headers[PRIORITY_HEADER] = str(klass.priority)
    payload = req.body(opts.model)
    stream_options = payload.get("stream_options")
    if opts.continuous_usage and isinstance(stream_options, dict):
        payload["stream_options"] = {**stream_options, "continuous_usage_stats": True}
    body = orjson.dumps(payload)
    parser = StreamParser()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            rec.backend = resp.headers.get("x-lbproxy-backend")
            wait = _seconds(resp.headers.get(QUEUE_WAIT_HEADER))
            if wait is not None:  # wall seconds of the proxy, in target time like the rest
                rec.queue_wait = wait * opts.time_scale
            if resp.status != 200:
                text = (await resp.read())[:300].decode(errors="replace")
                rejected = resp.status in REJECTED_STATUSES
                rec.status = "rejected" if rejected else "error"
                rec.error = f"HTTP {resp.status}: {text}"
                return
            async for data in resp.content.iter_any():
                parser.feed(data, clock())
            if parser.error is not None:
                rec.status, rec.error = "error", parser.error
            elif not parser.done:
                rec.status, rec.error = "error", "stream ended without [DONE]"
    except asyncio.CancelledError:
        rec.status = "incomplete"  # the deadline: the caller cancelled us
        raise
    except Exception as e:  # connection trouble, timeouts, a malformed response: one record
        rec.status, rec.error = "error", f"{type(e).__name__}: {e}"
    finally:
        rec.end = clock()
        rec.first_token = parser.first
        rec.itl = parser.gaps
        n = parser.completion_tokens
        rec.output_tokens = n if n is not None else parser.chunks
        usage = parser.usage
        if usage:
            rec.prompt_tokens = int(usage.get("prompt_tokens") or rec.prompt_tokens)
            details = usage.get("prompt_tokens_details") or {}
            rec.cached_tokens = int(details.get("cached_tokens") or 0)


def _seconds(value: str | None) -> float | None:
    """A header's decimal seconds; None when absent or not a finite number >= 0."""
    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        return None
    return v if math.isfinite(v) and v >= 0 else None


async def run_step(
    session: aiohttp.ClientSession,
    workload: Workload,
    arrivals: Sequence[float],
    opts: LoadOptions,
    *,
    first_index: int,
    advance: Callable[[int], None] | None = None,
) -> list[RequestRecord]:
    """Send one rate step; return a record per request (times from the step's start).
    With `opts.mix`, request k gets its class from `mix.class_sequence` (as in simulate)."""
    loop = asyncio.get_running_loop()
    scale = opts.time_scale
    drain = opts.duration if opts.drain is None else opts.drain
    t0 = loop.time()

    def clock() -> float:
        return (loop.time() - t0) * scale

    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []
    classes = class_sequence(opts.mix, first_index, len(arrivals), opts.seed) if opts.mix else None

    def done(_: asyncio.Task[None]) -> None:
        if advance is not None:
            advance(1)

    for k, at in enumerate(arrivals):
        delay = t0 + at / scale - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        req = workload.request(first_index + k)
        klass = classes[k] if classes is not None else None
        rec = RequestRecord(start=clock(), prompt_tokens=req.num_prompt_tokens)
        if klass is not None:
            rec.klass = klass.name
        records.append(rec)
        task = loop.create_task(_send(session, opts, req, rec, clock, klass))
        task.add_done_callback(done)
        tasks.append(task)

    remaining = t0 + (opts.duration + drain) / scale - loop.time()
    pending = [t for t in tasks if not t.done()]
    if pending and remaining > 0:
        _, still = await asyncio.wait(pending, timeout=remaining)
        pending = list(still)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return records


async def discover_model(session: aiohttp.ClientSession, target: str) -> str:
    """The first model the target lists at /v1/models."""
    async with session.get(target.rstrip("/") + "/v1/models") as resp:
        if resp.status != 200:
            raise ValueError(f"{target}/v1/models answered HTTP {resp.status}; pass --model")
        data = orjson.loads(await resp.read())
    models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
    if not models:
        raise ValueError(f"{target}/v1/models lists no model; pass --model")
    return str(models[0])


def new_session() -> aiohttp.ClientSession:
    # No connection cap: an open-loop generator must never queue requests client-side.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def bench_run(
    workload: Workload,
    rates: Sequence[float],
    opts: LoadOptions,
    *,
    profile: str,
    label: str | None = None,
    progress: StepProgress | None = None,
    session: aiohttp.ClientSession | None = None,
) -> RunResult:
    """The whole rate ladder against one target: a results.json run."""
    label = label or profile
    own = session is None
    session = session or new_session()
    steps: list[StepResult] = []
    index = 0
    try:
        for k, rate in enumerate(rates):
            arrivals = poisson_arrivals(
                rate, opts.duration, opts.seed + k, max_requests=opts.max_requests
            )
            advance = progress(label, rate, len(arrivals)) if progress else None
            records = await run_step(
                session, workload, arrivals, opts, first_index=index, advance=advance
            )
            index += len(arrivals)
            step = summarize_step(
                records,
                rate=rate,
                duration=opts.duration,
                slo_ttft=opts.slo_ttft,
                slo_itl=opts.slo_itl,
                warmup=opts.warmup,
            )
            backends: dict[str, int] = {}
            for r in records:
                if r.backend:
                    backends[r.backend] = backends.get(r.backend, 0) + 1
            if backends:
                step["backends"] = backends
            steps.append(step)  # type: ignore[arg-type]
    finally:
        if own:
            with contextlib.suppress(Exception):
                await session.close()
    return RunResult(profile=profile, label=label, target=opts.target, steps=steps)


# ------------------------------------------------------------------------------ live fleet
@contextlib.asynccontextmanager
async def live_fleet(
    fleet: FleetSpec,
    routing: str | dict[str, Any],
    *,
    speed: float | None = None,
    stream_interval: int | None = None,
    kv_events: bool = False,
    flow_control: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    """Start `fleet` as simulated vLLM servers and lbproxy in front of them, in this event
    loop, on ephemeral 127.0.0.1 ports; yield the proxy's URL.

    `speed` overrides the fleet's (engine seconds per wall second). The proxy's metrics
    interval and staleness limit are divided by the speed, so that in engine time they are
    the proxy's defaults, as `lbproxy simulate` assumes (the scrape timeout stays at least
    0.25 s of wall time). `kv_events` publishes KV events
    (on ephemeral ports) and subscribes the proxy to them, for precise-prefix routing.
    `flow_control` is the proxy config's `flow_control` section (default: lbproxy's
    defaults); its `max_wait` is in engine seconds, divided by the speed like the
    intervals above.
    """
    from lbproxy.config import parse_config
    from lbproxy.proxy.app import start_proxy
    from lbproxy.sim.fleet import start_fleet

    backends = []
    for b in fleet.backends:
        changes: dict[str, Any] = {"port": 0, "kv_events_replay": None}
        changes["kv_events"] = "tcp://127.0.0.1:*" if kv_events else None
        if speed is not None:
            changes["speed"] = speed
        if stream_interval is not None:
            changes["stream_interval"] = stream_interval
        backends.append(dataclasses.replace(b, **changes))
    spec = dataclasses.replace(fleet, backends=tuple(backends))
    handles = await start_fleet(spec)
    try:
        scale = speed if speed is not None else backends[0].speed
        defaults = Signals()
        flow = dict(flow_control) if flow_control is not None else None
        if flow is not None and "max_wait" in flow:
            flow["max_wait"] = flow["max_wait"] / scale
        entries = []
        for b, h in zip(backends, handles, strict=True):
            entry: dict[str, Any] = {"url": h.url, "name": b.name, "vendor": b.profile.name}
            if kv_events and h.kv_events_endpoint:
                # The server binds an ephemeral port; lbproxy connects to it.
                entry["kv_events"] = {
                    "endpoint": h.kv_events_endpoint,
                    "topic": b.kv_events_topic,
                    "mode": "connect",
                }
            entries.append(entry)
        cfg = parse_config(
            {
                "listen": {"host": "127.0.0.1", "port": 0},
                "pools": [
                    {
                        "name": "sim",
                        "models": [fleet.model],
                        "routing": routing,
                        "tokenizer": fleet.tokenizer or "default",
                        "backends": entries,
                    }
                ],
                "signals": {
                    "metrics_interval": defaults.metrics_interval / scale,
                    # A sped-up interval is short; a busy loop must not time scrapes out.
                    "metrics_timeout": max(0.8 * defaults.metrics_interval / scale, 0.25),
                    "metrics_max_age": defaults.metrics_max_age / scale,
                },
                "expose_backend_header": True,
                **({"flow_control": flow} if flow is not None else {}),
            },
            "live-fleet",
        )
        proxy = await start_proxy(cfg, host="127.0.0.1", port=0, seed=0)
        try:
            yield proxy.url
        finally:
            await proxy.close()
    finally:
        for h in handles:
            await h.close()
