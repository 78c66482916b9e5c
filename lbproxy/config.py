"""lbproxy's YAML configuration: loading, `${ENV}` expansion, validation, defaults.

Loading runs in stages (read, parse YAML, expand environment variables, validate the
schema, build the routing profiles) and every error is a ConfigError whose message names
the file, the key path and what is wrong, e.g.
`lbproxy.yaml: pools[0].backends[1].url: must start with http:// or https://`. Every
problem of a stage is reported at once (see lbproxy/config_errors.py for the wording).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)

from lbproxy.config_errors import format_problems, path_str, validation_problems
from lbproxy.credentials import without_credentials
from lbproxy.pool_build import PoolBuild, build_context, load_pool_tokenizer, routing_key
from lbproxy.routing.interfaces import BuildContext
from lbproxy.routing.pipeline import Router
from lbproxy.routing.plugins.precise_prefix import SHARED_KEY as PRECISE_INDEX_KEY
from lbproxy.routing.profiles import ProfileSpec, build_router
from lbproxy.routing.registry import PluginError


class ConfigError(ValueError):
    """An invalid configuration; the message names file, key path and problem (each
    problem, when there are several)."""


class _Problems:
    """The problems found by the semantic checks, all reported together."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(format_problems(self.source, self.items))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class KVEvents(_Strict):
    """Where a backend publishes KV-cache events: the values given to vLLM's
    `--kv-events-config` (`endpoint`, `topic`, `replay_endpoint`). vLLM binds a wildcard
    endpoint (`tcp://*:5557`), which lbproxy reaches at `host` (default: the backend's
    host); any other endpoint vLLM connects to, so lbproxy binds it."""

    endpoint: str
    topic: str = ""
    replay_endpoint: str | None = None
    host: str | None = None
    # auto: vLLM's rule above; connect: the publisher binds `endpoint`, lbproxy connects to
    # it as written; bind: the publisher connects, lbproxy binds `endpoint`.
    mode: Literal["auto", "connect", "bind"] = "auto"

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _zmq(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(tcp|ipc|inproc)://\S+$", v):
            raise ValueError("must be a ZMQ endpoint such as tcp://*:5557")
        return v


class Backend(_Strict):
    url: str
    name: str | None = None
    vendor: str = "unknown"
    labels: dict[str, str] = Field(default_factory=dict)
    weight: float = Field(1.0, gt=0)
    kv_events: KVEvents | None = None
    api_key: SecretStr | None = None  # sent upstream as `Authorization: Bearer <key>`
    # Prefill/decode disaggregation: what the backend serves in its pool's P/D split
    # (prefill: only the prefill leg; decode: the decode leg and aggregated requests).
    role: Literal["prefill", "decode", "both"] = "both"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must start with http:// or https:// and name a host")
        return v.rstrip("/")


def _routing_spec(v: Any) -> Any:
    """A pool's (or a P/D side's) `routing`: a profile name or an inline profile."""
    if not isinstance(v, str | dict | ProfileSpec):
        raise ValueError(
            "must be a built-in profile name or a mapping of filters, scorers and picker"
        )
    return v


class Disaggregation(_Strict):
    """Prefill/decode disaggregation for a pool (see lbproxy/routing/disagg.py): a request
    whose prompt has at least `min_prompt_tokens` uncached tokens is prefilled on a
    prefill-capable backend and decoded on a decode-capable one, each side ranked by its
    own routing profile."""

    min_prompt_tokens: int = Field(
        512, ge=0, description="uncached prompt tokens from which a request is split"
    )
    prefill_routing: str | ProfileSpec = "pd-prefill"
    decode_routing: str | ProfileSpec = "pd-decode"
    prefill_timeout: float = Field(
        60.0, gt=0, description="seconds for a prefill answer (head and body); then retried"
    )

    @field_validator("prefill_routing", "decode_routing", mode="before")
    @classmethod
    def _routing(cls, v: Any) -> Any:
        return _routing_spec(v)


class Pool(_Strict):
    name: str = Field(min_length=1)
    models: list[str] | None = None
    routing: str | ProfileSpec = "round-robin"
    # The model's tokenizer.json (or its directory), for precise-prefix routing; "default"
    # is the small tokenizer shipped for the simulator.
    tokenizer: str | None = None
    chat_template: str | None = None  # a template file; default: next to the tokenizer
    backends: list[Backend] = Field(min_length=1)
    flow_control: dict[str, Any] | None = None  # overrides of the top-level flow_control keys
    disaggregation: Disaggregation | None = None  # prefill/decode split; None: aggregated
    _flow: FlowControl | None = PrivateAttr(None)  # the merged settings, set by validation
    _built: PoolBuild | None = PrivateAttr(None)  # what validation built (pool_build.py)

    def flow(self) -> FlowControl:
        """This pool's flow-control settings (top level merged with the pool's overrides)."""
        assert self._flow is not None, "flow settings are set when the config is validated"
        return self._flow

    def take_build(self, metrics_max_age: float) -> PoolBuild | None:
        """The routing validation built for this pool, if it still matches the pool and
        nobody took it yet (else None: build it afresh)."""
        built, self._built = self._built, None
        if built is None or built.key != routing_key(self, metrics_max_age):
            return None
        return built if built.claim() else None

    @field_validator("routing", mode="before")
    @classmethod
    def _routing(cls, v: Any) -> Any:
        return _routing_spec(v)


class ConcurrencyLimit(_Strict):
    """Per-backend limit on requests in flight, used by flow control (see lbproxy/flow/).

    `gradient` (default) adapts the limit to what the backend sustains: after each fresh
    scrape, limit -> running x target_itl / itl (the batch at which the measured decode
    latency would meet `target_itl`), smoothed, growing at most x`max_growth` per scrape;
    a backend without metrics grows by one per completed request. `fixed` keeps `initial`.
    """

    type: Literal["gradient", "fixed"] = "gradient"
    initial: int = Field(16, ge=1, description="a new backend's limit, before any evidence")
    min: int = Field(2, ge=1)
    max: int = Field(1024, ge=1)
    target_itl: float = Field(
        0.09, gt=0, description="seconds per output token the gradient holds a backend to"
    )
    smoothing: float = Field(0.5, gt=0, le=1, description="share of a new estimate taken")
    max_growth: float = Field(1.5, gt=1, description="largest factor of increase per scrape")


class KeyPriority(_Strict):
    key: SecretStr
    priority: int


class FlowControl(_Strict):
    """Flow control: hold requests in lbproxy while no backend of the pool can take more
    work, dispatch them by priority, fairness between flows, then arrival; shed with 429."""

    enabled: bool = True
    max_queue: int = Field(1000, ge=0, description="requests waiting per pool; beyond: 429")
    max_wait: float = Field(30.0, gt=0, description="seconds a request may wait; then 429")
    shed_early: bool = Field(
        True, description="refuse at arrival a request whose expected wait exceeds max_wait"
    )
    priority_header: str = "x-lbproxy-priority"
    default_priority: int = 0
    # Per client key (a value of auth.api_keys) default priority, when the header is absent.
    key_priorities: list[KeyPriority] = Field(default_factory=list)
    flow_header: str | None = Field(
        None, description="fairness flow = this header's value; default: the client's API key"
    )
    # "Can take more work" thresholds; default: the pool's saturation filter's (5, 0.8).
    queue_depth: float | None = Field(None, ge=0)
    kv_cache_util: float | None = Field(None, ge=0, le=1)
    max_in_flight: int | None = Field(None, ge=1, description="hard cap per backend")
    # A request whose best backend (its prefix cached there) is full waits for it this
    # long before taking the best one that has room, unless that one's routing total is
    # within affinity_margin of the best's (a cold prefix costs a full prefill).
    affinity_wait: float = Field(2.0, ge=0)
    affinity_margin: float = Field(1.0, ge=0)
    # Share of each backend's limit that only requests of a higher band than the lowest
    # waiting, or of a flow with fewer waiting than its band's longest, may use.
    headroom: float = Field(0.1, ge=0, le=1)
    # P/D pools: a split request's prefill leg goes to a backend while the uncached prompt
    # tokens of the prefill legs in flight there drain within this many seconds at its
    # measured prefill rate (at most half of max_wait).
    prefill_wait: float = Field(2.0, gt=0)
    limit: ConcurrencyLimit = Field(default_factory=ConcurrencyLimit)


class Timeouts(_Strict):
    connect: float = Field(5.0, gt=0, description="TCP connect to a backend")
    first_byte: float = Field(600.0, gt=0, description="request sent -> response headers")
    idle: float = Field(300.0, gt=0, description="longest gap between body chunks")
    upstream_keepalive: float = Field(
        15.0, gt=0, description="an idle upstream connection is closed after this long"
    )


class Limits(_Strict):
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_attempts: int = Field(3, ge=1, le=10, description="backends tried per request")
    # aiohttp's max_line_size and max_field_size: longest request line / header field.
    max_header_bytes: int = Field(8190, ge=256, le=1024 * 1024)
    # A request that reached a backend which then failed (reset, garbage, no answer in
    # time) may have run there. OpenAI-style inference has no side effects but GPU time,
    # and the commonest such failure is a backend dying or a kept-alive connection it had
    # closed: re-running is what a client wants. Off: such a request fails with 502/504.
    retry_after_send: bool = Field(
        True, description="re-run a request on another backend after it was sent to one"
    )
    # What clients may hold (see lbproxy/proxy/client_limits.py).
    max_buffered_body_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="request bodies held at once; beyond: 503"
    )
    client_header_timeout: float = Field(
        15.0, gt=0, description="connection (or a request's first byte) -> complete headers"
    )
    client_body_timeout: float = Field(
        30.0, gt=0, description="longest gap between two pieces of a request body; then 408"
    )
    client_body_min_rate: int = Field(
        16 * 1024, ge=0, description="bytes/s a request body must average (0: no minimum)"
    )
    client_keepalive_timeout: float = Field(
        75.0, gt=0, description="an idle client connection is closed after this long"
    )
    max_client_connections: int | None = Field(
        None, ge=1, description="beyond: 503 and close; default (RLIMIT_NOFILE - 64) / 2"
    )


