"""A fleet of simulated vLLM servers in one process, described in YAML.

    model: granite-4.1-8b            # served model name (all backends)
    tokenizer: path/to/tokenizer.json  # optional; default: the shipped tokenizer
    speed: 1.0                       # optional; engine seconds per wall second
    stream_interval: 1               # optional; tokens per SSE chunk
    backends:
      - {name: a, profile: vendor-a, port: 8001, kv_events: "tcp://*:5601"}
      - {name: b, profile: vendor-b, port: 8002, count: 3}   # b-0, b-1, b-2 on 8002..8004
      - {name: p, profile: vendor-c, port: 8010, kv_role: producer, kv_side_channel_port: 5610}
    links: {vendor-a: {vendor-c: 400}}  # optional; P/D link Gb/s per vendor pair (either order)
    kv_link_gbps: 100                   # optional; the link of pairs not in `links`
    disaggregation: {min_prompt_tokens: 512}  # optional; `lbproxy simulate`'s P/D settings

A fleet is a YAML path or the name of a shipped one (`demo-3`, `abc-20`: `lbproxy/data/fleets`,
also `configs/fleets/` in a checkout).

Per backend: `name`, `profile` (a shipped name or a YAML path) and `port` (0: ephemeral) are
required; `kv_events`, `kv_events_topic` (default `kv-events-<name>`, so that one bound SUB
can tell the backends apart), `kv_events_replay`, `seed` (default: the backend's index),
`speed` and `stream_interval` are optional; so are the P/D keys `kv_role` (producer,
consumer, both), `kv_side_channel_port` (default 0: a free port) and `kv_hold_timeout`
(seconds, default 480). A consumer's pulls from a producer of another vendor (hardware
profile name) run at `links[its vendor][the producer's vendor]` Gb/s, else `kv_link_gbps`
(default 100, an assumed 100 Gb/s NIC; see lbproxy.sim.kv_transfer). `role` (prefill,
decode, both) is the backend's side in `lbproxy simulate`'s P/D routing (the proxy's
`role`); by default producer -> prefill, consumer -> decode, else both. A fleet with a
prefill or decode role, or with `disaggregation:` (the pool key of that name, same
fields and defaults), is simulated disaggregated. `count: N` repeats an
entry with `-i` name suffixes and consecutive ports; a binding KV endpoint (one with `*`)
and a non-zero side-channel port get consecutive ports too, like vLLM's data-parallel
ranks. Relative tokenizer paths are read from the
fleet file's directory first, then from the working directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError as PydanticValidationError

from lbproxy.bind import AddressInUse
from lbproxy.config import Disaggregation
from lbproxy.sim.hardware import HardwareProfile, load_profile
from lbproxy.sim.kv_transfer import (
    DEFAULT_HOLD_TIMEOUT_S,
    DEFAULT_LINK_GBPS,
    KV_ROLES,
    LinkTable,
)
from lbproxy.sim.server import SimServerHandle, start_sim_server
from lbproxy.sim.shipped import is_bare_name, shipped_file, shipped_names
from lbproxy.tokenization.tokenizer import Tokenizer, default_tokenizer

__all__ = ["BackendSpec", "FleetSpec", "load_fleet", "start_fleet"]

_TOP_KEYS = {"model", "tokenizer", "speed", "stream_interval", "backends", "links",
             "kv_link_gbps", "disaggregation"}  # fmt: skip
_BACKEND_KEYS = {"name", "profile", "port", "count", "kv_events", "kv_events_topic",
                 "kv_events_replay", "seed", "speed", "stream_interval", "kv_role",
                 "kv_side_channel_port", "kv_hold_timeout", "role"}  # fmt: skip
ROLES = ("prefill", "decode", "both")
# The proxy-side role a kv_role implies when the fleet gives none.
_ROLE_OF_KV = {"producer": "prefill", "consumer": "decode"}
_PORT = re.compile(r":(\d+)$")


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    profile: HardwareProfile
    port: int
    seed: int
    speed: float
    stream_interval: int
    kv_events: str | None = None
    kv_events_topic: str = "kv-events"
    kv_events_replay: str | None = None
    kv_role: str | None = None
    kv_side_channel_port: int = 0
    kv_hold_timeout: float = DEFAULT_HOLD_TIMEOUT_S
    role: str = "both"  # prefill | decode | both: its side in simulated P/D routing


@dataclass(frozen=True, slots=True)
class FleetSpec:
    model: str
    backends: tuple[BackendSpec, ...]
    tokenizer: str | None = None
    source: str = "<fleet>"
    links: LinkTable = field(default_factory=LinkTable)
    disaggregation: Disaggregation | None = None

    @property
    def disaggregated(self) -> bool:
        """Whether `lbproxy simulate` routes this fleet prefill/decode split."""
        return self.disaggregation is not None or any(b.role != "both" for b in self.backends)


def _shift_port(endpoint: str | None, by: int) -> str | None:
    """Offset the port of a *binding* tcp endpoint (vLLM's rule for data-parallel ranks).

    Connecting endpoints stay: all replicas then reach the same bound SUB, told apart by
    topic. A wildcard port (`tcp://127.0.0.1:*`) stays too.
    """
    if endpoint is None or by == 0 or not any(s in endpoint for s in ("*", "::", "0.0.0.0")):
        return endpoint
    m = _PORT.search(endpoint)
    return endpoint[: m.start()] + f":{int(m.group(1)) + by}" if m else endpoint


def _int(src: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{src}: {key}: must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{src}: {key}: must be >= {minimum}, got {value}")
    return value


def _positive(src: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{src}: {key}: must be a number > 0, got {value!r}")
    return float(value)


def _string(src: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{src}: {key}: must be a non-empty string, got {value!r}")
    return value


def parse_fleet(data: Any, source: str = "<fleet>") -> FleetSpec:
    """Validate a fleet mapping; errors name the source, the key and the problem."""
    src = source
    if not isinstance(data, dict):
        raise ValueError(f"{src}: expected a mapping with model and backends")
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        known = ", ".join(sorted(_TOP_KEYS))
        raise ValueError(f"{src}: {unknown[0]}: unknown key (known: {known})")
    if "model" not in data:
        raise ValueError(f"{src}: model: required key is missing")
    model = _string(src, "model", data["model"])
    speed = _positive(src, "speed", data.get("speed", 1.0))
    interval = _int(src, "stream_interval", data.get("stream_interval", 1), 1)
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        tokenizer = _string(src, "tokenizer", tokenizer)
    link_default = _positive(src, "kv_link_gbps", data.get("kv_link_gbps", DEFAULT_LINK_GBPS))
    links = LinkTable.from_mapping(data.get("links"), link_default, f"{src}: links")
    disagg = _disaggregation(src, data.get("disaggregation"))
    entries = data.get("backends")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{src}: backends: must be a non-empty list")

    backends: list[BackendSpec] = []
    for i, entry in enumerate(entries):
        at = f"backends[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{src}: {at}: must be a mapping, got {entry!r}")
        unknown = sorted(str(k) for k in entry if k not in _BACKEND_KEYS)
        if unknown:
            known = ", ".join(sorted(_BACKEND_KEYS))
            raise ValueError(f"{src}: {at}.{unknown[0]}: unknown key (known: {known})")
        for key in ("name", "profile", "port"):
            if key not in entry:
                raise ValueError(f"{src}: {at}.{key}: required key is missing")
        name = _string(src, f"{at}.name", entry["name"])
        try:
            profile = load_profile(_string(src, f"{at}.profile", entry["profile"]))
        except ValueError as exc:
            raise ValueError(f"{src}: {at}.profile: {exc}") from None
        port = _int(src, f"{at}.port", entry["port"], 0)
        if port > 65535:
            raise ValueError(f"{src}: {at}.port: must be <= 65535, got {port}")
        count = _int(src, f"{at}.count", entry.get("count", 1), 1)
        kv = entry.get("kv_events")
        kv = None if kv is None else _string(src, f"{at}.kv_events", kv)
        replay = entry.get("kv_events_replay")
        replay = None if replay is None else _string(src, f"{at}.kv_events_replay", replay)
        topic = entry.get("kv_events_topic")
        topic = None if topic is None else _string(src, f"{at}.kv_events_topic", topic)
        b_speed = _positive(src, f"{at}.speed", entry.get("speed", speed))
        b_interval = _int(src, f"{at}.stream_interval", entry.get("stream_interval", interval), 1)
        # Engines differ in their sampled tokens by default; block hashes never depend on it.
        seed = _int(src, f"{at}.seed", entry.get("seed", len(backends)), 0)
        role = entry.get("kv_role")
        if role is not None and role not in KV_ROLES:
            raise ValueError(
                f"{src}: {at}.kv_role: must be one of {', '.join(KV_ROLES)}, got {role!r}"
            )
        side_port = _int(src, f"{at}.kv_side_channel_port", entry.get("kv_side_channel_port", 0), 0)
        if side_port > 65535:
            raise ValueError(f"{src}: {at}.kv_side_channel_port: must be <= 65535, got {side_port}")
        b_role = entry.get("role", _ROLE_OF_KV.get(role or "", "both"))
        if b_role not in ROLES:
            raise ValueError(f"{src}: {at}.role: must be one of {', '.join(ROLES)}, got {b_role!r}")
        hold_timeout = _positive(
            src, f"{at}.kv_hold_timeout", entry.get("kv_hold_timeout", DEFAULT_HOLD_TIMEOUT_S)
        )
        for k in range(count):
            bname = f"{name}-{k}" if count > 1 else name
            backends.append(
                BackendSpec(
                    name=bname,
                    profile=profile,
                    port=port + k if port else 0,
                    seed=seed + k,
                    speed=b_speed,
                    stream_interval=b_interval,
                    kv_events=_shift_port(kv, k),
                    kv_events_topic=(f"{topic}-{k}" if count > 1 else topic)
                    if topic
                    else f"kv-events-{bname}",
                    kv_events_replay=_shift_port(replay, k),
                    kv_role=role,
                    kv_side_channel_port=side_port + k if side_port else 0,
                    kv_hold_timeout=hold_timeout,
                    role=b_role,
                )
            )
    names = [b.name for b in backends]
    ports = [b.port for b in backends if b.port]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{src}: backends: name {dup!r} is used twice")
    if len(set(ports)) != len(ports):
        dup = next(p for p in ports if ports.count(p) > 1)
        raise ValueError(f"{src}: backends: port {dup} is used twice")
    sides = [b.kv_side_channel_port for b in backends if b.kv_side_channel_port]
    if len(set(sides)) != len(sides) or set(sides) & set(ports):
        dup = next(p for p in sides if sides.count(p) > 1 or p in ports)
        raise ValueError(f"{src}: backends: kv_side_channel_port {dup} is used twice")
    return FleetSpec(model, tuple(backends), tokenizer, src, links, disagg)


def check_roles(fleet: FleetSpec) -> None:
    """A fleet simulated P/D needs a prefill-capable and a decode-capable backend
    (ValueError); a live `lbproxy sim` fleet may hold one side only."""
    if all(b.role == "decode" for b in fleet.backends):
        raise ValueError(
            f"{fleet.source}: backends: no prefill-capable backend (role prefill or both)"
        )
    if all(b.role == "prefill" for b in fleet.backends):
        raise ValueError(
            f"{fleet.source}: backends: no decode-capable backend (role decode or both)"
        )


def _disaggregation(src: str, data: Any) -> Disaggregation | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{src}: disaggregation: must be a mapping, got {data!r}")
    try:
        return Disaggregation.model_validate(data)
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"{src}: disaggregation.{where}: {err['msg']}") from None


def load_fleet(path: str | Path) -> FleetSpec:
    """Read and validate a fleet YAML file, or a shipped fleet by name (`demo-3`);
    ValueError naming the file and the key."""
    p = Path(path)
    shipped = isinstance(path, str) and is_bare_name(path) and not p.exists()
    try:
        text = (shipped_file("fleets", path) if shipped else p).read_text(encoding="utf-8")
    except OSError as exc:
        known = ", ".join(shipped_names("fleets"))
        raise ValueError(
            f"{p}: cannot read fleet file ({exc.strerror}); shipped fleets: {known}"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: invalid YAML: {exc}") from None
    spec = parse_fleet(data, str(p))
    if spec.tokenizer and not Path(spec.tokenizer).is_absolute():
        beside = p.parent / spec.tokenizer
        if beside.exists():
            spec = replace(spec, tokenizer=str(beside))
    return spec


async def start_fleet(
    fleet: FleetSpec | str | Path, host: str = "127.0.0.1", port_offset: int = 0
) -> list[SimServerHandle]:
    """Start every backend (ports shifted by `port_offset`, ephemeral ones stay 0); on a
    failure, the ones already started are closed before the error propagates."""
    spec = fleet if isinstance(fleet, FleetSpec) else load_fleet(fleet)
    try:
        tok = Tokenizer.from_file(spec.tokenizer) if spec.tokenizer else default_tokenizer()
    except ValueError as exc:
        raise ValueError(f"{spec.source}: tokenizer: {exc}") from None
    handles: list[SimServerHandle] = []
    try:
        for b in spec.backends:
            try:
                handles.append(
                    await start_sim_server(
                        host=host,
                        port=b.port + port_offset if b.port else 0,
                        profile=b.profile,
                        model=spec.model,
                        speed=b.speed,
                        stream_interval=b.stream_interval,
                        kv_events=_shift_port(b.kv_events, port_offset),
                        kv_events_topic=b.kv_events_topic,
                        kv_events_replay=_shift_port(b.kv_events_replay, port_offset),
                        tokenizer=tok,
                        seed=b.seed,
                        kv_role=b.kv_role,
                        kv_side_channel_port=b.kv_side_channel_port + port_offset
                        if b.kv_side_channel_port
                        else 0,
                        kv_hold_timeout=b.kv_hold_timeout,
                        kv_links=spec.links,
                    )
                )
            except (OSError, ValueError) as exc:
                msg = f"{spec.source}: backend {b.name!r}: {exc}"
                kind = AddressInUse if isinstance(exc, AddressInUse) else type(exc)
                raise kind(msg) from exc
    except BaseException:
        for h in handles:
            await h.close()
        raise
    return handles
