"""The simulated vLLM engine (lbproxy.sim.engine)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from lbproxy.sim.engine import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Engine,
    EngineRequest,
    TokenOutput,
)
from lbproxy.sim.hardware import HardwareProfile, load_profile

STEP = 0.01  # every step of the test profile takes exactly this long


def profile(**overrides: Any) -> HardwareProfile:
    """A profile whose steps all last STEP seconds, so that times can be checked exactly."""
    base = HardwareProfile(
        name="test",
        num_gpu_blocks=257,
        block_size=4,
        max_num_seqs=16,
        max_num_batched_tokens=64,
        max_model_len=512,
        fixed_overhead_s=STEP,
        per_request_overhead_s=0.0,
        weight_bytes=0.0,
        mem_bandwidth_bytes_per_s=1.0,
        weight_read_efficiency=1.0,
        kv_bytes_per_token=0.0,
        kv_read_efficiency=1.0,
        num_params=0.0,
        peak_flops=1.0,
        prefill_mfu=1.0,
        attn_flops_per_token_pair=0.0,
    )
    return replace(base, **overrides)


class Recording:
    """Wraps a profile and records what every step scheduled."""

    def __init__(self, inner: HardwareProfile) -> None:
        self._inner = inner
        self.steps: list[tuple[int, int, int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def step_time(self, prefill: int, decode: int, ctx: int, batch: int, **kw: int) -> float:
        self.steps.append((prefill, decode, ctx, batch))
        return self._inner.step_time(prefill, decode, ctx, batch, **kw)


def req(rid: str, prompt: list[int], max_tokens: int = 4) -> EngineRequest:
    return EngineRequest(rid, prompt, max_tokens)


def run(engine: Engine, check: Any = None) -> list[TokenOutput]:
    """Step the engine until idle; ``check(engine)`` runs after every step."""
    outputs: list[TokenOutput] = []
    while (t := engine.next_event_time()) is not None:
        outputs += engine.step(t)
        if check is not None:
            check(engine)
    return outputs


def replay(events: list, into: Counter[int]) -> None:
    """Apply KV events as a multiset (vLLM announces duplicate blocks separately)."""
    for ev in events:
        if isinstance(ev, BlockStored):
            into.update(ev.block_hashes)
        elif isinstance(ev, BlockRemoved):
            into.subtract(ev.block_hashes)
        else:
            into.clear()
    for h in [h for h, n in into.items() if n <= 0]:
        del into[h]


# ---- prefix caching ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_len", "block_size", "expected_hit"),
    [(500, 128, 384), (512, 128, 384), (100, 16, 96), (16, 16, 0), (130, 16, 128)],
)
def test_repeated_prompt_hits_whole_blocks_but_recomputes_the_last(
    prompt_len: int, block_size: int, expected_hit: int
) -> None:
    p = profile(block_size=block_size, num_gpu_blocks=4096 // block_size + 1, max_model_len=1024)
    e = Engine(p)
    prompt = list(range(1, prompt_len + 1))
    first, second = req("a", prompt), req("b", prompt)
    e.add_request(first, 0.0)
    run(e)
    e.add_request(second, 1.0)
    outs = run(e)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == expected_hit
    assert {o.num_cached_tokens for o in outs} == {expected_hit}
    assert e.prefix_cache_queries == 2 * prompt_len
    assert e.prefix_cache_hits == expected_hit


def test_prompts_sharing_a_prefix_hit_its_full_blocks() -> None:
    e = Engine(profile(block_size=16, num_gpu_blocks=257))
    prefix = list(range(1000, 1300))  # 18 full blocks of 16, then 12 tokens
    e.add_request(req("a", [*prefix, 1, 2, 3]), 0.0)
    b = req("b", [*prefix, 7, 8, 9, 10, 11])
    e.add_request(b, 0.0)  # joins the next step; a's blocks were cached when a was scheduled
    run(e)
    assert b.num_cached_tokens == 18 * 16
    assert e.counters.prefix_cache_hits == 18 * 16


def test_kv_events_follow_vllm_for_a_500_token_prompt() -> None:
    p = profile(block_size=128, num_gpu_blocks=33, max_model_len=1024, max_num_batched_tokens=2048)
    e = Engine(p)
    e.add_request(req("a", list(range(500)), max_tokens=20), 0.0)
    run(e)
    stored = [ev for ev in e.drain_kv_events() if isinstance(ev, BlockStored)]
    # Prompt: three full blocks, no parent. Block four fills with the 12th generated token.
    assert [len(ev.block_hashes) for ev in stored] == [3, 1]
    assert stored[0].parent_block_hash is None
    assert stored[0].token_ids == list(range(384))
    assert stored[1].parent_block_hash == stored[0].block_hashes[-1]
    assert stored[1].token_ids[:116] == list(range(384, 500))
    assert len(stored[1].token_ids) == 128
    assert e.cached_block_hashes() == {*stored[0].block_hashes, *stored[1].block_hashes}


def test_a_recomputed_full_block_is_announced_again_like_vllm() -> None:
    p = profile(block_size=128, num_gpu_blocks=33, max_model_len=1024, max_num_batched_tokens=2048)
    e = Engine(p)
    prompt = list(range(512))
    e.add_request(req("a", prompt, max_tokens=1), 0.0)
    run(e)
    (first,) = e.drain_kv_events()
    e.add_request(req("b", prompt, max_tokens=1), 1.0)
    run(e)
    # 384 tokens hit; the fourth block is recomputed into a new block with the same hash.
    (again,) = e.drain_kv_events()
    assert isinstance(again, BlockStored)
    assert again.block_hashes == first.block_hashes[3:]
    assert again.parent_block_hash == first.block_hashes[2]
    assert e.cached_block_hashes() == set(first.block_hashes)


def test_kv_events_replay_to_the_cached_hashes_under_pressure() -> None:
    rng = random.Random(11)
    e = Engine(profile(num_gpu_blocks=41, max_model_len=120, max_num_batched_tokens=48), seed=2)
    seen: Counter[int] = Counter()
    ever_stored: set[int] = set()
    kinds: Counter[str] = Counter()
    prefixes = [[rng.randrange(100) for _ in range(24)] for _ in range(3)]

    def check(engine: Engine) -> None:
        events = engine.drain_kv_events()
        for ev in events:
            kinds[type(ev).__name__] += 1
            if isinstance(ev, BlockStored):
                assert len(ev.token_ids) == ev.block_size * len(ev.block_hashes)
                assert ev.parent_block_hash is None or ev.parent_block_hash in ever_stored
                ever_stored.update(ev.block_hashes)
        replay(events, seen)
        assert set(seen) == engine.cached_block_hashes()

    now = 0.0
    live: list[str] = []
    for i in range(120):
        now += rng.expovariate(40)
        while (t := e.next_event_time()) is not None and t <= now:
            e.step(t)
            check(e)
        if live and rng.random() < 0.1:
            e.abort(live.pop(rng.randrange(len(live))), now)
            check(e)
        prompt = rng.choice(prefixes) + [rng.randrange(100) for _ in range(rng.randrange(1, 40))]
        e.add_request(req(f"r{i}", prompt, max_tokens=rng.randrange(1, 30)), now)
        live.append(f"r{i}")
        check(e)
    run(e, check)
    assert kinds["BlockStored"] > 50 and kinds["BlockRemoved"] > 20
    assert e.num_preemptions > 0 and e.prefix_cache_hits > 0


def test_reset_prefix_cache_only_when_idle() -> None:
    e = Engine(profile())
    prompt = list(range(40))
    e.add_request(req("a", prompt), 0.0)
    assert not e.reset_prefix_cache()
    run(e)
    assert e.cached_block_hashes()
    e.drain_kv_events()
    assert e.reset_prefix_cache()
    assert e.drain_kv_events() == [AllBlocksCleared()]
    assert e.cached_block_hashes() == set()
    again = req("b", prompt)
    e.add_request(again, 1.0)
    run(e)
    assert again.num_cached_tokens == 0


# ---- scheduling -------------------------------------------------------------------------------


def test_first_token_after_the_step_that_completes_a_chunked_prefill() -> None:
    rec = Recording(profile(max_num_batched_tokens=64))
    e = Engine(rec)  # type: ignore[arg-type]
    r = req("a", list(range(200)), max_tokens=3)
    e.add_request(r, 1.0)
    outs = run(e)
    # 200 prompt tokens in chunks of the 64-token budget, then one decode per token.
    assert [s[0] for s in rec.steps] == [64, 64, 64, 8, 0, 0]
    assert [s[1] for s in rec.steps] == [0, 0, 0, 0, 1, 1]
    assert r.first_token_time == pytest.approx(1.0 + 4 * STEP)
    assert [o.time for o in outs] == pytest.approx([1.0 + k * STEP for k in (4, 5, 6)])
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].finish_reason == "length" and r.finish_reason == "length"
    assert r.finish_time == pytest.approx(1.06)
    assert [t for o in outs for t in o.new_token_ids] == r.output_token_ids
    assert len(r.output_token_ids) == 3


def test_token_budget_and_max_num_seqs_hold_every_step() -> None:
    rec = Recording(profile(max_num_batched_tokens=32, max_num_seqs=4))
    e = Engine(rec)  # type: ignore[arg-type]
    rng = random.Random(5)
    reqs = [
        req(f"r{i}", [rng.randrange(500) for _ in range(rng.randrange(5, 100))], 6)
        for i in range(30)
    ]
    for r in reqs:
        e.add_request(r, 0.0)
    running_seen: list[int] = []
    run(e, lambda eng: running_seen.append(eng.num_running))
    tokens = [prefill + decode for prefill, decode, _, _ in rec.steps]
    batches = [batch for *_, batch in rec.steps]
    assert max(tokens) == 32 and max(batches) == 4  # both limits are reached ...
    assert max(running_seen) == 4  # ... and never exceeded
    assert all(r.finish_reason == "length" and len(r.output_token_ids) == 6 for r in reqs)


def test_a_request_that_cannot_get_blocks_waits_and_blocks_those_behind_it() -> None:
    # 8 usable blocks of 4 tokens.
    e = Engine(profile(num_gpu_blocks=9, max_model_len=32))
    big = req("big", list(range(28)), max_tokens=3)  # 7 blocks, an 8th for decoding
    e.add_request(big, 0.0)
    e.step(STEP)
    e.add_request(mid := req("mid", list(range(100, 108))), STEP)  # needs 2 blocks, 1 is free
    e.add_request(tiny := req("tiny", [1]), STEP)  # would fit, but FCFS keeps it behind
    e.step(2 * STEP)
    assert e.waiting_request_ids() == ["mid", "tiny"]
    run(e)
    assert e.num_preemptions == 0
    assert mid.first_token_time > big.finish_time
    assert tiny.first_token_time > big.finish_time


def test_preemption_takes_the_newest_request_and_requeues_it_first() -> None:
    # 8 usable blocks of 4 tokens; three 6-token prompts growing to 18 tokens cannot all fit.
    e = Engine(profile(num_gpu_blocks=9, max_model_len=32, max_num_seqs=3), seed=3)
    reqs = [req(f"r{i}", [10 * i + t for t in range(6)], max_tokens=12) for i in range(4)]
    for r in reqs:
        e.add_request(r, 0.0)
    while e.num_preemptions == 0:
        now = e.next_event_time()
        assert now is not None
        e.step(now)
    victim = reqs[2]
    # r3 was waiting for a seat; the victim goes in front of it, and nobody is admitted
    # in the step that preempted.
    assert e.running_request_ids() == ["r0", "r1"]
    assert e.waiting_request_ids() == ["r2", "r3"]
    assert victim.num_preemptions == 1
    generated_before = list(victim.output_token_ids)
    assert generated_before  # it had produced tokens, which are kept for recompute
    run(e)
    for r in reqs:
        assert r.finish_reason == "length"
        assert len(r.output_token_ids) == r.max_tokens
    assert victim.output_token_ids[: len(generated_before)] == generated_before
    assert e.num_preemptions >= 1
    # Preempted requests do not count again as prefix-cache queries (as in vLLM).
    assert e.prefix_cache_queries == sum(len(r.prompt_token_ids) for r in reqs)
    assert e.generation_tokens == sum(r.max_tokens for r in reqs)


def test_throughput_grows_with_batch_size_and_saturates() -> None:
    p = load_profile("vendor-b")

    def tokens_per_second(batch: int) -> float:
        e = Engine(p)
        for i in range(batch):
            e.add_request(req(f"r{i}", list(range(i * 2000, i * 2000 + 1024)), 128), 0.0)
        end = 0.0
        while (t := e.next_event_time()) is not None:
            e.step(t)
            end = t
        return e.generation_tokens / end

    tput = {b: tokens_per_second(b) for b in (1, 4, 16, 64, 256)}
    assert list(tput.values()) == sorted(tput.values())
    assert tput[4] / tput[1] > 3  # nearly linear while weight reads dominate
    assert tput[256] / tput[64] < 1.35  # flat once KV reads dominate


def test_output_is_capped_by_max_model_len() -> None:
    e = Engine(profile(max_model_len=64))
    r = req("a", list(range(60)), max_tokens=100)
    e.add_request(r, 0.0)
    outs = run(e)
    assert len(r.output_token_ids) == 4 and r.finish_reason == "length"
    assert outs[-1].finished


# ---- requests, time and aborts ----------------------------------------------------------------


def test_abort_frees_blocks_at_once_and_keeps_full_ones_cached() -> None:
    e = Engine(profile())
    r = req("a", list(range(41)), max_tokens=50)
    e.add_request(r, 0.0)
    e.step(3 * STEP)
    assert e.kv_cache_usage > 0
    stored = set(e.cached_block_hashes())
    e.abort("a", 3.5 * STEP)
    assert r.finish_reason == "abort" and r.finish_time == 3.5 * STEP
    assert e.kv_cache_usage == 0.0 and e.num_running == 0
    assert e.cached_block_hashes() == stored  # free-but-cached, reusable
    assert run(e) == []  # the step in flight yields nothing for it
    assert e.next_event_time() is None
    e.abort("a", 1.0)  # finished: no-op
    e.abort("nobody", 1.0)
    assert r.finish_reason == "abort"


def test_abort_of_a_waiting_request_and_of_a_finished_one() -> None:
    e = Engine(profile(max_num_seqs=1))
    first, second = req("a", [1, 2, 3], max_tokens=2), req("b", [4, 5, 6])
    e.add_request(first, 0.0)
    e.add_request(second, 0.0)
    assert e.num_waiting == 1
    e.abort("b", 0.0)
    assert e.num_waiting == 0 and second.finish_reason == "abort"
    outs = run(e)
    assert {o.request_id for o in outs} == {"a"}
    e.abort("a", 1.0)
    assert first.finish_reason == "length"


def test_time_comes_only_from_now() -> None:
    e = Engine(profile())
    assert e.next_event_time() is None
    e.add_request(req("a", [1, 2, 3], max_tokens=2), 2.0)
    assert e.next_event_time() == pytest.approx(2.0 + STEP)
    assert e.step(2.005) == []
    # A request arriving mid-step joins the next step, not the one in flight.
    e.add_request(b := req("b", [4, 5, 6], max_tokens=1), 2.005)
    outs = e.step(2.0 + STEP)
    assert [(o.request_id, o.time) for o in outs] == [("a", pytest.approx(2.01))]
    run(e)
    assert b.first_token_time == pytest.approx(2.02)
    assert e.next_event_time() is None


def test_an_earlier_now_does_not_move_time_back() -> None:
    e = Engine(profile())
    assert e.step(5.0) == []
    e.add_request(r := req("a", [1, 2], max_tokens=1), 4.0)
    run(e)
    assert r.first_token_time == pytest.approx(5.0 + STEP)


def test_steps_completed_while_adding_are_returned_by_the_next_step() -> None:
    e = Engine(profile())
    e.add_request(req("a", [1, 2, 3], max_tokens=3), 0.0)
    e.add_request(b := req("b", [4, 5], max_tokens=1), 0.5)  # the caller did not step before
    assert e.next_event_time() == pytest.approx(0.01)  # outputs are due: step now
    outs = e.step(0.5)
    assert [(o.request_id, o.time) for o in outs] == [
        ("a", pytest.approx(t)) for t in (0.01, 0.02, 0.03)
    ]
    run(e)
    assert b.first_token_time == pytest.approx(0.51)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (EngineRequest("x", [], 4), "empty prompt"),
        (EngineRequest("x", list(range(512)), 4), "max_model_len"),
        (EngineRequest("x", [1], 0), "max_tokens"),
        (EngineRequest("dup", [1], 4), "already"),
    ],
)
def test_invalid_requests_are_rejected(bad: EngineRequest, match: str) -> None:
    e = Engine(profile())
    e.add_request(req("dup", [1, 2]), 0.0)
    with pytest.raises(ValueError, match=match):
        e.add_request(bad, 0.0)


def test_generation_is_deterministic_by_seed() -> None:
    def trace(seed: int) -> list[tuple[str, list[int], float]]:
        e = Engine(profile(), seed=seed, vocab_size=50)
        for i in range(5):
            e.add_request(req(f"r{i}", list(range(i, i + 30)), max_tokens=8), i * 0.003)
        return [(o.request_id, o.new_token_ids, o.time) for o in run(e)]

    a = trace(5)
    assert a == trace(5)
    assert a != trace(6)
    assert all(0 <= t < 50 for _, toks, _ in a for t in toks)


def test_counters_and_live_stats() -> None:
    e = Engine(profile(max_num_seqs=2))
    reqs = [req(f"r{i}", list(range(10 * i, 10 * i + 9)), max_tokens=3) for i in range(3)]
    for r in reqs:
        e.add_request(r, 0.0)
    assert (e.num_running, e.num_waiting) == (1, 2)  # the first step started with r0 alone
    e.step(STEP)
    assert (e.num_running, e.num_waiting) == (2, 1)
    assert 0 < e.kv_cache_usage < 1
    run(e)
    c = e.counters
    assert c.prompt_tokens == 27 and c.generation_tokens == 9
    assert c.prefix_cache_queries == 27 and c.num_preemptions == 0
    assert (e.num_running, e.num_waiting, e.kv_cache_usage) == (0, 0, 0.0)


def test_request_cpu_is_added_to_the_next_step() -> None:
    """A server whose API process shares the engine's processor (a CPU build): every
    request received costs processor time, which the next step started pays."""
    e = Engine(profile(request_cpu_s=0.002, request_cpu_per_prompt_token_s=0.001))
    e.add_request(a := req("a", [1, 2, 3], max_tokens=2), 0.0)  # idle: this step pays 0.005
    assert e.next_event_time() == pytest.approx(0.005 + STEP)
    e.add_request(b := req("b", [4, 5], max_tokens=1), 0.001)  # mid-step: the next pays 0.004
    run(e)
    assert a.first_token_time == pytest.approx(0.015)
    assert a.finish_time == b.first_token_time == pytest.approx(0.015 + STEP + 0.004)
    e.add_request(c := req("c", [6, 7], max_tokens=2), 1.0)
    run(e)  # nothing left over: only c's own cost
    assert c.first_token_time == pytest.approx(1.0 + 0.004 + STEP)
    assert c.finish_time == pytest.approx(1.0 + 0.004 + 2 * STEP)


def test_request_latency_delays_entry_into_the_waiting_queue() -> None:
    e = Engine(profile(request_latency_s=0.003))
    e.add_request(a := req("a", [1, 2, 3], max_tokens=2), 1.0)
    assert e.num_waiting == 0 and e.next_event_time() == pytest.approx(1.003)
    assert e.step(1.003) == []  # it reaches the queue and starts a step
    assert e.num_running == 1 and e.next_event_time() == pytest.approx(1.013)
    e.add_request(b := req("b", [4, 5], max_tokens=1), 1.005)  # ready at 1.008, mid-step
    e.add_request(c := req("c", [6, 7], max_tokens=1), 1.011)  # ready at 1.014: too late
    e.abort("c", 1.012)  # aborted on its way: never scheduled
    run(e)
    assert a.first_token_time == pytest.approx(1.013)
    assert b.first_token_time == pytest.approx(1.023)  # joined the second step
    assert c.first_token_time is None and c.finish_reason == "abort"
    assert e.next_event_time() is None and e.num_waiting == 0


def test_shared_kv_blocks_cost_the_shared_factor() -> None:
    """The step's distinct context (blocks in use) costs the full per-token rate, context
    read again for other requests the shared factor times it."""
    p = profile(kv_bytes_per_token=1.0e-6, shared_kv_read_factor=0.25)  # 1 us a token
    assert p.step_time(0, 1, 100, 1) == pytest.approx(STEP + 100e-6)
    assert p.step_time(0, 2, 100, 2, unique_context_tokens=60) == pytest.approx(
        STEP + 60e-6 + 0.25 * 40e-6
    )
    seen: list[tuple[int, int | None]] = []

    class Rec(Recording):
        def step_time(self, prefill: int, decode: int, ctx: int, batch: int, **kw: int) -> float:
            seen.append((ctx, kw.get("unique_context_tokens")))
            return self._inner.step_time(prefill, decode, ctx, batch, **kw)

    e = Engine(Rec(p))  # type: ignore[arg-type]
    prefix = list(range(1, 41))  # 10 blocks of 4
    e.add_request(req("a", [*prefix, 100], max_tokens=3), 0.0)
    run(e)
    seen.clear()
    e.add_request(req("b", [*prefix, 101], max_tokens=2), 1.0)
    e.add_request(c := req("c", [*prefix, 102], max_tokens=2), 1.0)
    run(e)
    # b's prefill runs alone (c arrived during it); then b's decode and c's prefill both
    # read the 10 cached blocks, and each holds one block of its own: 12 blocks in use.
    assert seen == [(41, 41), (83, 48), (42, 42)]
    second = STEP + 48e-6 + 0.25 * 35e-6
    assert c.first_token_time == pytest.approx(1.0 + STEP + 41e-6 + second)
    # vendor profiles keep every token at the full rate (and get no distinct context)
    assert load_profile("vendor-a").shared_kv_read_factor == 1.0


def test_request_lag_steps_scale_with_the_step_in_flight() -> None:
    """A busy server hands a new request to its scheduler `request_lag_steps` steps later;
    an idle one at once."""
    e = Engine(profile(request_lag_steps=2.5))
    e.add_request(a := req("a", [1, 2, 3], max_tokens=8), 0.0)  # idle: no lag
    assert a.first_token_time is None and e.next_event_time() == pytest.approx(STEP)
    e.add_request(b := req("b", [4, 5, 6], max_tokens=1), 0.004)  # ready at 0.029
    run(e)
    assert a.first_token_time == pytest.approx(STEP)
    assert b.first_token_time == pytest.approx(0.04)  # admitted at 0.03, first token 0.04
