"""A clock-free model of one vLLM v1 engine: continuous batching over a paged, prefix-cached KV
cache, with step durations from a HardwareProfile.

Time enters only through ``now`` (an earlier ``now`` than already seen counts as the latest one).
One step is in flight at a time: it is scheduled when the previous one ends (or when a request
reaches an idle engine), and its outputs are stamped with its end time. Scheduling follows
vLLM's v1 scheduler:

1. Running requests, in order, get their next tokens (one for decode, a chunk for an unfinished
   prefill) within the step's token budget. If blocks run out, the newest running request is
   preempted (blocks freed, progress reset, generated tokens kept for recompute) and put at the
   front of the waiting queue; a request that has to preempt itself stops the pass.
2. If nobody was preempted, waiting requests are admitted first come first served while the
   budget lasts and fewer than ``max_num_seqs`` run, each reusing its longest cached prefix.
   The first one that cannot get blocks stays waiting and blocks those behind it.

A request samples a token at the end of every step in which its computed tokens catch up with
its known tokens; it finishes with "length" after ``max_tokens`` tokens or at
``max_model_len``. EOS is not modelled.

Optional profile terms model a server whose API process shares the engine's processor (a
CPU build): ``request_latency_s`` delays each request's entry into the waiting queue (the
path from the HTTP request to the scheduler), by ``request_lag_steps`` times the duration of
the step in flight more when the engine is busy (the API process then gets the processor in
turns with the engine), and ``request_cpu`` is processor time each received request costs,
added to the duration of the next step the engine starts. A profile
with ``shared_kv_read_factor`` < 1 also gets the batch's distinct KV context (the blocks in
use) for each step, so that blocks shared by several requests can cost less than one read
each. All default to the behaviour without them.

Prefill/decode disaggregation (lbproxy.sim.kv_transfer, vLLM's NixlConnector): a request with
``hold_kv`` (a producer's prefill) keeps its blocks when it finishes, until
``release_held``. A request with ``remote_kv_gbps`` (a consumer's decode) is admitted with
its prompt's KV arriving from a remote producer: blocks for the whole prompt are allocated
at admission (local prefix hits reused, the rest counted as external hits), nothing is
computed, and after the transfer time (bytes of the pulled blocks / link) it joins the
running requests with only its last prompt token to compute, as vLLM recomputes it for the
logits. While loading it counts against ``max_num_seqs`` but not as running or waiting.
Requests without either take exactly the paths they took before.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from lbproxy.sim.hardware import HardwareProfile
from lbproxy.sim.kv_cache import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheManager,
    KVEvent,
    RequestBlocks,
)
from lbproxy.sim.kv_transfer import transfer_bytes, transfer_seconds

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "Engine",
    "EngineCounters",
    "EngineRequest",
    "KVEvent",
    "TokenOutput",
]


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    min_tokens: int = 0  # accepted for parity with vLLM; without EOS it changes nothing
    arrival_time: float = 0.0  # the caller's; the engine never reads it
    hold_kv: bool = False  # P/D producer: keep the blocks at the end, until release_held
    remote_kv_gbps: float | None = None  # P/D consumer: prompt KV pulled over this link
    # Filled by the engine.
    output_token_ids: list[int] = field(default_factory=list, init=False)
    num_cached_tokens: int = field(default=0, init=False)
    first_token_time: float | None = field(default=None, init=False)
    finish_time: float | None = field(default=None, init=False)
    finish_reason: str | None = field(default=None, init=False)
    num_preemptions: int = field(default=0, init=False)
    num_external_tokens: int = field(default=0, init=False)  # prompt tokens pulled remotely
    kv_transfer_bytes: float = field(default=0.0, init=False)
    kv_transfer_s: float | None = field(default=None, init=False)  # set when pulled
    # Engine internals.
    _kv: RequestBlocks = field(init=False, repr=False, compare=False)
    _num_computed: int = field(default=0, init=False, repr=False, compare=False)
    _scheduled_once: bool = field(default=False, init=False, repr=False, compare=False)
    _last_token_time: float = field(default=0.0, init=False, repr=False, compare=False)
    _arriving: bool = field(default=False, init=False, repr=False, compare=False)
    _loading: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by generated tokens (the engine's own list: do not mutate)."""
        return self._kv.token_ids


