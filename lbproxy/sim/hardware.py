"""Hardware profiles for the simulated vLLM engine: scheduler limits, KV capacity and step time.

Step time is the roofline-with-efficiencies model of ``shared/reference/hardware-figures.md``::

    t = t0 + c_req * B                              # fixed + per-request overhead
        + W / (eta * BW)                            # read the weights once per step
        + kv_bytes_per_token * ctx / (eta_kv * BW)  # read the KV context of the batch
        + (2 * P * N_prefill + a * pairs) / (MFU * F)  # prefill compute (+ attention)

Decode compute is not a term: in that model it hides under the memory-bound terms.

Optional terms, each defaulting to the model above:

- ``shared_kv_read_factor`` (1): the cost of a context token whose KV block the step
  reads for several requests, beyond the first read, as a fraction of a distinct one's
  (``step_time(..., unique_context_tokens=)``: distinct tokens cost ``kv_bytes_per_token /
  (eta_kv BW)`` each, the rest that times the factor). Below 1 where shared prefix blocks
  stay in a cache between reads (a CPU's L2/L3 here).
- A server whose API process shares the engine's processor (a CPU build, one core per
  server) spends ``request_cpu_s + request_cpu_per_prompt_token_s * prompt_tokens`` of
  that processor on each request it receives (HTTP, parsing the prompt, finishing the
  response), time its engine does not step: ``request_cpu`` gives it and the engine adds it
  to its next step; ``request_latency_s`` is the delay from a request's arrival to its
  entry into the scheduler's waiting queue, beyond that processor time, plus
  ``request_lag_steps`` times the duration of the step in flight when one is (the API
  process and the engine take turns on the core, so a busy server hands a new request to
  its scheduler steps later). 0 for a GPU server (its API process runs on other cores;
  its latency is small against its step times).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from lbproxy.sim.shipped import is_bare_name, shipped_file, shipped_names

__all__ = ["HardwareProfile", "available_profiles", "load_profile"]


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """One simulated vLLM server: scheduler settings, KV cache size and a step-time model."""

    name: str
    num_gpu_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    fixed_overhead_s: float  # t0: per-step scheduling/launch overhead
    per_request_overhead_s: float  # c_req: per scheduled request per step
    weight_bytes: float  # W: bytes of weights read every step
    mem_bandwidth_bytes_per_s: float  # BW: peak memory bandwidth
    weight_read_efficiency: float  # eta: fraction of BW reached reading weights
    kv_bytes_per_token: float  # KV bytes per token of context (all layers, K and V)
    kv_read_efficiency: float  # fraction of BW reached reading the KV context
    num_params: float  # P: parameters (2 * P FLOPs per computed token)
    peak_flops: float  # F: dense peak FLOP/s in the serving dtype
    prefill_mfu: float  # fraction of F reached in prefill
    attn_flops_per_token_pair: float  # attention FLOPs per (query, key) pair: 4 * layers * d
    description: str = ""
    # Optional terms (see the module docstring).
    shared_kv_read_factor: float = 1.0
    request_cpu_s: float = 0.0
    request_cpu_per_prompt_token_s: float = 0.0
    request_latency_s: float = 0.0
    request_lag_steps: float = 0.0
    # Coefficients folded once so that step_time is a handful of multiply-adds.
    _t_base: float = field(init=False, repr=False, compare=False)
    _t_ctx: float = field(init=False, repr=False, compare=False)
    _t_tok: float = field(init=False, repr=False, compare=False)
    _t_pair: float = field(init=False, repr=False, compare=False)
    _t_shared: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            if not f.init or f.name in ("name", "description"):
                continue
            value = getattr(self, f.name)
            want_int = f.type == "int"
            if isinstance(value, bool) or not isinstance(value, int if want_int else (int, float)):
                kind = "an integer" if want_int else "a number"
                raise ValueError(f"{f.name}: must be {kind}, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{f.name}: must be a finite number >= 0, got {value!r}")
        for key in (
            "num_gpu_blocks",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "fixed_overhead_s",
            "mem_bandwidth_bytes_per_s",
            "peak_flops",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)!r}")
        for key in ("weight_read_efficiency", "kv_read_efficiency", "prefill_mfu"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"{key}: must be in (0, 1], got {getattr(self, key)!r}")
        if self.shared_kv_read_factor > 1:
            raise ValueError(
                f"shared_kv_read_factor: must be in [0, 1], got {self.shared_kv_read_factor!r}"
            )
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise ValueError(f"description: must be a string, got {self.description!r}")
        # Like vLLM at start-up: one request of max_model_len tokens must fit in the cache
        # (block 0 is vLLM's reserved null block). This also guarantees the engine never stalls.
        need = -(-self.max_model_len // self.block_size)
        if need > self.num_gpu_blocks - 1:
            raise ValueError(
                f"num_gpu_blocks: {self.num_gpu_blocks} blocks of {self.block_size} tokens "
                f"(one reserved) cannot hold max_model_len {self.max_model_len} "
                f"(needs {need + 1})"
            )
        bw = self.mem_bandwidth_bytes_per_s
        flops = self.prefill_mfu * self.peak_flops
        base = self.fixed_overhead_s + self.weight_bytes / (self.weight_read_efficiency * bw)
        object.__setattr__(self, "_t_base", base)
        object.__setattr__(self, "_t_ctx", self.kv_bytes_per_token / (self.kv_read_efficiency * bw))
        object.__setattr__(self, "_t_tok", 2.0 * self.num_params / flops)
        object.__setattr__(self, "_t_pair", self.attn_flops_per_token_pair / flops)
        object.__setattr__(self, "_t_shared", self._t_ctx * self.shared_kv_read_factor)

    def request_cpu(self, prompt_tokens: int) -> float:
        """Seconds of the engine's processor a received request costs outside the steps."""
        return self.request_cpu_s + self.request_cpu_per_prompt_token_s * prompt_tokens

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache holds (the reserved null block excluded)."""
        return (self.num_gpu_blocks - 1) * self.block_size

    def step_time(
        self,
        num_prefill_tokens: int,
        num_decode_seqs: int,
        context_tokens: int,
        batch_size: int,
        *,
        prefill_attn_pairs: int = 0,
        unique_context_tokens: int | None = None,
    ) -> float:
        """Seconds for one engine step.

        ``context_tokens`` is the KV context attended by the batch (computed + new tokens of
        every scheduled request); ``prefill_attn_pairs`` the (query, key) pairs of the prefill
        chunks, for the quadratic attention term. ``num_decode_seqs`` is part of the contract
        but costs nothing beyond ``batch_size``: decode is memory bound in this model.
        ``unique_context_tokens``: the distinct part of the context (KV blocks read for
        several requests counted once); the rest costs ``shared_kv_read_factor`` as much.
        """
        if batch_size <= 0:
            return 0.0
        if unique_context_tokens is not None and unique_context_tokens < context_tokens:
            ctx = self._t_ctx * unique_context_tokens + self._t_shared * (
                context_tokens - unique_context_tokens
            )
        else:
            ctx = self._t_ctx * context_tokens
        return (
            self._t_base
            + self.per_request_overhead_s * batch_size
            + ctx
            + self._t_tok * num_prefill_tokens
            + self._t_pair * prefill_attn_pairs
        )


_INT_KEYS = {f.name for f in fields(HardwareProfile) if f.init and f.type == "int"}
_KEYS = {f.name for f in fields(HardwareProfile) if f.init}
_TEXT = {"name", "description"}
_OPTIONAL = _TEXT | {
    "shared_kv_read_factor",
    "request_cpu_s",
    "request_cpu_per_prompt_token_s",
    "request_latency_s",
    "request_lag_steps",
}


def available_profiles() -> list[str]:
    """Names of the profiles shipped in the package (``lbproxy/data/hardware``)."""
    return shipped_names("hardware")


def _resolve(name_or_path: str) -> Path | Traversable:
    if is_bare_name(name_or_path):
        return shipped_file("hardware", name_or_path)
    return Path(name_or_path)


def load_profile(name_or_path: str) -> HardwareProfile:
    """Load a shipped profile by name (``vendor-a``) or a YAML file by path.

    Raises ValueError naming the file, the key and what is wrong.
    """
    path = _resolve(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        known = ", ".join(available_profiles()) or "none"
        raise ValueError(
            f"{path}: cannot read hardware profile {name_or_path!r} ({e.strerror}); "
            f"shipped profiles: {known}"
        ) from e
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of profile keys, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise ValueError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
    missing = sorted(_KEYS - _OPTIONAL - data.keys())
    if missing:
        raise ValueError(f"{path}: {missing[0]}: required key is missing")
    kwargs = dict(data)
    kwargs.setdefault("name", path.name.rsplit(".", 1)[0])
    # YAML reads 1e9 as a string and 3.0 as a float: accept numeric strings and integral floats
    # where the field wants them, but report anything else against its key.
    for key, value in kwargs.items():
        if key in _TEXT or isinstance(value, bool):
            continue
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{path}: {key}: must be a number, got {value!r}") from None
        if key in _INT_KEYS and isinstance(value, float) and value.is_integer():
            value = int(value)
        kwargs[key] = value
    try:
        return HardwareProfile(**kwargs)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
