#!/usr/bin/env bash
# scripts/real_vllm/overload_servers.sh - the two real vLLM servers of the overload check
# (scripts/real_vllm/overload_check.py, tests/test_real_vllm_overload.py):
#
#   scripts/real_vllm/overload_servers.sh [start|stop|status]
#
# start_servers.sh with these settings (each overridable from the environment):
#   ports 8111, 8112 (RUN_NAME run-overload: logs and pids in $REAL_VLLM_DIR/run-overload);
#   a 256 MiB KV cache (KV_CACHE_BYTES): 262,144 tokens = 8,192 blocks of 32 in bf16, far
#       more than 256 requests of ~1,200 tokens need, so an engine admits up to
#       max_num_seqs decodes as large GPUs do, instead of being bounded by KV blocks;
#   --max-num-seqs 256 --max-num-batched-tokens 2048 (chunked prefill), --stream-interval 16
#       (one SSE chunk per 16 tokens, the first at once: little streaming work for lbproxy
#       and the load generator, which share the 2 cores with the servers; at one chunk per
#       4 tokens they took up to 40% of one server's core at 3x overload), prefix caching
#       on, --enforce-eager, max_model_len 2048;
#   no KV events (KV_EVENTS=0), each whole server (API process, engine, worker) pinned to
#       its own core (PIN_TREE=1, cores 0 and 1), VLLM_SERVER_DEV_MODE=1 for
#       POST /reset_prefix_cache (each run starts on cold caches, as the simulator does).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
export PORTS="${PORTS:-8111 8112}"
export KV_PORTS="${KV_PORTS:-5591 5592}" REPLAY_PORTS="${REPLAY_PORTS:-5593 5594}"
export RUN_NAME="${RUN_NAME:-run-overload}"
export KV_EVENTS="${KV_EVENTS:-0}" PIN_TREE="${PIN_TREE:-1}" CPU_BINDS="${CPU_BINDS:-0 1}"
export KV_CACHE_BYTES="${KV_CACHE_BYTES:-268435456}" BLOCK_SIZE="${BLOCK_SIZE:-32}"
export MAX_MODEL_LEN="${MAX_MODEL_LEN:-2048}"
export VLLM_EXTRA_ARGS="${VLLM_EXTRA_ARGS:---enforce-eager --max-num-seqs 256 --max-num-batched-tokens 2048 --stream-interval 16}"
export VLLM_SERVER_DEV_MODE=1
exec bash "$HERE/start_servers.sh" "${1:-start}"