class Health(_Strict):
    # Off for backends without /health: the circuit breaker alone then ejects.
    active: bool = Field(True, description="GET /health on every backend each interval")
    interval: float = Field(5.0, gt=0)
    timeout: float = Field(2.0, gt=0)
    unhealthy_after: int = Field(
        2, ge=1, description="consecutive timed-out checks to eject (refused or non-2xx: at once)"
    )
    healthy_after: int = Field(1, ge=1, description="consecutive successes to re-admit")
    # Passive circuit breaker, fed by the outcome of real requests.
    failure_threshold: int = Field(3, ge=1, description="consecutive failed requests to open")
    open_seconds: float = Field(10.0, gt=0, description="open -> half-open after this long")
    # Stall detection (see signals.health): requests waiting on a backend that has sent no
    # first byte for max(stall_after, stall_factor x its recent slowest first byte) eject it.
    stall_after: float | None = Field(
        15.0, gt=0, description="seconds without a first byte before a backend is stalled"
    )
    stall_factor: float = Field(
        4.0, ge=1, description="x the backend's recent slowest first byte, if longer"
    )


class Auth(_Strict):
    """Client API keys. With none configured, /v1/* is open and nothing is checked."""

    api_keys: list[SecretStr] = Field(default_factory=list)
    api_keys_file: str | None = None  # one key per line; blank lines and # comments skipped
    forward_client_key: bool = False  # pass the client's Authorization header upstream
    max_concurrent_per_key: int | None = Field(None, ge=1)
    _file_keys: list[SecretStr] = PrivateAttr(default_factory=list)

    def all_keys(self) -> list[str]:
        """Every accepted key: the listed ones, then the file's (read at load time)."""
        return [k.get_secret_value() for k in (*self.api_keys, *self._file_keys)]

    def enabled(self) -> bool:
        return bool(self.api_keys or self._file_keys)


