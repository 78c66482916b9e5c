"""Precise prefix index: which blocks each backend's vLLM prefix cache holds, from its KV events.

Keys. vLLM's own block hashes depend on PYTHONHASHSEED and its hash algorithm, and a
request at routing time has only token ids, so we key blocks by our own chain over token
ids: key_i = xxh64(uint32 bytes of tokens[i*B:(i+1)*B], seed=key_{i-1}), key_{-1} =
ROOT_SEED, B = the backend's block size. Like vLLM, only full blocks from token 0 count.

Events (matched by class name, so the signals decoder's msgspec structs and the
simulator's dataclasses both work):
- BlockStored(block_hashes, parent_block_hash, token_ids, block_size, ...): our keys are
  chained from the parent's key (ROOT_SEED when the parent is None, i.e. the prompt start),
  found through the backend's map engine-hash -> our key; each new block is remembered in
  that map. Engine hashes are a multiset, as in vLLM (v1/core/block_pool.py): it does not
  de-duplicate cached blocks (block tables stay append-only), so `cache_full_blocks` emits
  one BlockStored per block that becomes full, even when the same hash is already cached
  (the same greedy prompt generated twice fills a fresh block with the same tokens; with
  no parent when the prompt is shorter than a block, as it then has no prefix hit), and
  `_maybe_evict_cached_block` emits one BlockRemoved per evicted copy. So a BlockStored of
  a known hash is another copy, and the hash stays cached until its last copy is removed.
- Report modes. vLLM's default, `kv_cache_report_mode: incremental`, announces only newly
  cached blocks: every BlockStored is a copy, as above (report_mode="incremental"). A
  request with `vllm_xargs: {kv_cache_report_mode: full}` also gets its prefix-cache hits
  re-announced (`emit_cached_block_events`: from the prompt start, no parent, no new copy
  and no BlockRemoved to come), which the stream cannot tell from a real copy. With
  report_mode="full", an event with no parent whose first block is held (or was taken for
  a re-announcement before) is taken as one: its held hashes are not counted again
  (`resent_blocks`). When one was a real copy after all, the hash leaves the index at its
  first removal (under-reporting, never a phantom block); its map entry is kept, so the
  surviving copy's children still resolve their parent and the later removal counts as
  `resent_removed`, not unknown.
- BlockRemoved(block_hashes): resolved through the map; unknown hashes are counted
  (`unknown_removed`: events were missed, or the stream holds something we do not model).
- AllBlocksCleared: the backend's entries are dropped.
Skipped and counted: events for another medium than GPU (CPU offload tiers), for a
non-zero KV-cache group, for a LoRA adapter (its blocks differ from the base model's with
the same tokens), and, from the first block with extra keys (multimodal inputs, cache
salt) on, blocks whose content the token ids do not determine.

Unknown parent. A BlockStored whose parent engine hash is not in the map (we joined after
the parent was announced, or missed events) cannot be keyed: keys chain from token 0. It
is dropped and counted (`orphan_blocks`), and so are its descendants (their parents are
then unknown too). Nothing is lost for matching, which is consecutive from the start: a
request could never match past the unknown parent anyway. The subscriber must apply
replayed batches in sequence order, before newer ones, or `forget` the backend.

Speculation. `speculate(backend, keys, now, ttl)` records that a request was just routed
there: its blocks will be stored shortly. Such entries count in matches until `now >=
expiry` (`expire(now)`, also done by `match(..., now=now)`), and a BlockStored of the same
key confirms them (they become ordinary entries, removed only by BlockRemoved). They share
the key -> backends table with confirmed entries, so a lookup costs the same either way.

Memory: each backend holds at most `max_blocks_per_backend` engine hashes (the oldest
sixteenth is dropped when it overflows, which only happens if removals were missed).
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Iterable, Sequence
from itertools import accumulate, filterfalse, islice, repeat, takewhile
from operator import and_, or_
from typing import Any, Literal

from lbproxy.routing.prefix_index import ChainHasher, EndpointBits, chain_hashes, prefix_lengths

ROOT_SEED = 0x6C627072_6F787931  # our key chain starts here (any constant works)
_TOKEN_BYTES = 4
assert array("I").itemsize == _TOKEN_BYTES
_ENTRY_BYTES = 250  # rough bytes per stored block (engine map + refcount + table), for stats

ReportMode = Literal["incremental", "full"]  # vLLM's per-request kv_cache_report_mode


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as native uint32 bytes, the unit our keys hash."""
    if type(token_ids) is array and token_ids.typecode == "I":  # as the proxy gives them
        return token_ids.tobytes()
    return array("I", token_ids).tobytes()


