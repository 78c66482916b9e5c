"""Sans-IO codec for vLLM KV-cache events, and sequence tracking for their ZMQ stream.

Wire format (checked against vLLM 0.32 captures, see tests/fixtures/vllm-0.32-kv-events.jsonl):
a ZMQ message is [topic, seq (8 bytes big-endian), payload]; the payload is a msgpack
batch `[ts, events, data_parallel_rank]`. Events come in two forms:

- map (vLLM >= 0.26): `{"type": "BlockStored", "block_hashes": [...], ...}`, fields left
  at their default omitted, unknown keys possible (newer servers add fields);
- tagged array (older): `["BlockStored", block_hashes, parent_block_hash, token_ids,
  block_size, lora_id, medium, ...]`, trailing fields possibly absent.

`decode_batch` takes a fast path (one typed msgspec decode, for the map form with integer
hashes that vLLM sends by default) and falls back to a tolerant generic path for the array
form, map-shaped batches, hashes sent as bytes (last 8 bytes, big-endian, as vLLM does for
its int form) and unknown event types (skipped and counted in `KVEventBatch.skipped`; a
newer server must not break an older router). A *known* event that is malformed raises
KVEventDecodeError: dropping, say, a BlockRemoved silently would leave stale index entries,
so the caller must resynchronise instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "Gap",
    "KVEvent",
    "KVEventBatch",
    "KVEventDecodeError",
    "SequenceTracker",
    "decode_batch",
    "encode_batch",
    "vllm_block_removed",
    "vllm_block_stored",
]


class KVEventDecodeError(ValueError):
    """A payload is not a KV-event batch, or a known event in it is malformed."""


# Public event types. Map-tagged with "type" (msgspec's default tag field), so the fast
# path decodes vLLM's map form straight into them. kw_only lets the fields keep vLLM's
# order while giving defaults to everything a server may leave out.
class BlockStored(msgspec.Struct, tag=True, kw_only=True, gc=False):
    """Full blocks entered the prefix cache; `token_ids` holds all their tokens in order."""

    block_hashes: list[int]
    parent_block_hash: int | None = None  # None: the first block starts the prompt
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(msgspec.Struct, tag=True, kw_only=True, gc=False):
    """Blocks were evicted from the prefix cache."""

    block_hashes: list[int]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, gc=False):
    """The whole prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, gc=False):
    """One published batch. `skipped` counts events of types this decoder does not know."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None
    skipped: int = 0


# ---- decoding ----------------------------------------------------------------------------


class _FastBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


_fast_decoder = msgspec.msgpack.Decoder(_FastBatch)
_any_decoder = msgspec.msgpack.Decoder()

# Positional layout of the older tagged-array form (index 0 is the tag).
_ARRAY_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
        "kv_cache_spec_sliding_window",
    ),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}
_TYPES: dict[str, type[KVEvent]] = {
    "BlockStored": BlockStored,
    "BlockRemoved": BlockRemoved,
    "AllBlocksCleared": AllBlocksCleared,
}


def _hash(value: Any) -> Any:
    """A block hash as a uint64 int: bytes -> last 8 bytes big-endian."""
    if isinstance(value, bytes | bytearray):
        return int.from_bytes(value[-8:], "big")
    return value  # ints as sent (vLLM: uint64); anything else is rejected by convert


def _event_from_raw(raw: Any) -> KVEvent | None:
    """Convert one generically decoded event; None if its type is unknown."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        fields = {k: v for k, v in raw.items() if k != "type"}
    elif isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        tag = raw[0]
        names = _ARRAY_FIELDS.get(tag)
        if names is None:
            return None
        fields = dict(zip(names, raw[1:], strict=False))  # extra trailing fields ignored
    else:
        raise KVEventDecodeError(f"event is neither a tagged map nor a tagged array: {raw!r:.80}")
    cls = _TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        return None
    if "block_hashes" in fields and isinstance(fields["block_hashes"], list | tuple):
        fields["block_hashes"] = [_hash(h) for h in fields["block_hashes"]]
    if fields.get("parent_block_hash") is not None:
        fields["parent_block_hash"] = _hash(fields["parent_block_hash"])
    try:
        return msgspec.convert(fields, cls)
    except msgspec.ValidationError as e:
        raise KVEventDecodeError(f"malformed {tag} event: {e}") from None


