#!/usr/bin/env bash
# What users see on the hit path: a warm cache of IDS identifiers, batches of 20 and 100 drawn at
# random for every request (no body repeats, so the response memo cannot help), sent by wrk in
# its own process, side by side in one run with a plain hyper server (also its own process, one
# runtime worker per core like the proxy) answering a body of the same size to the same client.
#
# This shared VM's speed drifts over minutes, so the servers take turns: ROUNDS rounds of
# DURATION each, every round wrk against the proxy (and the BASE_BIN build, if given), then the
# plain server. A row gives the medians over the rounds, and the ratio's median with its lowest
# and highest round: each round's ratio compares servers measured within seconds of each other.
#
#   bash benches/varied-hit.sh                 # IDS=100000 ROUNDS=3 DURATION=5s CONN=32 BATCHES="20 100"
#   BASE_BIN=/path/to/other/tpns-cache bash benches/varied-hit.sh
#                                              # A/B: another build, warmed the same way, in the same rounds
#   MAX_BYTES=110MB bash benches/varied-hit.sh # the proxy's cache.max_bytes (default: its default,
#                                              # 256 MiB, which 100 000 identifiers fill to ~31 %)
#   SAME_BODY=1 bash benches/varied-hit.sh     # one random batch repeated instead: the response memo
#                                              # answers it, so this is the proxy's per-request floor
#   PERF=1 bash benches/varied-hit.sh          # also perf-record the proxy during round PERF_ROUND (1) of batch
#                                              # PERF_BATCH (100) (PERF_ARGS="--call-graph dwarf" for Rust call stacks)
#
# Needs: target/release/tpns-cache and target/release/examples/loadgen (built when missing),
# wrk (apt-get install wrk), python3; perf for PERF=1. Prints one row per build and batch size,
# with wrk's own CPU per request and the share of the machine left idle: they say which side
# set the pace (the slower server leaves the client waiting; a fast one waits for the client).
set -euo pipefail
cd "$(dirname "$0")/.."

IDS=${IDS:-100000}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
CONN=${CONN:-32}
BATCHES=${BATCHES:-"20 100"}
BIN=${PROXY_BIN:-target/release/tpns-cache}
LOADGEN=${LOADGEN_BIN:-target/release/examples/loadgen}
OUT=target/varied-hit
mkdir -p "$OUT"

command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)"; exit 1; }
[[ -x $BIN ]] || cargo build --release --bin tpns-cache
[[ -x $LOADGEN ]] || cargo build --release --example loadgen
[[ -z ${BASE_BIN:-} || -x $BASE_BIN ]] || { echo "BASE_BIN=$BASE_BIN is not an executable"; exit 1; }

# free_port, wait_port, cpu_us, and PIDS: killed on exit.
source benches/common.sh

SIM=$(free_port)
"$BIN" simulate --listen "127.0.0.1:$SIM" --tokens "$IDS" --accounts $((IDS / 2)) >"$OUT/sim.log" 2>&1 &
PIDS+=($!)
wait_port "$SIM"

AUTH="Basic $(printf '%s' '1500001048:1452fcebae9f3115ba794fb0fff2fd73' | base64)"
export AUTH IDS SAME_BODY

