#!/usr/bin/env bash
# Benchmark (not a test): the proxy's direct path in the same run as the floor any aiohttp proxy
# pays here (../shared/perfkit: a bare aiohttp forwarder, nginx, the upstream called directly).
#
# Each target runs in its own process pinned to CPU 1; wrk and perfkit's fast fake V3 upstream
# share CPU 0. Loads: 64 KB and 4 MB V2 upscale bodies with real PNG images, and V2 polls, at fixed
# concurrency, then at c=1 for the latency the hop adds. The report ends with `proxy / bare`.
#
#   tests/bench/run.sh                      # about 3 minutes
#   TARGETS="direct bare nginx proxy" RUN=r2 tests/bench/run.sh
#   DURATION=4 C1_DURATION=3 tests/bench/run.sh   # quicker, noisier
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
KIT=${KIT:-$ROOT/../shared/perfkit}
[[ -x $KIT/run.sh ]] || { echo "perfkit not found at $KIT (set KIT)" >&2; exit 1; }
command -v wrk >/dev/null && command -v nginx >/dev/null || {
  apt-get update -qq && apt-get install -y -qq wrk nginx >/dev/null; }
[[ -x $ROOT/.venv/bin/upscale-v2-proxy ]] || make -C "$ROOT" install

export PY=$ROOT/.venv/bin/python   # has Pillow: the bodies carry real PNGs the proxy can probe
export RUN=${RUN:-$(date +%Y%m%d-%H%M%S)}
export OUT=${OUT:-$ROOT/tests/bench/results/$RUN.jsonl}
export TARGETS=${TARGETS:-"direct bare proxy"} COSTS=${COSTS:-0}
export PROXY_PORT=18093 PROXY_POST_PATH=/v2/upscale PROXY_GET_PATH='/v2/progress?task_id=abc'
export AUTHORIZATION="Bearer bench-key"
# every poll a real upstream call: the floor is measured against forwarding, not against a cache
export UPSCALE_PROXY_POLL_CACHE_MAX_ENTRIES=0
export UPSCALE_PROXY_DATA_DIR=${UPSCALE_PROXY_DATA_DIR:-$(mktemp -d /tmp/upscale-bench-data.XXXXXX)}
# the proxy as deployed: JSON log line per request (to a file), uvloop when installed
export PROXY_CMD="$ROOT/.venv/bin/upscale-v2-proxy serve --port $PROXY_PORT --upstream \$UPSTREAM_URL --log-format json"
exec "$KIT/run.sh"
