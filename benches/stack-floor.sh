#!/usr/bin/env bash
# The proxy's HTTP stack alone, against the plain server: the committed source, patched
# (benches/stack-floor.patch, for this measurement only) so that every query is answered with a
# fixed body of BODY bytes right after its body is read under the proxy's limits and counted as
# usual. Everything a request meets before the query handler stays: the listener and its
# connection limit, hyper's header-read timer, the write timeout, the graceful-shutdown watcher,
# the body's size/time/memory limits, the boxed body, the response metrics. wrk (the varied-hit
# Lua script, batches of 20) against the patched proxy and the plain hyper server in turn, two
# rounds; then once more with hyper's header-read timer off (STACK_FLOOR_NO_HEADER_TIMER).
#
#   bash benches/stack-floor.sh            # BODY=2365 (a batch-20 answer of varied-hit.sh) DURATION=8s
#
# Builds the patched copy in target/stack-floor (a release build from scratch: ~5 min). The patch
# touches only proxy::handle and server::serve; if they change so that it no longer applies,
# make it again the same way (git diff of those two edits).
# Needs wrk, python3, patch, git.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BODY=${BODY:-2365}
DURATION=${DURATION:-8s}
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)"; exit 1; }
SRC=target/stack-floor/src
export CARGO_TARGET_DIR=$ROOT/target/stack-floor/target
rm -rf "$SRC" && mkdir -p "$SRC"
git archive HEAD | tar -x -C "$SRC"
(cd "$SRC" && patch -s -p1 <"$ROOT/benches/stack-floor.patch")
(cd "$SRC" && cargo build -q --release --bin tpns-cache --example loadgen)
BIN=$CARGO_TARGET_DIR/release/tpns-cache
LOADGEN=$CARGO_TARGET_DIR/release/examples/loadgen

# free_port, wait_port, cpu_us, and PIDS: killed on exit.
source benches/common.sh

export AUTH="Basic $(printf '%s' '1500001048:1452fcebae9f3115ba794fb0fff2fd73' | base64)" IDS=100000 BATCH=20
PLAIN=$(free_port)
"$LOADGEN" --scenario plain-server --listen "127.0.0.1:$PLAIN" --body-bytes "$BODY" >/dev/null 2>&1 &
PLAIN_PID=$!
PIDS+=($PLAIN_PID)
wait_port "$PLAIN"

run() { # name port pid
  local c0 c1 n r
  c0=$(cpu_us "$3")
  wrk -t1 -c32 -d"$DURATION" -s benches/varied-hit.lua "http://127.0.0.1:$2" >"target/stack-floor/wrk.txt"
  c1=$(cpu_us "$3")
  n=$(awk '/requests in/ { print $1 }' target/stack-floor/wrk.txt)
  r=$(awk '/Requests\/sec/ { print $2 }' target/stack-floor/wrk.txt)
  printf '%-34s %10.0f req/s %8.1fus CPU/req\n' "$1" "$r" "$(awk -v c=$((c1 - c0)) -v n="$n" 'BEGIN { print c / n }')"
}

for mode in "with hyper's header-read timer" "without it"; do
  SIM=$(free_port); PROXY=$(free_port); ADMIN=$(free_port)
  "$BIN" simulate --listen "127.0.0.1:$SIM" --tokens 1000 --accounts 500 >/dev/null 2>&1 &
  SIM_PID=$!
  extra=()
  [[ $mode == "without it" ]] && extra=(STACK_FLOOR_NO_HEADER_TIMER=1)
  env "${extra[@]}" STACK_FLOOR_BODY_BYTES="$BODY" TPNS_CACHE_LISTEN="127.0.0.1:$PROXY" \
    TPNS_CACHE_ADMIN_LISTEN="127.0.0.1:$ADMIN" TPNS_CACHE_UPSTREAM__URL="http://127.0.0.1:$SIM" \
    TPNS_CACHE_LOG__LEVEL=warn "$BIN" serve >target/stack-floor/proxy.log 2>&1 &
  PROXY_PID=$!
  PIDS+=($SIM_PID $PROXY_PID)
  wait_port "$PROXY"
  # The patch is in effect: a query gets the fixed body, not an answer.
  got=$(curl -s -X POST -H "Authorization: $AUTH" -d '{"operator_type":2,"token_list":["t"]}' "http://127.0.0.1:$PROXY/v3/device/account/query")
  [[ ${#got} == "$BODY" && $got == x* ]] || { echo "the patched proxy did not answer the fixed body"; exit 1; }
  echo "== $mode"
  for _ in 1 2; do
    run "proxy (stack only)" "$PROXY" "$PROXY_PID"
    run "plain" "$PLAIN" "$PLAIN_PID"
  done
  kill "$PROXY_PID" "$SIM_PID"
  wait "$PROXY_PID" "$SIM_PID" 2>/dev/null || true
done
echo "(wrk -t1 -c32 -d$DURATION, varied batch-20 bodies, $BODY-byte answers from both; CPU/req: user + system CPU time of the server process per request)"