# Starts a proxy build in front of the simulator and warms its cache with every identifier;
# sets PORT, ADMIN_PORT and PID.
start_proxy() { # name binary
  PORT=$(free_port); ADMIN_PORT=$(free_port)
  # Lifetimes longer than the run, and a quota that lets the warm-up through at once.
  env TPNS_CACHE_LISTEN="127.0.0.1:$PORT" TPNS_CACHE_ADMIN_LISTEN="127.0.0.1:$ADMIN_PORT" \
    TPNS_CACHE_UPSTREAM__URL="http://127.0.0.1:$SIM" TPNS_CACHE_CACHE__TTL=1h \
    TPNS_CACHE_SHIELD__CALLS_PER_SECOND=100000 TPNS_CACHE_SHIELD__BURST=100000 \
    TPNS_CACHE_LOG__LEVEL=warn ${MAX_BYTES:+TPNS_CACHE_CACHE__MAX_BYTES=$MAX_BYTES} \
    "$2" serve >"$OUT/$1.log" 2>&1 &
  PID=$!
  PIDS+=($PID)
  wait_port "$PORT"
  python3 - "$PORT" "$IDS" "$AUTH" <<'EOF'
import http.client, json, sys
port, ids, auth = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection("127.0.0.1", port)
for start in range(0, ids, 100):
    body = json.dumps({"operator_type": 2, "token_list": [f"tok-{i:08d}" for i in range(start, min(start + 100, ids))]})
    c.request("POST", "/v3/device/account/query", body, {"Content-Type": "application/json", "Authorization": auth})
    r = c.getresponse(); data = r.read()
    assert r.status == 200 and json.loads(data)["retCode"] == 0, data[:200]
EOF
  echo "$1: warm, $IDS identifiers cached"
}

NAMES=(proxy)
start_proxy proxy "$BIN"
declare -A PORT_OF=([proxy]=$PORT) ADMIN_OF=([proxy]=$ADMIN_PORT) PID_OF=([proxy]=$PID)
if [[ -n ${BASE_BIN:-} ]]; then
  NAMES+=(base)
  start_proxy base "$BASE_BIN"
  PORT_OF[base]=$PORT; ADMIN_OF[base]=$ADMIN_PORT; PID_OF[base]=$PID
fi

metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" 'index($0, m) == 1 { s += $NF } END { printf "%d", s }'; }
# How full the cache's byte budget is: from half of it on, moka is told of hits (the first
# three of each entry, then 1 in 32; src/cache/local.rs); below, of none.
curl -s "http://127.0.0.1:${ADMIN_OF[proxy]}/metrics" >/dev/null
echo "cache: $(metric "${ADMIN_OF[proxy]}" tpns_cache_weighted_bytes) bytes weighed, max_bytes ${MAX_BYTES:-default}"

