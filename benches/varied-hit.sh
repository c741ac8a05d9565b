#!/usr/bin/env bash
# What users see on the hit path: a warm cache of IDS identifiers, batches of 20 and 100 drawn at
# random for every request (no body repeats, so the response memo cannot help), sent by wrk in
# its own process, side by side in one run with a plain hyper server (also its own process, one
# runtime worker per core like the proxy) answering a body of the same size to the same client.
#
#   bash benches/varied-hit.sh                 # IDS=100000 DURATION=15s CONN=32 BATCHES="20 100"
#   MAX_BYTES=110MB bash benches/varied-hit.sh # the proxy's cache.max_bytes (default: its default,
#                                              # 256 MiB, which 100 000 identifiers fill to ~31 %)
#   SAME_BODY=1 bash benches/varied-hit.sh     # one random batch repeated instead: the response memo
#                                              # answers it, so this is the proxy's per-request floor
#   PERF=1 bash benches/varied-hit.sh          # also perf-record the proxy during batch PERF_BATCH (100)
#                                              # (PERF_ARGS="--call-graph dwarf" for Rust call stacks)
#
# Needs: target/release/tpns-cache and target/release/examples/loadgen (built when missing),
# wrk (apt-get install wrk), python3; perf for PERF=1. Prints one row per batch size.
set -euo pipefail
cd "$(dirname "$0")/.."

IDS=${IDS:-100000}
DURATION=${DURATION:-15s}
CONN=${CONN:-32}
BATCHES=${BATCHES:-"20 100"}
BIN=${PROXY_BIN:-target/release/tpns-cache}
LOADGEN=${LOADGEN_BIN:-target/release/examples/loadgen}
OUT=target/varied-hit
mkdir -p "$OUT"

command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)"; exit 1; }
[[ -x $BIN ]] || cargo build --release --bin tpns-cache
[[ -x $LOADGEN ]] || cargo build --release --example loadgen

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

SIM=$(free_port); PROXY=$(free_port); ADMIN=$(free_port)
"$BIN" simulate --listen "127.0.0.1:$SIM" --tokens "$IDS" --accounts $((IDS / 2)) >"$OUT/sim.log" 2>&1 &
PIDS+=($!)
wait_port "$SIM"
# Lifetimes longer than the run, and a quota that lets the warm-up through at once.
env TPNS_CACHE_LISTEN="127.0.0.1:$PROXY" TPNS_CACHE_ADMIN_LISTEN="127.0.0.1:$ADMIN" \
  TPNS_CACHE_UPSTREAM__URL="http://127.0.0.1:$SIM" TPNS_CACHE_CACHE__TTL=1h \
  TPNS_CACHE_SHIELD__CALLS_PER_SECOND=100000 TPNS_CACHE_SHIELD__BURST=100000 \
  TPNS_CACHE_LOG__LEVEL=warn ${MAX_BYTES:+TPNS_CACHE_CACHE__MAX_BYTES=$MAX_BYTES} \
  "$BIN" serve >"$OUT/proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=($PROXY_PID)
wait_port "$PROXY"

AUTH="Basic $(printf '%s' '1500001048:1452fcebae9f3115ba794fb0fff2fd73' | base64)"
export AUTH IDS SAME_BODY
python3 - "$PROXY" "$IDS" "$AUTH" <<'EOF'
import http.client, json, sys
port, ids, auth = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection("127.0.0.1", port)
for start in range(0, ids, 100):
    body = json.dumps({"operator_type": 2, "token_list": [f"tok-{i:08d}" for i in range(start, min(start + 100, ids))]})
    c.request("POST", "/v3/device/account/query", body, {"Content-Type": "application/json", "Authorization": auth})
    r = c.getresponse(); data = r.read()
    assert r.status == 200 and json.loads(data)["retCode"] == 0, data[:200]
print(f"warm: {ids} identifiers cached")
EOF

metric() { curl -s "http://127.0.0.1:$ADMIN/metrics" | awk -v m="$1" 'index($0, m) == 1 { s += $NF } END { printf "%d", s }'; }
# How full the cache's byte budget is: from half of it on, moka is told of 1 hit in 32
# (src/cache/local.rs); below, of none after an entry's first three.
curl -s "http://127.0.0.1:$ADMIN/metrics" >/dev/null
echo "cache: $(metric tpns_cache_weighted_bytes) bytes weighed, max_bytes ${MAX_BYTES:-default}"

