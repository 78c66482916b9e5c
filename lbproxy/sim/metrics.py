"""The simulator's `/metrics`: vLLM's Prometheus families, rendered from its own counters."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client.utils import floatToGoString

from lbproxy.histogram import Histogram

if TYPE_CHECKING:
    from lbproxy.sim.engine import Engine
    from lbproxy.sim.hardware import HardwareProfile

__all__ = ["FINISH_REASONS", "METRICS_CONTENT_TYPE", "SimMetrics"]

# vLLM's histogram buckets (vllm/v1/metrics/loggers.py, as in the captured /metrics).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# vLLM's NixlPromMetrics buckets (nixl_connector.py): transfer time, and 2 KiB to 16 GiB.
NIXL_XFER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
NIXL_BYTES_BUCKETS = tuple(float(2 ** (10 + i)) for i in range(1, 25, 2))
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # prometheus_client's


class SimMetrics:
    """The latency histograms (engine seconds) and finished requests by reason; the
    engine's own counters and gauges are read when rendering."""

    def __init__(self) -> None:
        self.created = time.time()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        # P/D: NIXL transfers seen by a consumer (engine seconds), failures, expired holds.
        self.nixl_xfer = Histogram(NIXL_XFER_BUCKETS)
        self.nixl_bytes = Histogram(NIXL_BYTES_BUCKETS)
        self.nixl_failed = 0
        self.nixl_expired = 0

    def render(self, eng: Engine, profile: HardwareProfile, model: str) -> str:
        """vLLM's names, HELP texts, types, labels and buckets (prometheus text 0.0.4)."""
        lab = _labels(engine="0", model_name=model)
        created = self.created
        out: list[str] = []
        gauges = (
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             eng.num_running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             eng.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             eng.kv_cache_usage),
        )  # fmt: skip
        for name, help_, value in gauges:
            _family(out, name, "gauge", help_)
            out.append(f"{name}{lab} {floatToGoString(value)}\n")
        counters = (
            ("vllm:prefix_cache_queries",
             "Prefix cache queries, in terms of number of queried tokens.",
             eng.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             eng.prefix_cache_hits),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
             eng.num_preemptions),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", eng.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.",
             eng.generation_tokens),
        )  # fmt: skip
        for name, help_, value in counters:
            _family(out, f"{name}_total", "counter", help_)
            out.append(f"{name}_total{lab} {floatToGoString(value)}\n")
            _created(out, name, help_, lab, created)
        name, help_ = "vllm:request_success", "Count of successfully processed requests."
        _family(out, f"{name}_total", "counter", help_)
        for reason in FINISH_REASONS:
            rl = _labels(engine="0", finished_reason=reason, model_name=model)
            out.append(f"{name}_total{rl} {floatToGoString(self.success[reason])}\n")
        _family(out, f"{name}_created", "gauge", help_)
        for reason in FINISH_REASONS:
            rl = _labels(engine="0", finished_reason=reason, model_name=model)
            out.append(f"{name}_created{rl} {floatToGoString(created)}\n")
        hists = (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
             self.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
             self.itl),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
             self.e2e),
        )  # fmt: skip
        for name, help_, h in hists:
            _histogram(out, name, help_, h, model, created)
        _family(out, "vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
        out.append(f"vllm:cache_config_info{_cache_config_labels(profile)} 1.0\n")
        return "".join(out)

    def render_kv_transfer(self, eng: Engine, model: str) -> str:
        """The families a vLLM server with a KV connector adds: external prefix-cache hits,
        prompt tokens by source (vllm/v1/metrics/loggers.py) and NIXL's (nixl_connector.py).
        """
        lab = _labels(engine="0", model_name=model)
        created = self.created
        out: list[str] = []
        counters = (
            ("vllm:external_prefix_cache_queries",
             "External prefix cache queries from KV connector cross-instance cache sharing, "
             "in terms of number of queried tokens.", eng.external_prefix_cache_queries),
            ("vllm:external_prefix_cache_hits",
             "External prefix cache hits from KV connector cross-instance cache sharing, "
             "in terms of number of cached tokens.", eng.external_prefix_cache_hits),
            ("vllm:nixl_num_failed_transfers", "Number of failed NIXL KV Cache transfers.",
             self.nixl_failed),
            ("vllm:nixl_num_kv_expired_reqs", "Number of requests that had their KV expire.",
             self.nixl_expired),
        )  # fmt: skip
        for name, help_, value in counters:
            _family(out, f"{name}_total", "counter", help_)
            out.append(f"{name}_total{lab} {floatToGoString(value)}\n")
            _created(out, name, help_, lab, created)
        cached, external = eng.prompt_tokens_cached, eng.prompt_tokens_external
        by_source = (eng.prompt_tokens - cached - external, cached, external)
        name, help_ = "vllm:prompt_tokens_by_source", "Number of prompt tokens by source."
        _family(out, f"{name}_total", "counter", help_)
        for source, value in zip(PROMPT_SOURCES, by_source, strict=True):
            sl = _labels(engine="0", model_name=model, source=source)
            out.append(f"{name}_total{sl} {floatToGoString(value)}\n")
        _family(out, f"{name}_created", "gauge", help_)
        for source in PROMPT_SOURCES:
            sl = _labels(engine="0", model_name=model, source=source)
            out.append(f"{name}_created{sl} {floatToGoString(created)}\n")
        hists = (
            ("vllm:nixl_xfer_time_seconds",
             "Histogram of transfer duration for NIXL KV Cache transfers.", self.nixl_xfer),
            ("vllm:nixl_bytes_transferred",
             "Histogram of bytes transferred per NIXL KV Cache transfers.", self.nixl_bytes),
        )  # fmt: skip
        for name, help_, h in hists:
            _histogram(out, name, help_, h, model, created)
        return "".join(out)


def _histogram(
    out: list[str], name: str, help_: str, h: Histogram, model: str, created: float
) -> None:
    lab = _labels(engine="0", model_name=model)
    _family(out, name, "histogram", help_)
    cumulative = 0
    les = [*map(floatToGoString, h.bounds), "+Inf"]
    for le, count in zip(les, h.counts, strict=True):
        cumulative += count
        bl = _labels(engine="0", le=le, model_name=model)
        out.append(f"{name}_bucket{bl} {floatToGoString(cumulative)}\n")
    out.append(f"{name}_count{lab} {floatToGoString(cumulative)}\n")
    out.append(f"{name}_sum{lab} {floatToGoString(h.sum)}\n")
    _created(out, name, help_, lab, created)


def _labels(**kv: str) -> str:
    # prometheus_client prints labels in declaration order; vLLM declares them sorted.
    esc = {
        k: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in kv.items()
    }
    return "{" + ",".join(f'{k}="{esc[k]}"' for k in sorted(esc)) + "}"


def _family(out: list[str], name: str, kind: str, help_: str) -> None:
    out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n")


def _created(out: list[str], name: str, help_: str, labels: str, created: float) -> None:
    _family(out, f"{name}_created", "gauge", help_)
    out.append(f"{name}_created{labels} {floatToGoString(created)}\n")


def _cache_config_labels(p: HardwareProfile) -> str:
    kv_tokens = p.num_gpu_blocks * p.block_size
    return _labels(
        _block_size_resolved="True",
        block_size=str(p.block_size),
        cache_dtype="auto",
        effective_attention_block_size=str(p.block_size),
        enable_prefix_caching="True",
        engine="0",
        gpu_memory_utilization="0.92",
        is_attention_free="False",
        kv_cache_max_concurrency=str(kv_tokens / p.max_model_len),
        kv_cache_memory_bytes="None",
        kv_cache_size_tokens=str(kv_tokens),
        num_cpu_blocks="None",
        num_gpu_blocks=str(p.num_gpu_blocks),
        num_gpu_blocks_override="None",
        prefix_caching_hash_algo="xxhash",
        sliding_window="None",
        user_specified_block_size="False",
    )