class Admin(_Strict):
    """The admin API (/admin/*): off without a token. With `host` or `port` set it is
    served on its own listener (missing half: listen's) and not on the main one."""

    token: SecretStr | None = None
    host: str | None = None
    port: int | None = Field(None, ge=0, le=65535)

    def separate(self) -> bool:
        return self.host is not None or self.port is not None


class Signals(_Strict):
    metrics_interval: float = Field(0.25, gt=0, description="seconds between /metrics scrapes")
    metrics_timeout: float | None = Field(None, gt=0, description="default 0.8 x interval")
    metrics_max_age: float = Field(
        2.0, gt=0, description="older snapshots count as unknown load (see each scorer)"
    )


class Discovery(_Strict):
    interval: float = Field(30.0, gt=0, description="re-read /v1/models of pools without models")
    timeout: float = Field(3.0, gt=0)


class AccessLogConfig(_Strict):
    """JSON lines, one per request (see lbproxy/proxy/access_log.py); path None: stderr."""

    enabled: bool = False
    path: str | None = None


class Observability(_Strict):
    """Who may read /metrics, /dashboard and /dashboard/state.json (backend names and
    addresses, scrape errors). `none`: anyone who reaches the listener (the default);
    `admin_token` / `metrics_token`: `Authorization: Bearer <token>` (or HTTP Basic auth
    with the token as password, for a browser), else 401; `admin_listener`: only on the
    separate admin listener (admin.host/port), 404 on the main one."""

    protect: Literal["none", "admin_token", "metrics_token", "admin_listener"] = "none"
    metrics_token: SecretStr | None = None