def block_keys(token_ids: Sequence[int], block_size: int, parent: int = ROOT_SEED) -> list[int]:
    """Our keys of the full blocks of `token_ids`, chained from `parent`."""
    return chain_hashes(token_bytes(token_ids), block_size * _TOKEN_BYTES, parent)


class PreciseIndex:
    """Our block keys per backend, fed by KV events; see the module docstring."""

    def __init__(
        self, *, max_blocks_per_backend: int = 1 << 20, report_mode: ReportMode = "incremental"
    ) -> None:
        self.max_blocks_per_backend = max_blocks_per_backend
        self.report_mode: ReportMode = report_mode
        self._bits = EndpointBits()
        # our key -> bitmask of backends holding it, confirmed or speculatively
        self._table: dict[int, int] = {}
        self._held: dict[str, dict[int, int]] = {}  # backend -> our key -> refcount
        self._engine: dict[str, dict[int, int]] = {}  # backend -> engine hash -> our key
        self._dups: dict[str, dict[int, int]] = {}  # backend -> engine hash -> copies (> 1)
        # report_mode "full": backend -> engine hash -> our key, of blocks taken for
        # re-announcements; kept after their removal to resolve parents and removals.
        self._resent: dict[str, dict[int, int]] = {}
        self._block_size: dict[str, int] = {}
        # Moves whenever _block_size does: scorers keep each candidate's block size until then.
        self.block_sizes_version = 0
        # Speculative entries (not confirmed): backend -> key -> expiry, and an expiry heap.
        self._spec_by: dict[str, dict[int, float]] = {}
        self._spec_heap: list[tuple[float, int, str, list[int]]] = []
        self._spec_seq = 0
        self._hashers: dict[tuple[int, int | None], ChainHasher] = {}
        self.counters = dict.fromkeys(
            (
                "stored_blocks",
                "duplicate_blocks",
                "resent_blocks",
                "resent_removed",
                "orphan_blocks",
                "skipped_blocks",
                "malformed_events",
                "removed_blocks",
                "unknown_removed",
                "cleared",
                "overflow_dropped",
            ),
            0,
        )

    # ---- events ------------------------------------------------------------------------

    def apply_events(
        self, backend_name: str, events: Iterable[Any], block_size_hint: int | None = None
    ) -> None:
        """Apply one batch of a backend's KV events, in order."""
        for e in events:
            kind = type(e).__name__
            if kind == "BlockStored":
                self._stored(backend_name, e, block_size_hint)
            elif kind == "BlockRemoved":
                if _relevant(e):
                    self._removed(backend_name, e.block_hashes)
            elif kind == "AllBlocksCleared":
                self.counters["cleared"] += 1
                self._drop_confirmed(backend_name)

    def _stored(self, name: str, e: Any, hint: int | None) -> None:
        c = self.counters
        hashes = list(e.block_hashes)
        tokens = e.token_ids
        bs = getattr(e, "block_size", None) or hint
        if not hashes:
            return
        if not bs or len(tokens) != bs * len(hashes):
            c["malformed_events"] += 1
            return
        if not _relevant(e) or getattr(e, "lora_id", None) is not None:
            c["skipped_blocks"] += len(hashes)
            return
        extra = getattr(e, "extra_keys", None)
        if extra:
            cut = next((i for i, x in enumerate(extra) if x is not None), len(hashes))
            if cut < len(hashes):
                c["skipped_blocks"] += len(hashes) - cut
                hashes = hashes[:cut]
                tokens = tokens[: cut * bs]
                if not hashes:
                    return
        known = self._block_size.get(name)
        if known != bs:
            if known is not None:  # a restart with another geometry: old keys are meaningless
                self.forget(name)
            self._block_size[name] = bs
            self.block_sizes_version += 1
        engine = self._engine.setdefault(name, {})
        parent = e.parent_block_hash
        if parent is None:
            parent_key = ROOT_SEED
        else:
            pk = engine.get(parent)
            if pk is None and (resent := self._resent.get(name)):
                pk = resent.get(parent)
            if pk is None:
                c["orphan_blocks"] += len(hashes)
                return
            parent_key = pk
        keys = block_keys(tokens, bs, parent_key)
        held = self._held.setdefault(name, {})
        bit = self._bits.bit(name)
        table = self._table
        spec_by = self._spec_by.get(name)
        # Only with report_mode "full" (see the module docstring): known blocks of an event
        # from the prompt start are vLLM re-announcing prefix-cache hits, not new copies.
        resent = None
        if parent is None and self.report_mode == "full":
            resent = self._resent.setdefault(name, {})
            if hashes[0] not in engine and hashes[0] not in resent:
                resent = None  # block 0 unknown: not a re-announcement of what we hold
            elif len(resent) > self.max_blocks_per_backend:
                resent.clear()  # only makes later removals of these hashes count as unknown
        for eh, key in zip(hashes, keys, strict=True):
            if resent is not None and eh in engine:
                resent[eh] = key
                c["resent_blocks"] += 1
                continue
            if eh in engine:  # another physical block with the same content
                dups = self._dups.setdefault(name, {})
                dups[eh] = dups.get(eh, 1) + 1
                c["duplicate_blocks"] += 1
                continue
            engine[eh] = key
            n = held.get(key, 0)
            held[key] = n + 1
            if not n:
                table[key] = table.get(key, 0) | bit
                if spec_by:
                    spec_by.pop(key, None)  # confirmed: no longer expires
            c["stored_blocks"] += 1
        if len(engine) > self.max_blocks_per_backend:
            self._overflow(name)

    def _removed(self, name: str, hashes: Iterable[int]) -> None:
        engine = self._engine.get(name)
        c = self.counters
        if engine is None:
            c["unknown_removed"] += sum(1 for _ in hashes)
            return
        held = self._held[name]
        bit = self._bits.get(name)
        dups = self._dups.get(name)
        for eh in hashes:
            if dups and eh in dups:
                n = dups[eh] - 1
                if n > 1:
                    dups[eh] = n
                else:
                    del dups[eh]
                c["removed_blocks"] += 1
                continue
            key = engine.pop(eh, None)
            if key is None:
                resent = self._resent.get(name)
                if resent and eh in resent:  # a "re-announcement" was a real copy after all
                    c["resent_removed"] += 1
                else:
                    c["unknown_removed"] += 1
                continue
            c["removed_blocks"] += 1
            self._unref(held, key, bit)

    def _unref(self, held: dict[int, int], key: int, bit: int) -> None:
        n = held.get(key, 0)
        if n > 1:
            held[key] = n - 1
            return
        if n == 1:
            del held[key]
            self._clear_bit(key, bit)

    def _clear_bit(self, key: int, bit: int) -> None:
        m = self._table.get(key, 0) & ~bit
        if m:
            self._table[key] = m
        else:
            self._table.pop(key, None)

    def _overflow(self, name: str) -> None:
        engine = self._engine[name]
        held = self._held[name]
        bit = self._bits.get(name)
        cap = self.max_blocks_per_backend
        drop = list(islice(engine.items(), len(engine) - cap + cap // 16))
        dups = self._dups.get(name, {})
        for eh, key in drop:
            del engine[eh]
            dups.pop(eh, None)
            self._unref(held, key, bit)
        self.counters["overflow_dropped"] += len(drop)

    def _drop_confirmed(self, name: str) -> None:
        held = self._held.pop(name, None)
        self._engine.pop(name, None)
        self._dups.pop(name, None)
        self._resent.pop(name, None)
        bit = self._bits.get(name)
        if held and bit:
            spec_by = self._spec_by.get(name, {})
            for key in held:
                if key not in spec_by:
                    self._clear_bit(key, bit)

    def forget(self, backend_name: str) -> None:
        """Drop everything known about a backend (event gap, restart, removal)."""
        self._drop_confirmed(backend_name)
        spec_by = self._spec_by.pop(backend_name, None)
        bit = self._bits.get(backend_name)
        if spec_by and bit:
            for key in spec_by:
                self._clear_bit(key, bit)
        if self._block_size.pop(backend_name, None) is not None:
            self.block_sizes_version += 1
        self._bits.release(backend_name)

    # ---- speculation -------------------------------------------------------------------

    def speculate(self, backend_name: str, keys: Sequence[int], now: float, ttl: float) -> None:
        """Count `keys` as held by the backend until `now + ttl`, unless an event confirms."""
        self.expire(now)
        if ttl <= 0 or not keys:
            return
        held = self._held.get(backend_name)
        new = list(filterfalse(held.__contains__, keys)) if held else list(keys)
        if not new:
            return
        expiry = now + ttl
        bit = self._bits.bit(backend_name)
        self._spec_by.setdefault(backend_name, {}).update(zip(new, repeat(expiry)))
        table = self._table
        masks = map(or_, map(table.get, new, repeat(0)), repeat(bit))
        table.update(zip(new, masks, strict=True))
        self._spec_seq += 1
        heapq.heappush(self._spec_heap, (expiry, self._spec_seq, backend_name, new))

    def expire(self, now: float) -> None:
        """Drop speculative entries whose time is up."""
        heap = self._spec_heap
        while heap and heap[0][0] <= now:
            expiry, _, name, keys = heapq.heappop(heap)
            spec_by = self._spec_by.get(name)
            bit = self._bits.get(name)
            if not spec_by or not bit:
                continue
            for key in keys:
                if spec_by.get(key) == expiry:  # not re-speculated or confirmed since
                    del spec_by[key]
                    self._clear_bit(key, bit)

    # ---- lookups -----------------------------------------------------------------------

    def keys_for(
        self, token_ids: Sequence[int], block_size: int, max_blocks: int | None = None
    ) -> list[int]:
        """Our keys of a request's full blocks (at most `max_blocks`), from token 0.

        Reuses the keys of the longest identical prefix of a recent request. The list is
        shared with that cache: do not mutate it.
        """
        hasher = self._hashers.get((block_size, max_blocks))
        if hasher is None:
            hasher = ChainHasher(block_size * _TOKEN_BYTES, max_blocks)
            self._hashers[(block_size, max_blocks)] = hasher
        return hasher.hashes(token_bytes(token_ids), ROOT_SEED)

    def match(
        self,
        token_ids: Sequence[int],
        block_size: int,
        backends: Iterable[str],
        now: float | None = None,
    ) -> dict[str, int]:
        """Consecutive cached blocks from the start per backend (0s omitted).

        Live speculative entries count too; with `now`, expired ones are dropped first.
        """
        return self.match_keys(self.keys_for(token_ids, block_size), backends, now)

    def match_keys(
        self, keys: Sequence[int], backends: Iterable[str], now: float | None = None
    ) -> dict[str, int]:
        if not keys:
            return {}
        want = self._bits.mask(backends)
        if not want:
            return {}
        if now is not None:
            self.expire(now)
        masks = map(self._table.get, keys, repeat(0))
        first = next(masks) & want
        if not first:
            return {}
        # Running intersection, stopping at the first block no wanted backend holds.
        cum = list(takewhile(bool, accumulate(masks, and_, initial=first)))
        # cum holds masks, not keys: or_(mask, 0) is the mask itself.
        return prefix_lengths(self._bits, first, cum[-1], cum, or_)

    def block_size_of(self, backend_name: str) -> int | None:
        """The block size the backend's events announced, if any arrived."""
        return self._block_size.get(backend_name)

    def block_sizes(self, backend_names: Iterable[str]) -> list[int | None]:
        return list(map(self._block_size.get, backend_names))

    def held_counts(self, backend_names: Iterable[str]) -> list[int]:
        """Blocks each backend's cache holds per its events (duplicates included), plus
        its live speculative ones: its cache working set, in its own blocks."""
        engine, spec = self._engine, self._spec_by
        return [len(engine.get(n, ())) + len(spec.get(n, ())) for n in backend_names]

    def blocks_of(self, backend_name: str) -> set[int]:
        """Our keys the backend holds (confirmed by events; speculation excluded)."""
        return set(self._held.get(backend_name, ()))

    def engine_hashes_of(self, backend_name: str) -> set[int]:
        """The backend's own block hashes the index holds (what its KV events say it caches)."""
        return set(self._engine.get(backend_name, ()))

    def stats(self) -> dict[str, int]:
        entries = sum(len(h) for h in self._held.values())
        engine = sum(len(m) for m in self._engine.values())
        spec = sum(len(s) for s in self._spec_by.values())
        return {
            "backends": len(self._bits),
            "keys": len(self._table),
            "entries": entries,
            "engine_hashes": engine,
            "speculative": spec,
            "approx_bytes": engine * _ENTRY_BYTES + spec * _ENTRY_BYTES // 2,
            **self.counters,
        }


def _relevant(e: Any) -> bool:
    """GPU tier of KV-cache group 0 (what a prefix hit on the engine uses)."""
    medium = getattr(e, "medium", None)
    if medium is not None and medium.upper() != "GPU":
        return False
    group = getattr(e, "group_idx", None)
    return not group
