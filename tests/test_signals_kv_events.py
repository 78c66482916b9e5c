"""KV-event codec against vLLM 0.32 captures, both wire forms, and sequence tracking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lbproxy.signals.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Gap,
    KVEventBatch,
    KVEventDecodeError,
    SequenceTracker,
    decode_batch,
    encode_batch,
    vllm_block_removed,
    vllm_block_stored,
)

FIXTURES = Path(__file__).parent / "fixtures"
RECORDS = [
    json.loads(line)
    for line in (FIXTURES / "vllm-0.32-kv-events.jsonl").read_text().splitlines()
    if line and not line.startswith("#")
]
TYPES = {
    "BlockStored": BlockStored,
    "BlockRemoved": BlockRemoved,
    "AllBlocksCleared": AllBlocksCleared,
}


def payload_of(record: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(record["raw_msgpack"])


def typed_events(record: dict[str, Any]) -> list[Any]:
    """The capture's `typed` events (decoded there by vLLM's own structs) as our structs."""
    out = []
    for ev in record["typed"]["events"]:
        cls = TYPES[ev["type"]]
        out.append(cls(**{k: v for k, v in ev.items() if k in cls.__struct_fields__}))
    return out


def test_capture_is_complete() -> None:
    kinds = {ev["type"] for r in RECORDS for ev in r["typed"]["events"]}
    assert len(RECORDS) == 59 and kinds == set(TYPES)


@pytest.mark.parametrize("i", range(len(RECORDS)))
def test_rebuilt_payload_matches_the_capture(i: int) -> None:
    record = RECORDS[i]
    payload = payload_of(record)
    assert len(payload) == record["frame2_payload_len"]
    assert payload[:48].hex() == record["frame2_payload_head_hex"]


@pytest.mark.parametrize("i", range(len(RECORDS)))
def test_decode_capture_matches_vllm_typed_decode(i: int) -> None:
    record = RECORDS[i]
    batch = decode_batch(payload_of(record))
    assert batch.ts == record["typed"]["ts"]
    assert batch.data_parallel_rank == record["typed"]["data_parallel_rank"] == 0
    assert batch.events == typed_events(record)
    assert batch.skipped == 0


@pytest.mark.parametrize("i", range(len(RECORDS)))
def test_encode_is_byte_identical_to_vllm(i: int) -> None:
    record = RECORDS[i]
    encoded = encode_batch(record["typed"]["ts"], typed_events(record), 0)
    assert encoded == payload_of(record)


def test_vllm_helpers_fill_what_vllm_0_32_sends() -> None:
    stored = next(r for r in RECORDS if r["typed"]["events"][0]["type"] == "BlockStored")
    ev = stored["typed"]["events"][0]
    rebuilt = vllm_block_stored(
        ev["block_hashes"], ev["parent_block_hash"], ev["token_ids"], ev["block_size"]
    )
    assert encode_batch(stored["typed"]["ts"], [rebuilt]) == payload_of(stored)

    removed = next(
        r for r in RECORDS if {e["type"] for e in r["typed"]["events"]} == {"BlockRemoved"}
    )
    events = [vllm_block_removed(e["block_hashes"]) for e in removed["typed"]["events"]]
    assert encode_batch(removed["typed"]["ts"], events) == payload_of(removed)


# ---- both wire forms ---------------------------------------------------------------------

EVENTS: list[Any] = [
    vllm_block_stored([1, 2**64 - 1], None, list(range(8)), 4),
    BlockStored(block_hashes=[7], parent_block_hash=2**63, token_ids=[5, 6], block_size=2),
    BlockStored(
        block_hashes=[3],
        parent_block_hash=1,
        token_ids=[9, 9],
        block_size=2,
        lora_id=4,
        medium="CPU",
        lora_name="adapter",
        extra_keys=[["salt"]],
        group_idx=1,
        kv_cache_spec_kind="sliding_window",
        kv_cache_spec_sliding_window=4096,
    ),
    vllm_block_removed([2**64 - 1]),
    BlockRemoved(block_hashes=[1, 2]),
    AllBlocksCleared(),
]


@pytest.mark.parametrize("form", ["map", "array"])
@pytest.mark.parametrize("dp_rank", [0, 3, None])
def test_round_trip(form: str, dp_rank: int | None) -> None:
    payload = encode_batch(1795875608.6678207, EVENTS, dp_rank, form=form)  # type: ignore[arg-type]
    assert decode_batch(payload) == KVEventBatch(1795875608.6678207, EVENTS, dp_rank)


def test_array_form_has_the_older_positional_layout() -> None:
    raw = msgspec.msgpack.decode(encode_batch(5.0, EVENTS[1:2] + EVENTS[4:], form="array"))
    assert raw == [
        5.0,
        [
            ["BlockStored", [7], 2**63, [5, 6], 2, None, None],
            ["BlockRemoved", [1, 2], None],
            ["AllBlocksCleared"],
        ],
        0,
    ]


@pytest.mark.parametrize(
    ("raw_event", "want"),
    [
        # vLLM <= 0.25 style: tagged arrays, medium present
        (
            ["BlockStored", [11, 12], None, [1, 2, 3, 4], 2, None, "GPU"],
            BlockStored(block_hashes=[11, 12], token_ids=[1, 2, 3, 4], block_size=2, medium="GPU"),
        ),
        # oldest: no lora_id / medium at all
        (
            ["BlockStored", [11], 10, [1, 2], 2],
            BlockStored(block_hashes=[11], parent_block_hash=10, token_ids=[1, 2], block_size=2),
        ),
        # newer trailing fields we do not know are ignored
        (
            ["BlockRemoved", [5], "GPU", 0, "future-field", {"x": 1}],
            BlockRemoved(block_hashes=[5], medium="GPU", group_idx=0),
        ),
        (["AllBlocksCleared"], AllBlocksCleared()),
        # map form with only the required keys
        (
            {"type": "BlockStored", "block_hashes": [1], "token_ids": [0, 0], "block_size": 2},
            BlockStored(block_hashes=[1], token_ids=[0, 0], block_size=2),
        ),
        ({"type": "BlockRemoved", "block_hashes": [9]}, BlockRemoved(block_hashes=[9])),
    ],
)
def test_decode_older_and_sparse_events(raw_event: Any, want: Any) -> None:
    batch = decode_batch(msgspec.msgpack.encode([1.0, [raw_event], 0]))
    assert batch.events == [want]


DIGEST = bytes(range(32))  # a 32-byte sha256-style digest
DIGEST_INT = int.from_bytes(DIGEST[-8:], "big")


@pytest.mark.parametrize(
    "raw_event",
    [
        {
            "type": "BlockStored",
            "block_hashes": [DIGEST, 5],
            "parent_block_hash": DIGEST,
            "token_ids": [1, 2, 3, 4],
            "block_size": 2,
        },
        ["BlockStored", [DIGEST, 5], DIGEST, [1, 2, 3, 4], 2, None, "GPU"],
    ],
)
def test_bytes_hashes_become_last_8_bytes(raw_event: Any) -> None:
    (ev,) = decode_batch(msgspec.msgpack.encode([1.0, [raw_event], 0])).events
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == [DIGEST_INT, 5]
    assert ev.parent_block_hash == DIGEST_INT


def test_bytes_hash_in_block_removed() -> None:
    raw = [1.0, [{"type": "BlockRemoved", "block_hashes": [b"\x01" * 8]}], 0]
    assert decode_batch(msgspec.msgpack.encode(raw)).events == [
        BlockRemoved(block_hashes=[0x0101010101010101])
    ]


def test_unknown_event_types_are_skipped() -> None:
    raw = [
        2.0,
        [
            {"type": "BlockPinned", "block_hashes": [1]},
            ["SomethingNew", 1, 2],
            {"type": "AllBlocksCleared"},
            {"no_type": True},
        ],
        1,
    ]
    batch = decode_batch(msgspec.msgpack.encode(raw))
    assert batch.events == [AllBlocksCleared()]
    assert batch.skipped == 3
    assert batch.data_parallel_rank == 1


def test_map_shaped_batch_and_missing_rank() -> None:
    as_map = {"ts": 3.0, "events": [{"type": "AllBlocksCleared"}], "data_parallel_rank": 2}
    assert decode_batch(msgspec.msgpack.encode(as_map)) == KVEventBatch(
        3.0, [AllBlocksCleared()], 2
    )
    two = msgspec.msgpack.encode([3, [["AllBlocksCleared"]]])
    assert decode_batch(two) == KVEventBatch(3.0, [AllBlocksCleared()], None)


GARBAGE = {
    "empty": b"",
    "not-msgpack": b"\xc1\xc1\xc1",
    "truncated": encode_batch(1.0, EVENTS)[:-3],
    "scalar": msgspec.msgpack.encode(5),
    "short-array": msgspec.msgpack.encode([1.0]),
    "events-not-list": msgspec.msgpack.encode([1.0, "x", 0]),
    "ts-not-number": msgspec.msgpack.encode(["x", [], 0]),
    "rank-not-int": msgspec.msgpack.encode([1.0, [], "zero"]),
    "event-scalar": msgspec.msgpack.encode([1.0, [42], 0]),
    "stored-bad-hashes": msgspec.msgpack.encode(
        [1.0, [{"type": "BlockStored", "block_hashes": "x", "token_ids": [], "block_size": 1}]]
    ),
    "stored-missing-tokens": msgspec.msgpack.encode(
        [1.0, [{"type": "BlockStored", "block_hashes": [1], "block_size": 1}]]
    ),
    "removed-hash-float": msgspec.msgpack.encode(
        [1.0, [{"type": "BlockRemoved", "block_hashes": [1.5]}]]
    ),
    "short-array-event": msgspec.msgpack.encode([1.0, [["BlockStored", [1]]]]),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_raises_decode_error(name: str) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_batch(GARBAGE[name])


def test_encode_rejects_unknown_form_and_non_events() -> None:
    with pytest.raises(ValueError):
        encode_batch(1.0, [], form="yaml")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_batch(1.0, ["BlockStored"])  # type: ignore[list-item]


# ---- sequence tracking ------------------------------------------------------------------

P = [f"payload-{i}".encode() for i in range(10)]
Q = [f"other-life-{i}".encode() for i in range(10)]


@pytest.mark.parametrize(
    ("steps", "want", "kwargs"),
    [
        ([(0, P[0]), (1, P[1]), (2, P[2])], [None, None, None], {}),
        ([(5, P[5]), (6, P[6])], [None, None], {}),  # late join, nothing expected
        ([(5, P[5])], [Gap(0, 5)], {"expect_first": 0}),  # late join with history wanted
        ([(0, P[0]), (1, P[1]), (4, P[4]), (5, P[5])], [None, None, Gap(2, 4), None], {}),
        ([(0, P[0]), (1, P[1]), (1, P[1]), (0, P[0]), (2, P[2])], [None] * 5, {}),
        # restart: back to 0 with a different payload
        ([(0, P[0]), (1, P[1]), (2, P[2]), (0, Q[0]), (1, Q[1])],
         [None, None, None, Gap(0, 0, restart=True), None], {}),
        # restart whose first batches were lost to the slow joiner
        ([(0, P[0]), (1, P[1]), (2, P[2]), (3, P[3]), (2, Q[2])],
         [None, None, None, None, Gap(0, 2, restart=True)], {}),
        # without payloads: a recent seq is a duplicate, 0 is a restart
        ([(3, None), (4, None), (4, None), (3, None), (0, None)],
         [None, None, None, None, Gap(0, 0, restart=True)], {}),
        # a seq older than the window cannot be a duplicate we remember: restart
        ([(0, P[0]), (1, P[1]), (2, P[2]), (3, P[3]), (0, P[0])],
         [None, None, None, None, Gap(0, 0, restart=True)], {"window": 2}),
    ],
)  # fmt: skip
def test_sequence_tracker(
    steps: list[tuple[int, bytes | None]], want: list[Gap | None], kwargs: dict[str, int]
) -> None:
    tracker = SequenceTracker(**kwargs)
    assert [tracker.observe(seq, payload) for seq, payload in steps] == want


def test_duplicates_are_reported_and_change_nothing() -> None:
    tracker = SequenceTracker()
    for seq in range(3):
        tracker.observe(seq, P[seq])
    assert tracker.is_duplicate(1, P[1]) and tracker.is_duplicate(2, P[2])
    assert not tracker.is_duplicate(1, Q[1])  # same seq, other content: a restart
    assert not tracker.is_duplicate(3, P[3])
    assert tracker.observe(1, P[1]) is None
    assert tracker.duplicates == 1 and tracker.last == 2
    assert tracker.observe(3, P[3]) is None  # still in order after the duplicate


def test_gap_missed() -> None:
    assert Gap(2, 7).missed == 5 and Gap(0, 0, restart=True).missed == 0


def test_capture_sequence_has_one_restart_and_no_gap() -> None:
    tracker = SequenceTracker()
    gaps = [
        (i, g)
        for i, r in enumerate(RECORDS)
        if (g := tracker.observe(r["frame1_seq"], payload_of(r))) is not None
    ]
    assert gaps == [(29, Gap(0, 0, restart=True))]