# CPU time (user + system) a process has used, in microseconds.
cpu_us() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%d", ($14 + $15) * 1000000 / hz }' "/proc/$1/stat"; }

printf '\n%6s %14s %14s %7s %12s %12s %13s %13s %10s\n' batch "proxy req/s" "plain req/s" ratio "proxy p99" "plain p99" "proxy CPU/req" "plain CPU/req" "ups. ids"
for BATCH in $BATCHES; do
  export BATCH
  # One answer's size, for the plain server.
  SIZE=$(python3 - "$PROXY" "$IDS" "$BATCH" "$AUTH" <<'EOF'
import http.client, json, random, sys
port, ids, batch, auth = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port)
names = [f"tok-{random.randrange(ids):08d}" for _ in range(batch)]
c.request("POST", "/v3/device/account/query", json.dumps({"operator_type": 2, "token_list": names}),
          {"Content-Type": "application/json", "Authorization": auth})
print(len(c.getresponse().read()))
EOF
)
  PLAIN=$(free_port)
  "$LOADGEN" --scenario plain-server --listen "127.0.0.1:$PLAIN" --body-bytes "$SIZE" >"$OUT/plain-$BATCH.log" 2>&1 &
  PLAIN_PID=$!
  PIDS+=($PLAIN_PID)
  wait_port "$PLAIN"
  before=$(metric 'tpns_cache_upstream_identifiers_total')
  if [[ ${PERF:-0} == 1 && $BATCH == "${PERF_BATCH:-100}" ]]; then
    # shellcheck disable=SC2086
    perf record -F 499 ${PERF_ARGS:--g} -p "$PROXY_PID" -o "$OUT/perf-$BATCH.data" -- sleep 10 >/dev/null 2>&1 &
    PERF_PID=$!
  fi
  cpu0=$(cpu_us "$PROXY_PID")
  wrk -t1 -c"$CONN" -d"$DURATION" --latency -s benches/varied-hit.lua "http://127.0.0.1:$PROXY" >"$OUT/wrk-proxy-$BATCH.txt"
  cpu1=$(cpu_us "$PROXY_PID")
  [[ -n ${PERF_PID:-} ]] && { wait "$PERF_PID" || true; unset PERF_PID; }
  after=$(metric 'tpns_cache_upstream_identifiers_total')
  pcpu0=$(cpu_us "$PLAIN_PID")
  wrk -t1 -c"$CONN" -d"$DURATION" --latency -s benches/varied-hit.lua "http://127.0.0.1:$PLAIN" >"$OUT/wrk-plain-$BATCH.txt"
  pcpu1=$(cpu_us "$PLAIN_PID")
  kill "$PLAIN_PID" 2>/dev/null || true
  rps() { awk '/Requests\/sec/ { print $2 }' "$1"; }
  p99() { awk '$1 == "99%" { print $2 }' "$1"; }
  reqs() { awk '/requests in/ { print $1 }' "$1"; }
  P=$(rps "$OUT/wrk-proxy-$BATCH.txt"); B=$(rps "$OUT/wrk-plain-$BATCH.txt")
  PC=$(awk -v c=$((cpu1 - cpu0)) -v n="$(reqs "$OUT/wrk-proxy-$BATCH.txt")" 'BEGIN { printf "%.1fus", c / n }')
  BC=$(awk -v c=$((pcpu1 - pcpu0)) -v n="$(reqs "$OUT/wrk-plain-$BATCH.txt")" 'BEGIN { printf "%.1fus", c / n }')
  printf '%6s %14.0f %14.0f %7.2f %12s %12s %13s %13s %10d\n' "$BATCH" "$P" "$B" "$(awk -v p="$P" -v b="$B" 'BEGIN { print p / b }')" \
    "$(p99 "$OUT/wrk-proxy-$BATCH.txt")" "$(p99 "$OUT/wrk-plain-$BATCH.txt")" "$PC" "$BC" $((after - before))
done
echo
echo "(wrk -t1 -c$CONN -d$DURATION, $IDS identifiers cached, answers of the same size from both; CPU/req: user + system CPU time of the server process per request served; ups. ids: identifiers the proxy sent upstream during its run, 0 when every lookup hit)"
[[ ${PERF:-0} == 1 ]] && echo "profile: perf report -i $OUT/perf-${PERF_BATCH:-100}.data --no-children --percent-limit 1.5"
exit 0