class Tracing(_Strict):
    """OpenTelemetry traces, one span per request (lbproxy/proxy/tracing.py); needs the
    `tracing` extra. `exporter: none` records spans but sends them nowhere."""

    enabled: bool = False
    service_name: str = Field("lbproxy", min_length=1)
    exporter: Literal["otlp", "console", "none"] = "otlp"
    endpoint: str = Field("http://127.0.0.1:4318/v1/traces", description="OTLP/HTTP traces URL")
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="share of new traces kept; a client's traceparent decides"
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must start with http:// or https:// and name a host")
        return v


class SharedState(_Strict):
    """State shared through Redis (or Valkey) by the replicas and workers of one fleet
    (lbproxy/replicas/): the prefix-hash index, session affinity, and each replica's
    share of the backends' concurrency limits. Read at start; a change needs a restart."""

    redis: str = Field(description="redis://[:password@]host:port/db, rediss://, or unix://")
    key_prefix: str = Field("lbproxy", min_length=1, description="one fleet's keys")
    timeout: float = Field(
        0.005, gt=0, le=1, description="seconds a routing decision waits for Redis"
    )
    max_entries: int = Field(100_000, ge=100, description="routing decisions kept in Redis")
    heartbeat: float = Field(1.0, gt=0, le=60, description="seconds between liveness beats")

    @field_validator("redis")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(rediss?://[^/\s]*|unix:///\S+)", v):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class Config(_Strict):
    listen: Listen = Field(default_factory=Listen)
    pools: list[Pool] = Field(min_length=1)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    limits: Limits = Field(default_factory=Limits)
    health: Health = Field(default_factory=Health)
    discovery: Discovery = Field(default_factory=Discovery)
    signals: Signals = Field(default_factory=Signals)
    access_log: AccessLogConfig = Field(default_factory=AccessLogConfig)
    observability: Observability = Field(default_factory=Observability)
    flow_control: FlowControl = Field(default_factory=FlowControl)
    auth: Auth = Field(default_factory=Auth)
    admin: Admin = Field(default_factory=Admin)
    tracing: Tracing = Field(default_factory=Tracing)
    shutdown_grace: float = Field(
        30.0, ge=0, description="seconds in-flight requests get to finish on SIGTERM"
    )
    request_id_header: str = "x-request-id"
    session_header: str = "x-session-id"
    expose_backend_header: bool = False
    state: SharedState | None = None  # None: all state stays in this process


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(node: Any, source: str) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree; every
    unset variable without a default is reported (ConfigError)."""
    problems = _Problems(source)
    out = _expand(node, (), problems)
    problems.raise_if_any()
    return out


def _expand(node: Any, loc: tuple[Any, ...], problems: _Problems) -> Any:
    if isinstance(node, dict):
        return {k: _expand(v, (*loc, k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, (*loc, i), problems) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                if m.group(2) is None:
                    problems.add(
                        path_str(loc),
                        f"environment variable {m.group(1)} is not set "
                        f"(use ${{{m.group(1)}:-default}})",
                    )
                    return ""
                return m.group(2)
            return value

        return _ENV.sub(sub, node)
    return node


def _check_semantics(cfg: Config, source: str) -> None:
    problems = _Problems(source)
    names: set[str] = set()
    served: dict[str, str] = {}
    for i, pool in enumerate(cfg.pools):
        if pool.name in names:
            problems.add(f"pools[{i}].name", f"duplicate pool name '{pool.name}'")
        names.add(pool.name)
        for model in pool.models or []:
            if model in served:
                problems.add(
                    f"pools[{i}].models",
                    f"model '{model}' is already served by pool '{served[model]}'",
                )
            served[model] = pool.name
        pool._flow = _pool_flow(cfg.flow_control, pool.flow_control, ("pools", i), problems)
        seen: set[str] = set()
        for j, b in enumerate(pool.backends):
            if b.name is None:  # host[:port]/path; user:password@ never becomes a name
                b.name = without_credentials(b.url).partition("://")[2]
            if b.name in seen:
                problems.add(
                    f"pools[{i}].backends[{j}]",
                    f"duplicate backend '{b.name}' (give each a distinct name or url)",
                )
            seen.add(b.name)
        try:
            tokenizer = load_pool_tokenizer(pool)
        except Exception as e:  # the tokenizers library raises plain Exception
            problems.add(f"pools[{i}].tokenizer", f"cannot load: {e}")
            continue  # the routing checks below would only repeat it
        # Built as the runtime needs them (pool_build.py), kept for the PoolTable to take.
        age = cfg.signals.metrics_max_age
        bctx = build_context(pool, tokenizer, age)
        before = len(problems.items)
        router: Router | None = None
        try:
            router = build_router(pool.routing, bctx)
        except PluginError as e:
            problems.add(f"pools[{i}].routing", str(e))
        sides = None
        if pool.disaggregation is not None:
            sides = _check_disaggregation(pool, i, bctx, problems)
        elif roles := [b.name for b in pool.backends if b.role == "prefill"]:
            problems.add(
                f"pools[{i}].backends",
                f"role prefill ({', '.join(roles)}) needs the pool's `disaggregation` "
                "(a prefill-only backend serves no request of an aggregated pool)",
            )
        if router is not None and len(problems.items) == before:
            pool._built = PoolBuild.assemble(pool, age, bctx, router, sides)
        if PRECISE_INDEX_KEY in bctx.shared and tokenizer is None:
            problems.add(
                f"pools[{i}].tokenizer",
                "the precise-prefix scorer needs the model's tokenizer (a tokenizer.json "
                "path, or 'default' for simulated backends)",
            )
    _check_secrets(cfg, problems)
    _check_observability(cfg, problems)
    if cfg.tracing.enabled and not _installed("opentelemetry.sdk"):
        problems.add(
            "tracing.enabled",
            "needs OpenTelemetry, which is not installed: pip install 'lbproxy[tracing]'",
        )
    problems.raise_if_any()


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (only its parents)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _check_disaggregation(
    pool: Pool, i: int, bctx: BuildContext, problems: _Problems
) -> tuple[Router, Router] | None:
    """A split needs both sides, and each side's routing profile must build; returns the
    two sides' routers (prefill, decode) when both built."""
    dis = pool.disaggregation
    assert dis is not None
    where = f"pools[{i}].disaggregation"
    if not any(b.role != "decode" for b in pool.backends):
        problems.add(where, "no prefill-capable backend (give one `role: prefill` or `both`)")
    if not any(b.role != "prefill" for b in pool.backends):
        problems.add(where, "no decode-capable backend (give one `role: decode` or `both`)")
    sides = []
    for key in ("prefill_routing", "decode_routing"):
        try:
            sides.append(build_router(getattr(dis, key), bctx))
        except PluginError as e:
            problems.add(f"{where}.{key}", str(e))
    return (sides[0], sides[1]) if len(sides) == 2 else None


def _pool_flow(
    top: FlowControl, override: dict[str, Any] | None, where: tuple[Any, ...], problems: _Problems
) -> FlowControl:
    """The top-level flow_control with a pool's overrides (`limit` merged key by key)."""
    if not override:
        return top
    merged: dict[str, Any] = top.model_dump()
    for key, value in override.items():
        if key == "limit" and isinstance(value, dict):
            merged["limit"] = {**merged["limit"], **value}
        else:
            merged[key] = value
    try:
        return FlowControl.model_validate(merged)
    except ValidationError as e:
        problems.items += validation_problems(e, FlowControl, (*where, "flow_control"))
        return top


def _bad_secret(value: str) -> str | None:
    if not value:
        return "is empty"
    if any(c.isspace() or not c.isprintable() for c in value):
        return "contains whitespace or control characters"
    return None


def _check_secrets(cfg: Config, problems: _Problems) -> None:
    """Keys and tokens: read the key file; reject empty ones (an unset `${VAR:-}` must
    not turn into a key that an empty Bearer header would match). Values are never
    quoted in messages."""
    auth = cfg.auth
    for i, key in enumerate(auth.api_keys):
        if problem := _bad_secret(key.get_secret_value()):
            problems.add(f"auth.api_keys[{i}]", problem)
    if auth.api_keys_file is not None:
        try:
            lines = Path(auth.api_keys_file).read_text().splitlines()
        except OSError as e:
            problems.add("auth.api_keys_file", f"cannot read: {e.strerror}")
            lines = None
        file_keys = []
        for n, line in enumerate(lines or [], 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if problem := _bad_secret(line):
                problems.add("auth.api_keys_file", f"line {n}: key {problem}")
            else:
                file_keys.append(SecretStr(line))
        if lines is not None and not file_keys:
            problems.add("auth.api_keys_file", "no keys in the file")
        auth._file_keys = file_keys
    token = cfg.admin.token
    if token is not None and (problem := _bad_secret(token.get_secret_value())):
        problems.add("admin.token", problem)
    admin = cfg.admin
    if (
        admin.separate()
        and (admin.host or cfg.listen.host) == cfg.listen.host
        and (cfg.listen.port if admin.port is None else admin.port) == cfg.listen.port
        and cfg.listen.port != 0
    ):
        problems.add("admin", "host/port must differ from listen's")
    for i, pool in enumerate(cfg.pools):
        for j, b in enumerate(pool.backends):
            if b.api_key is not None and (problem := _bad_secret(b.api_key.get_secret_value())):
                problems.add(f"pools[{i}].backends[{j}].api_key", problem)


def _check_observability(cfg: Config, problems: _Problems) -> None:
    obs = cfg.observability
    if obs.metrics_token is not None and (
        problem := _bad_secret(obs.metrics_token.get_secret_value())
    ):
        problems.add("observability.metrics_token", problem)
    if obs.protect == "metrics_token" and obs.metrics_token is None:
        problems.add("observability.metrics_token", "must be set when protect is metrics_token")
    if obs.protect == "admin_token" and cfg.admin.token is None:
        problems.add("observability.protect", "admin_token needs admin.token to be set")
    if obs.protect == "admin_listener" and not cfg.admin.separate():
        problems.add(
            "observability.protect",
            "admin_listener needs a separate admin listener (set admin.host or admin.port)",
        )


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate an already-parsed YAML tree."""
    if data is None:
        raise ConfigError(
            f"{source}: the file is empty; a config needs at least a `pools:` list "
            "(see configs/example.yaml)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: (top level): must be a mapping (key: value lines), "
            f"got {type(data).__name__}"
        )
    data = expand_env(data, source)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_problems(source, validation_problems(e, Config))) from None
    _check_semantics(cfg, source)
    return cfg


def load_config(path: str | Path) -> Config:
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}invalid YAML: {getattr(e, 'problem', e)}") from None
    return parse_config(data, source)
