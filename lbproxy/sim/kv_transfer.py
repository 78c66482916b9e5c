"""Prefill/decode disaggregation in the simulator, without I/O or clocks (time is passed in),
so that the real-time server and the offline simulator share it.

Modelled on vLLM 0.32's NixlConnector (vllm/distributed/kv_transfer/kv_connector/v1/
nixl_connector.py): a *producer* (kv_producer / kv_both) that finishes a request carrying
``kv_transfer_params.do_remote_decode`` keeps its KV blocks and answers with the params a
decode server needs to pull them; a *consumer* (kv_consumer / kv_both) given
``do_remote_prefill`` pulls the prompt's blocks over the link and decodes without
recomputing them. The producer frees the blocks once they are pulled, or when
``VLLM_NIXL_ABORT_REQUEST_TIMEOUT`` passes.

Transfer time = KV bytes of the transferred blocks / link bandwidth. The link is the only
cost: no handshake, no per-descriptor overhead, no KV layout conversion between vendors
(vLLM has no cross-vendor transfer today; the model assumes one at the link's speed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DEFAULT_HOLD_TIMEOUT_S",
    "DEFAULT_LINK_GBPS",
    "KV_ROLES",
    "HeldKV",
    "HoldLedger",
    "KVRole",
    "LinkTable",
    "PullError",
    "is_consumer",
    "is_producer",
    "transfer_bytes",
    "transfer_seconds",
]

KVRole = Literal["producer", "consumer", "both"]
KV_ROLES: tuple[str, ...] = ("producer", "consumer", "both")

# vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT (vllm/envs.py: int(os.getenv(
# "VLLM_NIXL_ABORT_REQUEST_TIMEOUT", "480"))): seconds a producer keeps KV blocks that no
# consumer has read before it frees them.
DEFAULT_HOLD_TIMEOUT_S = 480.0

# An assumption, not a measurement: one 100 Gb/s NIC (100GbE / HDR100 InfiniBand class) per
# server between the prefill and decode nodes. RDMA fabrics of 400 Gb/s per GPU exist
# (NDR InfiniBand, 400GbE RoCE); set them per vendor pair in the fleet's `links:`.
DEFAULT_LINK_GBPS = 100.0


def is_producer(role: str | None) -> bool:
    return role == "producer" or role == "both"


def is_consumer(role: str | None) -> bool:
    return role == "consumer" or role == "both"


def transfer_bytes(num_blocks: int, block_size: int, kv_bytes_per_token: float) -> float:
    """KV bytes of `num_blocks` whole blocks (a block moves whole, even if partly filled)."""
    return num_blocks * block_size * kv_bytes_per_token


def transfer_seconds(num_bytes: float, link_gbps: float) -> float:
    """Seconds to move `num_bytes` over a link of `link_gbps` gigabits per second."""
    return num_bytes * 8.0 / (link_gbps * 1e9)


@dataclass(frozen=True, slots=True)
class LinkTable:
    """Link bandwidth (Gb/s) between two vendors (hardware profile names), either order."""

    default_gbps: float = DEFAULT_LINK_GBPS
    pairs: Mapping[frozenset[str], float] = field(default_factory=dict)

    @classmethod
    def from_mapping(
        cls, data: Any, default_gbps: float = DEFAULT_LINK_GBPS, src: str = "links"
    ) -> LinkTable:
        """`{vendor-a: {vendor-b: 400}}` (symmetric); ValueError naming the key."""
        if data is None:
            return cls(default_gbps)
        if not isinstance(data, dict):
            raise ValueError(f"{src}: must be a mapping of vendor -> {{vendor: Gb/s}}")
        pairs: dict[frozenset[str], float] = {}
        for a, row in data.items():
            if not isinstance(row, dict):
                raise ValueError(f"{src}.{a}: must be a mapping of vendor -> Gb/s, got {row!r}")
            for b, gbps in row.items():
                if isinstance(gbps, bool) or not isinstance(gbps, int | float) or not gbps > 0:
                    raise ValueError(f"{src}.{a}.{b}: must be a number > 0 (Gb/s), got {gbps!r}")
                key = frozenset((str(a), str(b)))
                if key in pairs and pairs[key] != gbps:
                    raise ValueError(f"{src}.{a}.{b}: conflicts with {src}.{b}.{a}")
                pairs[key] = float(gbps)
        return cls(default_gbps, pairs)

    def gbps(self, a: str, b: str) -> float:
        return self.pairs.get(frozenset((a, b)), self.default_gbps)


class PullError(Exception):
    """A pull the producer refuses (vLLM: the NIXL read or handshake fails)."""


@dataclass(slots=True)
class HeldKV:
    request_id: str  # the id a consumer names (remote_request_id)
    block_ids: list[int]
    num_tokens: int
    expires_at: float
    engine_request_id: str = ""  # the engine's own id for it
    pulling: bool = False


class HoldLedger:
    """The producer's side: blocks held for remote decode, until pulled or expired.

    A pull is checked as vLLM's transfer would fail: the engine id must be this producer's,
    the request id one it holds (not pulled already, not expired), the block ids its own.
    """

    __slots__ = ("_held", "engine_id", "timeout_s")

    def __init__(self, engine_id: str, timeout_s: float = DEFAULT_HOLD_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"kv hold timeout must be > 0 seconds, got {timeout_s!r}")
        self.engine_id = engine_id
        self.timeout_s = timeout_s
        self._held: dict[str, HeldKV] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(
        self,
        request_id: str,
        block_ids: list[int],
        num_tokens: int,
        now: float,
        engine_request_id: str = "",
    ) -> HeldKV:
        entry = HeldKV(request_id, block_ids, num_tokens, now + self.timeout_s, engine_request_id)
        self._held[request_id] = entry
        return entry

    def begin_pull(self, engine_id: Any, request_id: Any, block_ids: Any, now: float) -> HeldKV:
        """Check a pull and mark it in progress; PullError says why it cannot be served."""
        if engine_id != self.engine_id:
            raise PullError(f"unknown remote engine id {engine_id!r}")
        entry = self._held.get(request_id) if isinstance(request_id, str) else None
        if entry is None or entry.expires_at <= now:
            raise PullError(
                f"request {request_id!r} holds no KV blocks here "
                "(unknown, already pulled or timed out)"
            )
        if entry.pulling:
            raise PullError(f"request {request_id!r}: its KV blocks are already being pulled")
        if _flat_ids(block_ids) != entry.block_ids:
            raise PullError(f"request {request_id!r}: block ids do not match the held blocks")
        entry.pulling = True
        return entry

    def abort_pull(self, request_id: str) -> None:
        """A pull that did not complete: the blocks stay held (until the timeout)."""
        entry = self._held.get(request_id)
        if entry is not None:
            entry.pulling = False

    def release(self, request_id: str) -> HeldKV | None:
        """Forget a request's blocks (pulled, or expired); the caller frees them."""
        return self._held.pop(request_id, None)

    def expired(self, now: float) -> list[str]:
        """Requests whose hold time has run out (a read in progress does not extend it, so
        that a consumer that dies mid-read cannot pin the blocks)."""
        return [r for r, e in self._held.items() if e.expires_at <= now]

    def next_expiry(self) -> float | None:
        return min((e.expires_at for e in self._held.values()), default=None)


def _flat_ids(block_ids: Any) -> list[int] | None:
    """vLLM 0.32 sends one list of block ids per KV-cache group; we have one group."""
    if isinstance(block_ids, list) and len(block_ids) == 1 and isinstance(block_ids[0], list):
        block_ids = block_ids[0]
    if isinstance(block_ids, list) and all(type(b) is int for b in block_ids):
        return block_ids
    return None