def _decode_generic(payload: bytes) -> KVEventBatch:
    try:
        raw = _any_decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise KVEventDecodeError(f"not msgpack: {e}") from None
    if isinstance(raw, list) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        dp_rank = raw[2] if len(raw) >= 3 else None
    elif isinstance(raw, dict) and "ts" in raw and "events" in raw:
        ts, events, dp_rank = raw["ts"], raw["events"], raw.get("data_parallel_rank")
    else:
        raise KVEventDecodeError(f"not a KV-event batch: {raw!r:.80}")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise KVEventDecodeError(f"batch timestamp is not a number: {ts!r:.40}")
    if not isinstance(events, list):
        raise KVEventDecodeError(f"batch events is not a list: {events!r:.40}")
    if dp_rank is not None and (isinstance(dp_rank, bool) or not isinstance(dp_rank, int)):
        raise KVEventDecodeError(f"data_parallel_rank is not an int: {dp_rank!r:.40}")
    out: list[KVEvent] = []
    skipped = 0
    for raw_event in events:
        event = _event_from_raw(raw_event)
        if event is None:
            skipped += 1
        else:
            out.append(event)
    return KVEventBatch(float(ts), out, dp_rank, skipped)


def decode_batch(payload: bytes | bytearray | memoryview) -> KVEventBatch:
    """Decode one msgpack KV-event batch (either event form). Raises KVEventDecodeError."""
    try:
        fast = _fast_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return _decode_generic(bytes(payload))
    return KVEventBatch(fast.ts, fast.events, fast.data_parallel_rank)


# ---- encoding ----------------------------------------------------------------------------
# Wire structs mirroring vLLM 0.32 exactly: fields vLLM declares without a default are
# always written (even when None); the rest are omitted at their default.


class _MapBlockStored(msgspec.Struct, tag="BlockStored", omit_defaults=True, gc=False):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class _MapBlockRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True, gc=False):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class _MapAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True):
    pass


class _WireBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()


def _to_map(event: KVEvent) -> msgspec.Struct:
    if isinstance(event, BlockStored):
        return _MapBlockStored(
            event.block_hashes,
            event.parent_block_hash,
            event.token_ids,
            event.block_size,
            event.lora_id,
            event.medium,
            event.lora_name,
            event.extra_keys,
            event.group_idx,
            event.kv_cache_spec_kind,
            event.kv_cache_spec_sliding_window,
        )
    if isinstance(event, BlockRemoved):
        return _MapBlockRemoved(event.block_hashes, event.medium, event.group_idx)
    if isinstance(event, AllBlocksCleared):
        return _MapAllBlocksCleared()
    raise TypeError(f"not a KV event: {event!r:.80}")


# Length of the classic tagged-array layout (tag included): fields beyond it are written
# only up to the last one that is set, so plain events keep the layout older servers sent.
_ARRAY_BASE = {"BlockStored": 7, "BlockRemoved": 3, "AllBlocksCleared": 1}


def _to_array(event: KVEvent) -> list[Any]:
    if not isinstance(event, BlockStored | BlockRemoved | AllBlocksCleared):
        raise TypeError(f"not a KV event: {event!r:.80}")
    tag = type(event).__name__
    out = [tag, *(getattr(event, name) for name in _ARRAY_FIELDS[tag])]
    base = _ARRAY_BASE[tag]
    while len(out) > base and out[-1] is None:
        out.pop()
    return out


