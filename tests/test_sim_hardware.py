"""Hardware profiles and the step-time model (lbproxy.sim.hardware)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from lbproxy.sim.hardware import HardwareProfile, available_profiles, load_profile

VALID = """\
name: test-card
block_size: 16
num_gpu_blocks: 3000
max_num_seqs: 256
max_num_batched_tokens: 2048
max_model_len: 32768
fixed_overhead_s: 0.00115
per_request_overhead_s: 4.4e-6
weight_bytes: 16.0e9
num_params: 8.0e9
mem_bandwidth_bytes_per_s: 2.0e12
weight_read_efficiency: 0.73
kv_bytes_per_token: 131072
kv_read_efficiency: 0.51
peak_flops: 300.0e12
prefill_mfu: 0.4
attn_flops_per_token_pair: 524288
"""


def decode_tok_s(p: HardwareProfile, batch: int, context: int = 2048) -> float:
    return batch / p.step_time(0, batch, batch * (context + 1), batch)


def itl_ms(p: HardwareProfile) -> float:
    return p.step_time(0, 1, 2049, 1) * 1e3


@pytest.mark.parametrize(
    ("name", "block_size", "max_num_seqs", "max_num_batched_tokens", "kv_tokens"),
    [
        ("vendor-a", 16, 256, 2048, 160_000),
        ("vendor-b", 16, 1024, 8192, 420_000),
        ("vendor-c", 128, 256, 2048, 540_000),
    ],
)
def test_shipped_profiles_load(
    name: str, block_size: int, max_num_seqs: int, max_num_batched_tokens: int, kv_tokens: int
) -> None:
    p = load_profile(name)
    assert p.name == name
    assert (p.block_size, p.max_num_seqs, p.max_num_batched_tokens) == (
        block_size,
        max_num_seqs,
        max_num_batched_tokens,
    )
    assert p.num_gpu_blocks == kv_tokens // block_size
    assert p.max_model_len == 32768
    assert name in available_profiles()


# The derived rows of shared/reference/hardware-figures.md the profiles are calibrated to:
# prefill tok/s, ITL at batch 1 with 2K context (ms), out tok/s at batch 64 and 256 (2K context).
@pytest.mark.parametrize(
    ("name", "prefill", "itl", "tput64", "tput256"),
    [
        ("vendor-a", 7.2e3, 26.5, 1.0e3, 1.4e3),  # L40S
        ("vendor-b", 27.7e3, 7.9, 3.5e3, 5.2e3),  # H100 SXM
        ("vendor-c", 14.8e3, 9.5, 2.7e3, 3.9e3),  # Gaudi 2
    ],
)
def test_profiles_reproduce_the_reference_figures(
    name: str, prefill: float, itl: float, tput64: float, tput256: float
) -> None:
    p = load_profile(name)
    # Prefill rate from the marginal cost of 1,000 more prompt tokens in one step.
    rate = 1000 / (p.step_time(2000, 0, 2000, 1) - p.step_time(1000, 0, 1000, 1))
    assert rate == pytest.approx(prefill, rel=0.03)
    assert itl_ms(p) == pytest.approx(itl, rel=0.04)
    assert decode_tok_s(p, 64) == pytest.approx(tput64, rel=0.05)
    assert decode_tok_s(p, 256) == pytest.approx(tput256, rel=0.05)


def test_vendor_a_is_about_a_third_of_vendor_b() -> None:
    a, b, c = (load_profile(n) for n in ("vendor-a", "vendor-b", "vendor-c"))
    assert 0.2 < decode_tok_s(a, 256) / decode_tok_s(b, 256) < 0.45
    assert 0.2 < a.kv_capacity_tokens / b.kv_capacity_tokens < 0.45
    # vendor-c sits in between in speed.
    assert decode_tok_s(a, 256) < decode_tok_s(c, 256) < decode_tok_s(b, 256)
    assert itl_ms(b) < itl_ms(c) < itl_ms(a)


def test_step_time_grows_with_every_input_and_throughput_saturates() -> None:
    p = load_profile("vendor-b")
    base = p.step_time(100, 4, 5000, 5)
    assert p.step_time(200, 4, 5000, 5) > base
    assert p.step_time(100, 4, 6000, 5) > base
    assert p.step_time(100, 4, 5000, 6) > base
    assert p.step_time(100, 4, 5000, 5, prefill_attn_pairs=10**6) > base
    assert p.step_time(0, 0, 0, 0) == 0.0
    tputs = [decode_tok_s(p, b) for b in (1, 4, 16, 64, 256, 1024)]
    assert tputs == sorted(tputs)
    gains = [b / a for a, b in itertools.pairwise(tputs)]
    assert gains == sorted(gains, reverse=True)  # diminishing returns
    assert gains[-1] < 1.2


def test_load_by_path(tmp_path: Path) -> None:
    f = tmp_path / "card.yaml"
    f.write_text(VALID.replace("name: test-card\n", ""))
    p = load_profile(str(f))
    assert p.name == "card"  # defaults to the file name
    assert p.mem_bandwidth_bytes_per_s == 2.0e12


@pytest.mark.parametrize(
    ("mutate", "key", "what"),
    [
        (lambda t: t.replace("block_size: 16", "block_size: sixteen"), "block_size", "number"),
        (lambda t: t.replace("block_size: 16", "block_size: 16.5"), "block_size", "integer"),
        (lambda t: t.replace("max_num_seqs: 256", "max_num_seqs: 0"), "max_num_seqs", "> 0"),
        (lambda t: t.replace("prefill_mfu: 0.4", "prefill_mfu: 1.5"), "prefill_mfu", "(0, 1]"),
        (lambda t: t.replace("weight_bytes: 16.0e9", "weight_bytes: -1.0"), "weight_bytes", ">= 0"),
        (lambda t: t.replace("peak_flops: 300.0e12\n", ""), "peak_flops", "missing"),
        (lambda t: t + "turbo: true\n", "turbo", "unknown key"),
        (
            lambda t: t.replace("num_gpu_blocks: 3000", "num_gpu_blocks: 100"),
            "num_gpu_blocks",
            "max_model_len",
        ),
        (lambda t: t.replace("max_num_seqs: 256", "max_num_seqs: true"), "max_num_seqs", "integer"),
    ],
)
def test_invalid_profile_names_file_and_key(tmp_path: Path, mutate, key: str, what: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(mutate(VALID))
    with pytest.raises(ValueError) as info:
        load_profile(str(f))
    msg = str(info.value)
    assert str(f) in msg and key in msg and what in msg


@pytest.mark.parametrize(
    ("text", "what"),
    [("block_size: [16\n", "invalid YAML"), ("- 1\n- 2\n", "mapping")],
)
def test_unparsable_profile_names_file(tmp_path: Path, text: str, what: str) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=what) as info:
        load_profile(str(f))
    assert str(f) in str(info.value)


def test_unknown_profile_name_lists_shipped_ones() -> None:
    with pytest.raises(ValueError, match=r"vendor-z\.yaml.*vendor-a, vendor-b, vendor-c"):
        load_profile("vendor-z")


def test_request_cpu_is_optional(tmp_path: Path) -> None:
    f = tmp_path / "cpu.yaml"
    f.write_text(VALID + "request_cpu_s: 2.0e-3\nrequest_cpu_per_prompt_token_s: 3e-6\n")
    p = load_profile(str(f))
    assert p.request_cpu(1000) == pytest.approx(0.005)
    assert load_profile("vendor-b").request_cpu(1000) == 0.0  # GPU: API process elsewhere
    f.write_text(VALID + "request_cpu_s: -1\n")
    with pytest.raises(ValueError, match=r"request_cpu_s.*>= 0"):
        load_profile(str(f))
