#!/usr/bin/env bash
# scripts/real_vllm/stop_pd_servers.sh - stop the pair start_pd_servers.sh started (SIGTERM
# to each server's process group, then SIGKILL after 30 s); same environment.
exec bash "$(cd "$(dirname "$0")" && pwd)/start_pd_servers.sh" stop
