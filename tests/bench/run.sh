#!/usr/bin/env bash
# Benchmark (not a test): the proxy against the bare aiohttp forwarder on uvloop (../shared/perfkit's
# `bare-uvloop`), in ONE run, ending with one table of every figure of issue 11 and its target.
#
#  1. perfkit with TARGETS="bare-uvloop proxy": 64 KB and 4 MB V2 submissions with real PNGs, and
#     V2 polls, at fixed concurrency then at c=1. The poll cache off and every poll a new task id
#     (UNIQUE_IDS=1), so that each poll is a real upstream call for both.
#  2. Extra points by perfkit's measure.py, against the same fake upstream: `proxy-cached` (the poll
#     cache on, its defaults, every poll of one task id: the SDKs' cadence; c=16 and c=1), and
#     `workers1` / `workers2` (`serve --workers N`, NOT pinned: it needs both cores; polls and 64 KB).
#  3. tests/bench/settle.py: RSS idle, right after 8 x 4 MB submissions for 10 s, and $SETTLE s later.
#  4. tests/bench/pillow.py (if present): compose() against Pillow alone, the default PNG level.
#  5. tests/bench/report.py: the table, printed and written to tests/bench/results/$RUN.md.
#
# Placement as perfkit's: the system under test alone on CPU $SUT_CPU (1); wrk (one thread) and the
# fake upstream on CPU $LOAD_CPU (0). Raw lines: tests/bench/results/$RUN.jsonl (git-ignored).
#
#   tests/bench/run.sh                                    # about 5 minutes
#   DURATION=3 C1_DURATION=2 SETTLE=5 tests/bench/run.sh  # under 2 minutes: a check, not figures
#   RUN=r2 tests/bench/run.sh                             # named run; the machine is noisy: run it twice
# Also: WARMUP (2), SETTLE_LOAD (10 s), PILLOW_RUNS (5), PILLOW_KINDS (noise,photo,flat), PILLOW=0 (skip),
# SUT_CPU, LOAD_CPU, KIT (perfkit's folder). DURATION < 8 (a quick run) makes the defaults of
# SETTLE_LOAD 5 s, PILLOW_RUNS 1 and PILLOW_KINDS flat.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
KIT=${KIT:-$ROOT/../shared/perfkit}
[[ -x $KIT/run.sh ]] || { echo "perfkit not found at $KIT (set KIT)" >&2; exit 1; }
command -v wrk >/dev/null && command -v nginx >/dev/null || {
  apt-get update -qq && apt-get install -y -qq wrk nginx >/dev/null; }
[[ -x $ROOT/.venv/bin/upscale-v2-proxy ]] || make -C "$ROOT" install
STARTED=$SECONDS

export PY=$ROOT/.venv/bin/python   # has Pillow: the bodies carry real PNGs the proxy can probe
export RUN=${RUN:-$(date +%Y%m%d-%H%M%S)}
export OUT=${OUT:-$ROOT/tests/bench/results/$RUN.jsonl}
export DURATION=${DURATION:-8} WARMUP=${WARMUP:-2} C1_DURATION=${C1_DURATION:-5}
export SUT_CPU=${SUT_CPU:-1} LOAD_CPU=${LOAD_CPU:-0}
QUICK=$(( DURATION < 8 ))  # shorter points: a check that it all works, so the rest is shortened too
SETTLE=${SETTLE:-60} SETTLE_LOAD=${SETTLE_LOAD:-$(( QUICK ? 5 : 10 ))}
PILLOW=${PILLOW:-1} PILLOW_RUNS=${PILLOW_RUNS:-$(( QUICK ? 1 : 5 ))}
if (( QUICK )); then PILLOW_KINDS=${PILLOW_KINDS:-flat}; else PILLOW_KINDS=${PILLOW_KINDS:-noise,photo,flat}; fi
export TARGETS="bare-uvloop proxy" COSTS=0
export PROXY_PORT=18093 PROXY_POST_PATH=/v2/upscale PROXY_GET_PATH='/v2/progress?task_id=abc'
export AUTHORIZATION="Bearer bench-key"
# every poll a real upstream call: the floor is measured against forwarding, not against a cache
export UPSCALE_PROXY_POLL_CACHE_MAX_ENTRIES=0 UNIQUE_IDS=1
export UPSCALE_PROXY_DRAIN_DELAY=0   # stopping a proxy between points need not wait for a load balancer
if [[ -z ${UPSCALE_PROXY_DATA_DIR:-} ]]; then
  UPSCALE_PROXY_DATA_DIR=$(mktemp -d /tmp/upscale-bench-data.XXXXXX); CLEAN_DATA=$UPSCALE_PROXY_DATA_DIR
fi
export UPSCALE_PROXY_DATA_DIR
# the proxy as deployed: JSON log line per request (to a file), uvloop when installed
export PROXY_CMD="$ROOT/.venv/bin/upscale-v2-proxy serve --port $PROXY_PORT --upstream \$UPSTREAM_URL --log-format json"
UP=http://127.0.0.1:18080
LOGS=$(mktemp -d /tmp/upscale-bench-logs.XXXXXX)

for port in 18080 18090 "$PROXY_PORT"; do  # perfkit would measure whatever else listens there
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use on 127.0.0.1: is another bench running?" >&2; exit 1
  fi
done

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; PIDS=()
  [[ -n ${CLEAN_DATA:-} ]] && rm -rf "$CLEAN_DATA"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM
wait_port() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1 never opened" >&2; exit 1
}
start() {  # start <port> <cpu or ""> <log name> <command...>  -> pid in $LAST
  local port=$1 cpu=$2 log=$3; shift 3
  if [[ -n $cpu ]]; then taskset -c "$cpu" "$@" >"$LOGS/$log.log" 2>&1 &
  else "$@" >"$LOGS/$log.log" 2>&1 &
  fi
  LAST=$!; PIDS+=("$LAST"); wait_port "$port"
}
stop() {  # stop <pid>
  kill "$1" 2>/dev/null; wait "$1" 2>/dev/null || true
  local keep=(); for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done; PIDS=("${keep[@]}")
}
measure() {  # measure <label> <pid> <measure.py args...>   (the proxy's V2 routes)
  local label=$1 pid=$2; shift 2
  POST_PATH=$PROXY_POST_PATH GET_PATH=$PROXY_GET_PATH "$PY" "$KIT/measure.py" --run "$RUN" --label "$label" \
    --url "http://127.0.0.1:$PROXY_PORT" --pid "$pid" --peer-pid "$UPSTREAM_PID" --load-cpu "$LOAD_CPU" --out "$OUT" "$@"
}

mkdir -p "$(dirname "$OUT")"
took() { echo "($(( SECONDS - STARTED )) s so far)"; }

echo "== 1/5 perfkit: bare-uvloop and proxy (poll cache off, unique task ids); its own report: $LOGS/perfkit.txt"
# perfkit prints its measure lines, then its tables: the tables go to the file only
"$KIT/run.sh" 2>&1 | tee "$LOGS/perfkit.txt" | sed -u '/^Fixed concurrency/,$d'

echo "== 2/5 proxy-cached (poll cache on, one task id) and serve --workers 1 / 2 (not pinned) $(took)"
start 18080 "$LOAD_CPU" upstream "$PY" "$KIT/upstream.py" --port 18080; UPSTREAM_PID=$LAST
start "$PROXY_PORT" "$SUT_CPU" proxy-cached env -u UPSCALE_PROXY_POLL_CACHE_MAX_ENTRIES \
  "$ROOT/.venv/bin/upscale-v2-proxy" serve --port "$PROXY_PORT" --upstream $UP --log-format json
UNIQUE_IDS= measure proxy-cached "$LAST" --loads get --duration "$DURATION" --warmup "$WARMUP"
UNIQUE_IDS= measure proxy-cached "$LAST" --loads get --duration "$C1_DURATION" --warmup 1 --conc 1
stop "$LAST"
for n in 1 2; do  # the same load for both: the poll cache off, unique ids, as in 1/5
  start "$PROXY_PORT" "" "workers$n" "$ROOT/.venv/bin/upscale-v2-proxy" serve --workers "$n" --port "$PROXY_PORT" \
    --upstream $UP --log-format json
  sleep 1  # every worker listening, not just the first
  measure "workers$n" "$LAST" --loads get,small --duration "$DURATION" --warmup "$WARMUP"
  stop "$LAST"
done

echo "== 3/5 settle: RSS idle, after 8 x 4 MB submissions for ${SETTLE_LOAD} s, and ${SETTLE} s later $(took)"
"$PY" -m tests.bench.settle --upstream $UP --out "$OUT" --run "$RUN" --settle "$SETTLE" --load "$SETTLE_LOAD" \
  --sut-cpu "$SUT_CPU" --load-cpu "$LOAD_CPU" --kit "$KIT"
stop "$UPSTREAM_PID"

echo "== 4/5 compositions: compose() against Pillow alone (tests/bench/pillow.py: $PILLOW_KINDS, $PILLOW_RUNS runs, on CPU $SUT_CPU) $(took)"
if [[ $PILLOW == 1 ]]; then
  taskset -c "$SUT_CPU" "$PY" - "$OUT" "$RUN" "$PILLOW_RUNS" "$PILLOW_KINDS" <<'EOF'
import importlib.util, inspect, sys
from tests.bench.common import append_jsonl
out, run, runs, kinds = sys.argv[1], sys.argv[2], int(sys.argv[3]), tuple(sys.argv[4].split(","))
record = {"run": run, "target": "compose"}
if importlib.util.find_spec("tests.bench.pillow") is None:
    record["error"] = "tests/bench/pillow.py not found"
else:
    try:
        from tests.bench import pillow
        wanted = {"runs": runs, "levels": (), "kinds": kinds, "memory": False}  # the default level only; no memory children
        accepted = inspect.signature(pillow.measure).parameters
        record["pillow"] = pillow.measure(**{k: v for k, v in wanted.items() if k in accepted})
    except Exception as e:  # another helper's module: the table says "not measured" and why
        record["error"] = f"{type(e).__name__}: {e}"
print(record.get("error") or "done")
append_jsonl(out, record)
EOF
else
  echo "skipped (PILLOW=0)"
fi

echo "== 5/5 report $(took)"
# after perfkit's own report, which reads every line of $OUT as one of its points
"$PY" -c 'import json, sys; from tests.bench.common import machine
print(json.dumps({"run": sys.argv[1], "target": "machine", **machine(), "sut_cpu": sys.argv[2], "load_cpu": sys.argv[3]}))' \
  "$RUN" "$SUT_CPU" "$LOAD_CPU" >>"$OUT"
"$PY" -m tests.bench.report "$OUT" --md "${OUT%.jsonl}.md"
echo
echo "raw: $OUT; table: ${OUT%.jsonl}.md; logs: $LOGS; $(( SECONDS - STARTED )) s in all"