# CPU time (user + system) this shell's finished children have used, in microseconds, from
# what bash's `times` wrote to $1 (its second line is the children's; `times` runs in this
# shell, as in a `$(...)` it would see the subshell's children only).
children_us() { awk 'NR == 2 { s = 0; for (i = 1; i <= NF; i++) { v = $i; sub(/s$/, "", v); split(v, ms, "m"); s += ms[1] * 60 + ms[2] } printf "%d", s * 1000000 }' "$1"; }
# The machine's idle and total CPU ticks so far (/proc/stat's first line).
cpu_ticks() { awk 'NR == 1 { t = 0; for (i = 2; i <= NF; i++) t += $i; printf "%d %d", $5 + $6, t }' /proc/stat; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# One wrk round against port $2 (server process $3); appends "req/s p99(ms) server-CPU-us-per-
# request client-CPU-us-per-request idle-%" to $1. The client's CPU and the idle share say who
# held the pace: wrk near 100 % of a core with the machine busy is the client's limit; a server
# at one core's worth with the machine partly idle is the server's.
round() {
  local c0 c1 w0 w1 i0 t0 i1 t1 file=$OUT/wrk.txt
  times >"$OUT/times"; c0=$(cpu_us "$3"); w0=$(children_us "$OUT/times"); read -r i0 t0 <<<"$(cpu_ticks)"
  wrk -t1 -c"$CONN" -d"$DURATION" --latency -s benches/varied-hit.lua "http://127.0.0.1:$2" >"$file"
  times >"$OUT/times"; c1=$(cpu_us "$3"); w1=$(children_us "$OUT/times"); read -r i1 t1 <<<"$(cpu_ticks)"
  awk -v c=$((c1 - c0)) -v w=$((w1 - w0)) -v idle=$((i1 - i0)) -v total=$((t1 - t0)) '
    /Requests\/sec/ { rps = $2 }
    /requests in/ { n = $1 }
    $1 == "99%" { p = $2; if (p ~ /us$/) p = p / 1000; else if (p ~ /ms$/) p = p + 0; else if (p ~ /s$/) p = p * 1000 }
    END { printf "%s %.2f %.1f %.1f %.0f\n", rps, p, c / n, w / n, total ? 100 * idle / total : 0 }' "$file" >>"$1"
}

printf '\n%-6s %6s %12s %12s %7s %13s %10s %10s %9s %9s %11s %6s %9s\n' build batch "server req/s" "plain req/s" ratio "ratio range" "p99 ms" "plain p99" "CPU/req" "plain CPU" "client CPU" "idle" "ups. ids"
for BATCH in $BATCHES; do
  export BATCH
  # One answer's size, for the plain server.
  SIZE=$(python3 - "${PORT_OF[proxy]}" "$IDS" "$BATCH" "$AUTH" <<'EOF'
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
  declare -A BEFORE
  for n in "${NAMES[@]}"; do
    BEFORE[$n]=$(metric "${ADMIN_OF[$n]}" tpns_cache_upstream_identifiers_total)
    : >"$OUT/rounds-$n-$BATCH.txt"
  done
  : >"$OUT/rounds-plain-$BATCH.txt"
  for r in $(seq "$ROUNDS"); do
    for n in "${NAMES[@]}"; do
      if [[ ${PERF:-0} == 1 && $BATCH == "${PERF_BATCH:-100}" && $r == "${PERF_ROUND:-1}" && $n == proxy ]]; then
        # shellcheck disable=SC2086
        perf record -F 499 ${PERF_ARGS:--g} -p "${PID_OF[proxy]}" -o "$OUT/perf-$BATCH.data" -- sleep "${DURATION%s}" >/dev/null 2>&1 &
        PERF_PID=$!
      fi
      round "$OUT/rounds-$n-$BATCH.txt" "${PORT_OF[$n]}" "${PID_OF[$n]}"
      [[ -n ${PERF_PID:-} ]] && { wait "$PERF_PID" || true; unset PERF_PID; }
    done
    round "$OUT/rounds-plain-$BATCH.txt" "$PLAIN" "$PLAIN_PID"
  done
  kill "$PLAIN_PID" 2>/dev/null || true
  P=$OUT/rounds-plain-$BATCH.txt
  for n in "${NAMES[@]}"; do
    S=$OUT/rounds-$n-$BATCH.txt
    ratios=$(paste -d' ' "$S" "$P" | awk '{ print $1 / $6 }')
    printf '%-6s %6s %12.0f %12.0f %7.2f %13s %10s %10s %8sus %8sus %11s %6s %9d\n' "$n" "$BATCH" \
      "$(cut -d' ' -f1 "$S" | median)" "$(cut -d' ' -f1 "$P" | median)" \
      "$(echo "$ratios" | median)" "$(echo "$ratios" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f-%.2f", lo, hi }')" \
      "$(cut -d' ' -f2 "$S" | median)" "$(cut -d' ' -f2 "$P" | median)" \
      "$(cut -d' ' -f3 "$S" | median)" "$(cut -d' ' -f3 "$P" | median)" \
      "$(cut -d' ' -f4 "$S" | median)/$(cut -d' ' -f4 "$P" | median)us" \
      "$(cut -d' ' -f5 "$S" | median)/$(cut -d' ' -f5 "$P" | median)%" \
      $(($(metric "${ADMIN_OF[$n]}" tpns_cache_upstream_identifiers_total) - BEFORE[$n]))
  done
done
echo
echo "(wrk -t1 -c$CONN, $ROUNDS rounds of $DURATION per server, taking turns; $IDS identifiers cached; answers of the same size from all; medians over the rounds; ratio range: the lowest and highest round; CPU/req: user + system CPU time of the server process per request served; client CPU: wrk's, per request, against this build / against the plain server; idle: the share of the machine's CPU time left idle during the rounds, same order; ups. ids: identifiers the build sent upstream during the batch's rounds, 0 when every lookup hit)"
[[ ${PERF:-0} == 1 ]] && echo "profile: perf report -i $OUT/perf-${PERF_BATCH:-100}.data --no-children --percent-limit 1.5"
exit 0
