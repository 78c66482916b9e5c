#!/usr/bin/env bash
# scripts/real_vllm/start_pd_servers.sh - a real prefill/decode pair for
# tests/test_real_vllm_pd.py (`pytest -m real_vllm tests/test_real_vllm_pd.py`):
#
#   scripts/real_vllm/start_pd_servers.sh [start|stop|status]
#
# start_servers.sh with these settings (each overridable from the environment):
#   server 0 on 8121 is the prefill server (vLLM NixlConnector, kv_role kv_producer, NIXL
#       side channel 127.0.0.1:5611), server 1 on 8122 the decode server (kv_consumer, side
#       channel 5612): the decode server pulls the prompt's KV blocks from the prefill
#       server over NIXL/UCX (TCP on loopback, UCX_NET_DEVICES=lo; CPU buffers) instead of
#       computing them;
#   RUN_NAME run-pd (logs, pids and servers.json in $REAL_VLLM_DIR/run-pd), no KV events,
#       the tiny model's defaults otherwise (block size 32, 4 MiB KV cache, prefix caching,
#       --enforce-eager), each server's OMP threads on its own core, `nice -n 5` (a long
#       benchmark may share the machine).
# Needs NIXL in the vLLM venv: scripts/real_vllm/setup.sh installs it. Start-up takes
# about 30-90 s.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
export PORTS="${PORTS:-8121 8122}"
export KV_ROLES="${KV_ROLES:-kv_producer kv_consumer}" NIXL_PORTS="${NIXL_PORTS:-5611 5612}"
export KV_PORTS="${KV_PORTS:-5621 5622}" REPLAY_PORTS="${REPLAY_PORTS:-5623 5624}"
export RUN_NAME="${RUN_NAME:-run-pd}" KV_EVENTS="${KV_EVENTS:-0}" NICE="${NICE:-5}"
export TEST_FILE=tests/test_real_vllm_pd.py URLS_VAR=LBPROXY_REAL_VLLM_PD_URLS
DIR="${REAL_VLLM_DIR:-$HOME/.cache/lbproxy-real-vllm}"
if [ "${1:-start}" = start ] && ! "$DIR/venv/bin/python" -c "import nixl._api" 2> /dev/null; then
  echo "NIXL is not installed in $DIR/venv: run scripts/real_vllm/setup.sh" >&2
  exit 2
fi
exec bash "$HERE/start_servers.sh" "${1:-start}"
