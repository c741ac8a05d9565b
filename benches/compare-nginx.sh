#!/usr/bin/env bash
# Side by side on the same simulator and the same zipf trace: nginx `proxy_cache` keyed on the
# request body (the usual way to cache POST) against tpns-cache. Reports upstream identifiers,
# upstream calls and client req/s for both, then tpns-cache's memory per cached identifier.
#
#   bash benches/compare-nginx.sh            # IDS=1000000 REQUESTS=100000 CONC=32 by default
#
# Installs nginx with apt-get when it is absent (root). Everything listens on 127.0.0.1 with
# free ports picked at start; every process is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
IDS=${IDS:-1000000}
REQUESTS=${REQUESTS:-100000}
CONC=${CONC:-32}
SHARE=${SHARE:-0.1}

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "== installing nginx"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "== building (release)"
cargo build --release --quiet --bin tpns-cache --example loadgen --example memprobe
BIN=target/release/tpns-cache
LOADGEN=target/release/examples/loadgen

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; return 1; }
SIM_PORT=$(free_port); NGINX_PORT=$(free_port); PROXY_PORT=$(free_port); ADMIN_PORT=$(free_port)

echo "== simulator: $IDS tokens on 127.0.0.1:$SIM_PORT"
"$BIN" simulate --listen "127.0.0.1:$SIM_PORT" --accounts "$IDS" --tokens "$IDS" --no-seed >"$work/sim.log" 2>&1 &
pids+=($!)
wait_port "$SIM_PORT"

stats() { curl -s "http://127.0.0.1:$SIM_PORT/_sim/stats" | python3 -c 'import json,sys; s=json.load(sys.stdin); p="/v3/device/account/query"; print(s["requests"].get(p,0), s["identifiers"].get(p,0))'; }
reset() { curl -s -X POST "http://127.0.0.1:$SIM_PORT/_sim/reset" >/dev/null; }
replay() {
  "$LOADGEN" --scenario replay --target "$1" --ids "$IDS" --requests "$REQUESTS" --concurrency "$CONC" --report "$work/$2.json" | grep '^replay'
  local errors
  errors=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["replay"]["run"]["errors"])' "$work/$2.json")
  if [ "$errors" != "0" ]; then echo "$2: $errors requests failed; see $work/error.log" >&2; cat "$work/error.log" >&2 || true; exit 1; fi
}
rps() { python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["replay"]["run"]["req_per_s"]))' "$1"; }

mkdir -p "$work/cache" "$work/tmp"
# nginx's workers drop to an unprivileged user (www-data on Debian): let them write the cache.
chmod 755 "$work"
chmod 777 "$work/cache" "$work/tmp"
cat >"$work/nginx.conf" <<NGX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/tmp/body;
  proxy_temp_path $work/tmp/proxy;
  fastcgi_temp_path $work/tmp/fastcgi;
  uwsgi_temp_path $work/tmp/uwsgi;
  scgi_temp_path $work/tmp/scgi;
  # Generous: 64 MiB of keys (~500k) and 2 GiB of responses, more than tpns-cache gets.
  proxy_cache_path $work/cache levels=1:2 keys_zone=tpns:64m max_size=2g inactive=1h use_temp_path=off;
  upstream sim { server 127.0.0.1:$SIM_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    client_body_buffer_size 1m;
    client_max_body_size 1m;
    location / {
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache tpns;
      proxy_cache_methods POST;
      proxy_cache_key "\$request_uri|\$http_authorization|\$request_body";
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
    }
  }
}
NGX
echo "== nginx proxy_cache (body-keyed) on 127.0.0.1:$NGINX_PORT"
"$NGINX" -p "$work" -c "$work/nginx.conf"
wait_port "$NGINX_PORT"
reset
replay "http://127.0.0.1:$NGINX_PORT" nginx
read -r nginx_calls nginx_ids < <(stats)

# tpns-cache with a cache of SHARE × IDS entries (≈ 950 bytes each, see examples/memprobe.rs).
max_bytes=$(python3 -c "print(int($IDS*$SHARE*950))")
echo "== tpns-cache on 127.0.0.1:$PROXY_PORT (cache.max_bytes = $max_bytes)"
TPNS_CACHE_LISTEN="127.0.0.1:$PROXY_PORT" TPNS_CACHE_ADMIN_LISTEN="127.0.0.1:$ADMIN_PORT" \
TPNS_CACHE_UPSTREAM__URL="http://127.0.0.1:$SIM_PORT" TPNS_CACHE_SHIELD__CALLS_PER_SECOND=0 \
TPNS_CACHE_CACHE__TTL=1h TPNS_CACHE_CACHE__MAX_BYTES="$max_bytes" TPNS_CACHE_LOG__LEVEL=warn \
  "$BIN" serve >"$work/proxy.log" 2>&1 &
pids+=($!)
proxy_pid=$!
wait_port "$PROXY_PORT"
reset
replay "http://127.0.0.1:$PROXY_PORT" tpns
read -r tpns_calls tpns_ids < <(stats)
rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$proxy_pid/status")
entries=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '/^tpns_cache_entries / {print $2}')

echo
printf '%-22s %14s %14s %10s\n' "" "upstream ids" "upstream calls" "req/s"
printf '%-22s %14s %14s %10s\n' "nginx (body-keyed)" "$nginx_ids" "$nginx_calls" "$(rps "$work/nginx.json")"
printf '%-22s %14s %14s %10s\n' "tpns-cache" "$tpns_ids" "$tpns_calls" "$(rps "$work/tpns.json")"
python3 -c "print('nginx forwards %.1fx the identifiers tpns-cache forwards' % ($nginx_ids / max($tpns_ids, 1)))"
echo "tpns-cache process RSS after the run: $((rss_kb / 1024)) MiB with $entries entries cached"

echo
echo "== memory per cached identifier (1M entries, ~150-byte elements)"
target/release/examples/memprobe 1000000