def encode_batch(
    ts: float,
    events: list[KVEvent],
    dp_rank: int | None = 0,
    *,
    form: Literal["map", "array"] = "map",
) -> bytes:
    """Encode a batch as vLLM publishes it: `[ts, events, dp_rank]`, map events by default.

    With `form="map"` the bytes equal vLLM 0.32's for the same values (tests compare
    against the capture); build events with `vllm_block_stored` / `vllm_block_removed`
    to get the values vLLM 0.32 fills in.
    """
    if form == "map":
        wire: list[Any] = [_to_map(e) for e in events]
    elif form == "array":
        wire = [_to_array(e) for e in events]
    else:
        raise ValueError(f"form must be 'map' or 'array', not {form!r}")
    return _encoder.encode(_WireBatch(float(ts), wire, dp_rank))


def vllm_block_stored(
    block_hashes: list[int],
    parent_block_hash: int | None,
    token_ids: list[int],
    block_size: int,
) -> BlockStored:
    """A BlockStored with the values vLLM 0.32 sets for plain full-attention GPU blocks."""
    return BlockStored(
        block_hashes=block_hashes,
        parent_block_hash=parent_block_hash,
        token_ids=token_ids,
        block_size=block_size,
        medium="GPU",
        extra_keys=[None] * len(block_hashes),
        group_idx=0,
        kv_cache_spec_kind="full_attention",
    )


def vllm_block_removed(block_hashes: list[int]) -> BlockRemoved:
    """A BlockRemoved with the values vLLM 0.32 sets."""
    return BlockRemoved(block_hashes=block_hashes, medium="GPU", group_idx=0)


# ---- sequence tracking -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gap:
    """Batches `start <= seq < end` were missed.

    `restart` means the publisher restarted (its seq went back): everything learnt from
    its previous life is stale, whether or not anything was missed since.
    """

    start: int
    end: int
    restart: bool = False

    @property
    def missed(self) -> int:
        return self.end - self.start


class SequenceTracker:
    """Follows one publisher's sequence numbers (one per backend and topic).

    - `seq == last + 1`: in order.  `seq > last + 1`: Gap(last + 1, seq).
    - `seq <= last`: a duplicate if the same seq was seen recently with the same payload
      (vLLM resends nothing by itself, but replays and overlapping subscriptions can);
      otherwise the publisher restarted (vLLM counts from 0 again on each start, and the
      first batches of the new life may be lost to ZMQ's slow joiner, so "back to exactly
      0" is not required): Gap(0, seq, restart=True).
    - The first seq seen is a gap from `expect_first` if that is set (useful when missed
      history can be replayed), else accepted as the starting point.

    Without payloads, a recently seen seq counts as a duplicate unless it is 0.
    """

    __slots__ = ("_recent", "_window", "duplicates", "expect_first", "last")

    def __init__(self, *, expect_first: int | None = None, window: int = 256) -> None:
        self.expect_first = expect_first
        self.last: int | None = None
        self.duplicates = 0
        self._window = window
        self._recent: dict[int, int | None] = {}  # seq -> hash(payload), insertion order

    def reset(self) -> None:
        self.last = None
        self._recent.clear()

    def is_duplicate(self, seq: int, payload: bytes | None = None) -> bool:
        """True if `seq` repeats a recently accepted batch (no state change)."""
        last = self.last
        if last is None or seq > last or seq not in self._recent:
            return False
        digest = self._recent[seq]
        if payload is None or digest is None:
            return not (seq == 0 and last > 0)
        return digest == hash(payload)

    def observe(self, seq: int, payload: bytes | None = None) -> Gap | None:
        """Accept `seq`; return the Gap it reveals, if any. Duplicates return None and
        change nothing (check `is_duplicate` first to skip their processing)."""
        if self.is_duplicate(seq, payload):
            self.duplicates += 1
            return None
        last = self.last
        gap: Gap | None = None
        if last is None:
            if self.expect_first is not None and seq > self.expect_first:
                gap = Gap(self.expect_first, seq)
        elif seq > last + 1:
            gap = Gap(last + 1, seq)
        elif seq <= last:
            self._recent.clear()
            gap = Gap(0, seq, restart=True)
        self.last = seq
        recent = self._recent
        recent[seq] = None if payload is None else hash(payload)
        if len(recent) > self._window:
            del recent[next(iter(recent))]
        return gap