@dataclass(slots=True)
class TokenOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int
    time: float


@dataclass(frozen=True, slots=True)
class EngineCounters:
    """Cumulative counters, as vLLM's ``*_total`` metrics."""

    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    num_preemptions: int


class Engine:
    """One simulated vLLM server. See the module docstring for the scheduling rules."""

    __slots__ = (
        "_arriving",
        "_batch",
        "_clock",
        "_cpu_debt",
        "_held",
        "_kv",
        "_num_loading",
        "_outputs",
        "_pulls",
        "_rand",
        "_requests",
        "_running",
        "_step_end",
        "_step_len",
        "_vocab_size",
        "_waiting",
        "external_prefix_cache_hits",
        "external_prefix_cache_queries",
        "generation_tokens",
        "itl_count",
        "itl_sum",
        "kv_transfer_bytes",
        "kv_transfer_seconds",
        "kv_transfers",
        "num_preemptions",
        "prefix_cache_hits",
        "prefix_cache_queries",
        "profile",
        "prompt_tokens",
        "prompt_tokens_cached",
        "prompt_tokens_external",
    )

    def __init__(
        self,
        profile: HardwareProfile,
        *,
        seed: int = 0,
        vocab_size: int = 32000,
        hash_seed: int = 0,
    ) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.profile = profile
        self._kv = KVCacheManager(profile.num_gpu_blocks, profile.block_size, hash_seed)
        self._rand = random.Random(seed).random
        self._vocab_size = vocab_size
        self._requests: dict[str, EngineRequest] = {}
        self._running: list[EngineRequest] = []
        self._waiting: deque[EngineRequest] = deque()
        self._batch: list[EngineRequest] = []
        self._step_end: float | None = None
        self._step_len = 0.0  # duration of the step in flight
        self._clock = float("-inf")  # latest `now` seen: time never runs backwards
        self._cpu_debt = 0.0  # processor time of received requests, for the next step
        # Received, not yet in the waiting queue: (time it gets there, request), in order.
        self._arriving: deque[tuple[float, EngineRequest]] = deque()
        self._outputs: list[TokenOutput] = []
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_preemptions = 0
        self.itl_sum = 0.0  # seconds between consecutive tokens of a request, summed
        self.itl_count = 0
        # P/D (see the module docstring).
        self._held: dict[str, RequestBlocks] = {}
        self._num_loading = 0
        self._pulls: list[tuple[str, float, float]] = []  # (request id, pulled at, seconds)
        self.external_prefix_cache_queries = 0
        self.external_prefix_cache_hits = 0
        self.prompt_tokens_cached = 0  # of prompt_tokens: local prefix-cache hits
        self.prompt_tokens_external = 0  # of prompt_tokens: pulled from a producer
        self.kv_transfers = 0
        self.kv_transfer_bytes = 0.0
        self.kv_transfer_seconds = 0.0

    # ---- live stats -------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self._kv.pool.usage

    @property
    def counters(self) -> EngineCounters:
        return EngineCounters(
            self.prefix_cache_queries,
            self.prefix_cache_hits,
            self.prompt_tokens,
            self.generation_tokens,
            self.num_preemptions,
        )

    def running_request_ids(self) -> list[str]:
        """Running requests, oldest admitted first (the last one is preempted first)."""
        return [r.request_id for r in self._running]

    def waiting_request_ids(self) -> list[str]:
        """Waiting requests in admission order (preempted ones at the front)."""
        return [r.request_id for r in self._waiting]

    @property
    def kv_cache(self) -> KVCacheManager:
        """The block pool and manager, for inspection."""
        return self._kv

    # ---- requests ---------------------------------------------------------------------------

    def add_request(self, req: EngineRequest, now: float) -> None:
        """Queue a request. Steps ending at or before ``now`` complete first (their outputs are
        kept for the next ``step`` call), so the request never joins a step that began earlier.
        """
        self._advance(now)
        prompt = req.prompt_token_ids
        if req.request_id in self._requests:
            raise ValueError(f"request {req.request_id!r} is already in the engine")
        if not prompt:
            raise ValueError(f"request {req.request_id!r}: empty prompt")
        if len(prompt) >= self.profile.max_model_len:
            raise ValueError(
                f"request {req.request_id!r}: prompt of {len(prompt)} tokens leaves no room "
                f"for output within max_model_len {self.profile.max_model_len}"
            )
        if req.max_tokens < 1:
            raise ValueError(f"request {req.request_id!r}: max_tokens must be >= 1")
        if req.finish_reason is not None or req.output_token_ids:
            raise ValueError(f"request {req.request_id!r} was already run")
        req._kv = RequestBlocks(list(prompt))
        self._requests[req.request_id] = req
        self._cpu_debt += self.profile.request_cpu(len(prompt))
        latency = self.profile.request_latency_s
        if self._step_end is not None:
            latency += self.profile.request_lag_steps * self._step_len
        if latency > 0:
            req._arriving = True
            self._arriving.append((self._clock + latency, req))
            return
        self._waiting.append(req)
        if self._step_end is None:
            self._start_step(self._clock)

    def abort(self, request_id: str, now: float) -> None:
        """Finish a request with "abort" and free its blocks now (full ones stay cached).

        No TokenOutput is produced for it. No-op for unknown or finished requests.
        """
        self._advance(now)
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if req._arriving:
            # Not in the waiting queue yet (skipped when it gets there), or loading remote KV.
            if req._loading:
                self._kv.free(req._kv)
                self._num_loading -= 1
        elif req._kv.blocks:
            self._kv.free(req._kv)
            self._running.remove(req)
        else:
            # Waiting (never scheduled, or preempted): holds no blocks.
            self._waiting.remove(req)
        req.finish_reason = "abort"
        req.finish_time = now

    # ---- time -------------------------------------------------------------------------------

    def next_event_time(self) -> float | None:
        """End of the step in flight; when idle, the time the next received request reaches
        the waiting queue (``request_latency_s``); None when idle and nothing is arriving.

        If ``add_request`` or ``abort`` completed steps whose outputs were not yet taken, the
        first of those outputs' times (already due) so that the caller steps at once.
        """
        if self._outputs:
            return self._outputs[0].time
        if self._step_end is None and self._arriving:
            return self._arriving[0][0]
        return self._step_end

    def step(self, now: float) -> list[TokenOutput]:
        """Complete every step ending at or before ``now``; return their outputs in order."""
        self._advance(now)
        out, self._outputs = self._outputs, []
        return out

    def _advance(self, now: float) -> None:
        if now > self._clock:
            self._clock = now
        arriving = self._arriving
        while True:
            end = self._step_end
            if arriving and arriving[0][0] <= now and (end is None or arriving[0][0] <= end):
                # A request reaches the waiting queue before the next step is scheduled (or
                # starts one on an idle engine).
                t, req = arriving.popleft()
                req._arriving = False
                if req.finish_reason is None:  # not aborted meanwhile
                    if req._loading:  # its remote KV has arrived: compute the last token
                        req._loading = False
                        self._num_loading -= 1
                        self._running.append(req)
                    else:
                        self._waiting.append(req)
                    if self._step_end is None:
                        self._start_step(t)
                continue
            if end is None or end > now:
                return
            self._complete_step(end)
            self._start_step(end)

    def _start_step(self, start: float) -> None:
        batch, duration = self._schedule(start)
        if not batch and (self._running or self._waiting):
            # Everything running was preempted: vLLM schedules again at once, and the waiting
            # head then fits, since a lone max_model_len request always fits.
            batch, duration = self._schedule(start)
            # With KV being loaded or held for a remote decode, the head waits for blocks.
            if not batch and not self._num_loading and not self._held:
                raise RuntimeError("engine stalled with work queued")  # a bug, never expected
        if batch and self._cpu_debt:
            duration += self._cpu_debt
            self._cpu_debt = 0.0
        self._batch = batch
        self._step_end = start + duration if batch else None
        self._step_len = duration

    # ---- scheduling -------------------------------------------------------------------------

    def _schedule(self, start: float) -> tuple[list[EngineRequest], float]:
        profile = self.profile
        kv = self._kv
        bs = profile.block_size
        budget = profile.max_num_batched_tokens
        running = self._running
        batch: list[EngineRequest] = []
        prefill_tokens = decode_seqs = context = pairs = 0
        preempted = False

        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            computed = req._num_computed
            num_new = len(req._kv.token_ids) - computed
            if num_new > budget:
                num_new = budget
            scheduled = True
            while not kv.allocate_slots(req._kv, computed, num_new):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    scheduled = False
                    break
            if not scheduled:
                break
            req._num_computed = computed + num_new
            budget -= num_new
            batch.append(req)
            context += computed + num_new
            if num_new == 1 and req.output_token_ids and computed + 1 == len(req._kv.token_ids):
                decode_seqs += 1
            else:
                prefill_tokens += num_new
                pairs += num_new * computed + num_new * (num_new + 1) // 2
            i += 1

        if not preempted:
            waiting = self._waiting
            max_seqs = profile.max_num_seqs
            while waiting and budget > 0 and len(running) + self._num_loading < max_seqs:
                req = waiting[0]
                hits = kv.get_computed_blocks(req._kv)
                num_hit = len(hits) * bs
                if req.remote_kv_gbps is not None:
                    if not self._admit_remote(req, hits, num_hit, start):
                        break
                    continue
                num_new = len(req._kv.token_ids) - num_hit
                if num_new > budget:
                    num_new = budget
                if not kv.allocate_slots(req._kv, 0, num_new, hits):
                    break
                waiting.popleft()
                running.append(req)
                if not req._scheduled_once:
                    # vLLM counts prefix-cache queries and hits for new requests only.
                    req._scheduled_once = True
                    req.num_cached_tokens = num_hit
                    self.prefix_cache_queries += len(req._kv.token_ids)
                    self.prefix_cache_hits += num_hit
                req._num_computed = num_hit + num_new
                budget -= num_new
                batch.append(req)
                context += num_hit + num_new
                prefill_tokens += num_new
                pairs += num_new * num_hit + num_new * (num_new + 1) // 2

        if not batch:
            return batch, 0.0
        if profile.shared_kv_read_factor < 1.0:
            # Distinct KV context: the blocks in use (held by running requests).
            pool = kv.pool
            unique = min(context, (pool.num_gpu_blocks - 1 - pool.num_free_blocks) * bs)
            duration = profile.step_time(
                prefill_tokens,
                decode_seqs,
                context,
                len(batch),
                prefill_attn_pairs=pairs,
                unique_context_tokens=unique,
            )
        else:
            duration = profile.step_time(
                prefill_tokens, decode_seqs, context, len(batch), prefill_attn_pairs=pairs
            )
        return batch, duration

    def _admit_remote(
        self, req: EngineRequest, hits: list[int], num_hit: int, start: float
    ) -> bool:
        """Admit a consumer's request whose prompt KV is pulled from a producer: allocate
        blocks for the whole prompt now (False if they do not fit), start the transfer of
        the blocks not hit locally, and park it until the transfer ends (see the module
        docstring). vLLM counts the pulled tokens as external prefix-cache hits."""
        kv = self._kv
        tokens = req._kv.token_ids
        n = len(tokens)
        n_ext = n - num_hit
        if not kv.allocate_slots(req._kv, 0, n_ext, hits):
            return False
        self._waiting.popleft()
        req._scheduled_once = True
        req.num_cached_tokens = num_hit
        req.num_external_tokens = n_ext
        self.prefix_cache_queries += n
        self.prefix_cache_hits += num_hit
        self.external_prefix_cache_queries += n
        self.external_prefix_cache_hits += n_ext
        profile = self.profile
        pulled_blocks = len(req._kv.blocks) - len(hits)
        nbytes = transfer_bytes(pulled_blocks, profile.block_size, profile.kv_bytes_per_token)
        secs = transfer_seconds(nbytes, req.remote_kv_gbps or 0.0)
        req.kv_transfer_bytes = nbytes
        req.kv_transfer_s = secs
        self.kv_transfers += 1
        self.kv_transfer_bytes += nbytes
        self.kv_transfer_seconds += secs
        req.remote_kv_gbps = None  # pulled once: after a preemption it recomputes locally
        # vLLM's scheduler recomputes the last prompt token when all of them were loaded.
        req._num_computed = n - 1
        req._arriving = req._loading = True
        self._num_loading += 1
        ready = start + secs
        self._pulls.append((req.request_id, ready, secs))
        arriving = self._arriving
        i = len(arriving)
        while i and arriving[i - 1][0] > ready:  # keep the queue in time order
            i -= 1
        arriving.insert(i, (ready, req))
        return True

    def _preempt(self, req: EngineRequest) -> None:
        self._kv.free(req._kv)
        req._num_computed = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(req)

    def _complete_step(self, end: float) -> None:
        rand = self._rand
        vocab = self._vocab_size
        max_model_len = self.profile.max_model_len
        outputs = self._outputs
        any_finished = False
        for req in self._batch:
            if req.finish_reason is not None:
                continue  # aborted while the step ran
            tokens = req._kv.token_ids
            if req._num_computed < len(tokens):
                continue  # a prefill chunk: nothing sampled yet
            tok = int(rand() * vocab)
            tokens.append(tok)
            out_ids = req.output_token_ids
            out_ids.append(tok)
            self.generation_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = end
                self.prompt_tokens += len(req.prompt_token_ids)
                self.prompt_tokens_cached += req.num_cached_tokens
                self.prompt_tokens_external += req.num_external_tokens
            else:  # vllm:inter_token_latency_seconds: each token's gap since the previous
                self.itl_sum += end - req._last_token_time
                self.itl_count += 1
            req._last_token_time = end
            finished = len(out_ids) >= req.max_tokens or len(tokens) >= max_model_len
            if finished:
                req.finish_reason = "length"
                req.finish_time = end
                if req.hold_kv:  # a P/D producer keeps the KV until it is pulled
                    self._held[req.request_id] = req._kv
                else:
                    self._kv.free(req._kv)
                del self._requests[req.request_id]
                any_finished = True
            outputs.append(
                TokenOutput(
                    req.request_id,
                    [tok],
                    finished,
                    req.finish_reason,
                    req.num_cached_tokens,
                    end,
                )
            )
        self._batch = []
        if any_finished:
            self._running = [r for r in self._running if r.finish_reason is None]

    # ---- P/D producer -----------------------------------------------------------------------

    def held_block_ids(self, request_id: str) -> list[int] | None:
        """Blocks a finished ``hold_kv`` request still holds (None when not held)."""
        kv = self._held.get(request_id)
        return None if kv is None else list(kv.blocks)

    def drain_pulls(self) -> list[tuple[str, float, float]]:
        """Remote-KV transfers started since the last drain (a consumer's side): (request
        id, time the pull completes, its seconds), so an offline driver can free the
        producer's blocks then, as the producer does once the read is done."""
        out, self._pulls = self._pulls, []
        return out

    @property
    def num_held(self) -> int:
        return len(self._held)

    def release_held(self, request_id: str, now: float) -> bool:
        """Free a held request's blocks (pulled, or its hold timed out); False if not held."""
        self._advance(now)
        kv = self._held.pop(request_id, None)
        if kv is None:
            return False
        self._kv.free(kv)
        if self._step_end is None and self._waiting:  # the freed blocks may admit the head
            self._start_step(self._clock)
        return True

    # ---- prefix cache -----------------------------------------------------------------------

    def drain_kv_events(self) -> list[KVEvent]:
        """KV events since the last drain, in order."""
        return self._kv.pool.take_events()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash (AllBlocksCleared); fails while any request holds blocks."""
        return self._kv.pool.reset_prefix_cache()

    def cached_block_hashes(self) -> set[int]:
        """Hashes of all full, hashed blocks, in use or free-but-cached."""
        return self._kv.pool.cached_hashes()
