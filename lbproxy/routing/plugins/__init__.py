"""Built-in routing plugins, one module each. Add a new one to BUILTIN_MODULES (the one
registry line a new plugin needs; see `routing.registry`)."""

from lbproxy.routing.plugins import (
    decode_latency,
    kv_cache_util,
    least_request,
    max_score,
    precise_prefix,
    prefill_load,
    prefix_hash,
    queue_length,
    random_pick,
    round_robin,
    saturation,
    session_affinity,
    weighted_random,
)

BUILTIN_MODULES = [
    round_robin,
    random_pick,
    max_score,
    weighted_random,
    least_request,
    queue_length,
    kv_cache_util,
    saturation,
    session_affinity,
    prefix_hash,
    precise_prefix,
    decode_latency,
    prefill_load,
]
