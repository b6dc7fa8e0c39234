#!/usr/bin/env bash
# Benchmarks sluice-prober against the test backend on loopback and prints a
# markdown table:
#  1. repeatability: the same endpoint probed $PROBES times, the spread of the
#     capacities reported (goal: all equal);
#  2. load-generator efficiency: requests/s at concurrency 64 on a fast
#     endpoint, the prober's over wrk's on the same target in the same run
#     (goal: >= 0.8), with each client's CPU time per request and whether the
#     prober reported its own CPU as the limit.
#
# Knobs (environment): PROBES=5, K=16 (capacity of the probed route),
# PROBE_LEVELS="--warmup 0.5 --duration 2" (level timing of each probe),
# ROUNDS=3 (alternating wrk/prober runs per backend), SECONDS_PER_RUN=10,
# BACKEND_THREADS="1 2" (backend runtime threads, one efficiency row each).
# Needs: target/release/{sluice-backend,sluice-prober} (make build), wrk.
set -euo pipefail
cd "$(dirname "$0")/.."

PROBES=${PROBES:-5}
K=${K:-16}
PROBE_LEVELS=${PROBE_LEVELS:---warmup 0.5 --duration 2}
ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
BACKEND_THREADS=${BACKEND_THREADS:-1 2}
BIN=${CARGO_TARGET_DIR:-target}/release
for b in sluice-backend sluice-prober; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b: run make build" >&2; exit 1; }
done
command -v wrk >/dev/null || { echo "wrk is missing: scripts/deps.sh bench" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is missing" >&2; exit 1; }

pids=()
TIMES_FILE=$(mktemp)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -f "$TIMES_FILE"
}
trap cleanup EXIT

# Starts the backend with the given arguments; sets PORT.
start_backend() {
  local out
  out=$(mktemp)
  "$BIN/sluice-backend" "$@" >"$out" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    PORT=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$out")
    [ -n "$PORT" ] && { rm -f "$out"; return; }
    sleep 0.05
  done
  echo "sluice-backend did not start: $(cat "$out")" >&2
  exit 1
}

# Sets CPU to the CPU seconds (user + system) used so far by the finished
# children of this shell. `times` must run in this shell, not a subshell.
children_cpu() {
  times >"$TIMES_FILE"
  CPU=$(tail -n 1 "$TIMES_FILE" | python3 -c 'import re, sys
print(sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", sys.stdin.read())))')
}

median() { python3 -c 'import sys, statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

echo "bench-prober: $(nproc) cores, $(uname -r), wrk $(wrk -v 2>&1 | head -n1 | awk '{print $2}')" >&2

# 1. Repeatability (PROBES=0 skips it).
if [ "$PROBES" -gt 0 ]; then
  start_backend --route "/k$K:capacity=$K,service_ms=20"
  caps=()
  secs=()
  for i in $(seq "$PROBES"); do
    # shellcheck disable=SC2086
    json=$("$BIN/sluice-prober" probe --url "http://127.0.0.1:$PORT" --endpoint "/k$K" \
      --latency-threshold-ms 30 $PROBE_LEVELS --json --quiet || true)
    read -r cap sec < <(python3 -c 'import json, sys; e = json.loads(sys.stdin.read())["endpoints"][0]; print(e["capacity"], e["elapsed_s"])' <<<"$json")
    caps+=("$cap")
    secs+=("$sec")
    echo "probe $i: capacity $cap in ${sec}s" >&2
  done
  kill "${pids[-1]}" 2>/dev/null || true
  spread=$(python3 -c 'import sys; v=[int(x) for x in sys.argv[1:]]; print(max(v)-min(v))' "${caps[@]}")

  echo
  echo "### Repeatability: $PROBES probes of a capacity-$K endpoint (20 ms service, p99 <= 30 ms, $PROBE_LEVELS)"
  echo
  echo "| probe | capacity | seconds |"
  echo "|---|---|---|"
  for i in $(seq 0 $((PROBES - 1))); do
    echo "| $((i + 1)) | ${caps[$i]} | ${secs[$i]} |"
  done
  echo "| **spread** | **$spread** (max - min) | median $(median "${secs[@]}") |"
fi

# 2. Load-generator efficiency.
echo
echo "### Load generator at concurrency 64 on a fast endpoint (${SECONDS_PER_RUN}s runs, median of $ROUNDS, alternating)"
echo
echo "| backend threads | wrk -t2 req/s | prober req/s | ratio | wrk CPU us/req | prober CPU us/req | prober busy | prober CPU-bound |"
echo "|---|---|---|---|---|---|---|---|"
for threads in $BACKEND_THREADS; do
  start_backend --threads "$threads" --route /fast
  url="http://127.0.0.1:$PORT/fast"
  wrk -t2 -c64 -d2s "$url" >/dev/null   # warm the backend up
  w_rps=(); p_rps=(); w_cpu=(); p_cpu=(); busy=(); bound=()
  for _ in $(seq "$ROUNDS"); do
    children_cpu; before=$CPU
    out=$(wrk -t2 -c64 -d"${SECONDS_PER_RUN}s" "$url")
    children_cpu; after=$CPU
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    w_rps+=("$rps")
    w_cpu+=("$(python3 -c "print(($after - $before) / $reqs * 1e6)")")

    children_cpu; before=$CPU
    json=$("$BIN/sluice-prober" sweep --url "http://127.0.0.1:$PORT" --endpoint /fast \
      --levels 64 --warmup 0.5 --duration "$SECONDS_PER_RUN" --json --quiet)
    children_cpu; after=$CPU
    read -r rps reqs b cb < <(python3 -c 'import json, sys
l = json.loads(sys.stdin.read())["levels"][0]
print(l["rps"], l["requests"], l["prober_busy"], json.dumps(l["client_bound"]))' <<<"$json")
    p_rps+=("$rps")
    # The sweep's process time includes its warm-up: charge it per request
    # over the warm-up too, by scaling to the measured window.
    p_cpu+=("$(python3 -c "print(($after - $before) / ($reqs * ($SECONDS_PER_RUN + 0.5) / $SECONDS_PER_RUN) * 1e6)")")
    busy+=("$b")
    bound+=("$cb")
  done
  kill "${pids[-1]}" 2>/dev/null || true
  mw=$(median "${w_rps[@]}"); mp=$(median "${p_rps[@]}")
  printf '| %s | %.0f | %.0f | **%.2f** | %.1f | %.1f | %.2f | %s |\n' \
    "$threads" "$mw" "$mp" "$(python3 -c "print($mp / $mw)")" \
    "$(median "${w_cpu[@]}")" "$(median "${p_cpu[@]}")" "$(median "${busy[@]}")" "${bound[*]}"
done
echo
echo "Command: \`bench/prober.sh\` ($(nproc) cores; backend, wrk and prober share them)."
