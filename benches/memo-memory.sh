#!/usr/bin/env bash
# What a response-memo entry really costs in memory, against what the memo's weigher charges.
# `tpns-cache serve` (release) in front of `tpns-cache simulate`: 2 000 tokens cached, then N
# distinct bodies of K random tokens, each sent twice over one keep-alive connection (the
# second time memoizes it, see src/proxy/query/memo.rs), and a third pass to count the entries
# the memo answers (`tpns_cache_memo_hits_total`; the doorkeeper's collisions lose a few).
# Prints the RSS growth of the second pass per memoized entry, what the weigher charges for
# one, and the whole growth (with a small MEMO budget: whether the budget bounds it).
#
#   bash benches/memo-memory.sh                    # K=5 N=8000 MEMO=64MiB
#   K=50 bash benches/memo-memory.sh               # bigger bodies and answers
#   MEMO=4MiB bash benches/memo-memory.sh          # a budget smaller than the entries
#   BIN=/path/to/other/tpns-cache bash benches/memo-memory.sh
#
# Needs: target/release/tpns-cache (built when missing), python3, curl.
set -euo pipefail
cd "$(dirname "$0")/.."

K=${K:-5}
N=${N:-8000}
MEMO=${MEMO:-64MiB}
BIN=${BIN:-target/release/tpns-cache}
OUT=target/memo-memory
mkdir -p "$OUT"
[[ -x $BIN ]] || cargo build --release --bin tpns-cache


# free_port, wait_port, and PIDS: killed on exit.
source benches/common.sh

SIM=$(free_port)
"$BIN" simulate --listen "127.0.0.1:$SIM" --tokens 2000 --accounts 1000 >"$OUT/sim.log" 2>&1 &
PIDS+=($!)
PORT=$(free_port); ADMIN=$(free_port)
env TPNS_CACHE_LISTEN="127.0.0.1:$PORT" TPNS_CACHE_ADMIN_LISTEN="127.0.0.1:$ADMIN" \
  TPNS_CACHE_UPSTREAM__URL="http://127.0.0.1:$SIM" TPNS_CACHE_CACHE__TTL=1h \
  TPNS_CACHE_CACHE__MEMO_MAX_BYTES="$MEMO" TPNS_CACHE_LOG__LEVEL=warn \
  "$BIN" serve >"$OUT/proxy.log" 2>&1 &
PROXY=$!
PIDS+=($PROXY)
wait_port "$SIM"
wait_port "$PORT"

AUTH="Basic $(printf '%s' '1500001048:1452fcebae9f3115ba794fb0fff2fd73' | base64)"
python3 - "$PORT" "$ADMIN" "$PROXY" "$AUTH" "$K" "$N" "$MEMO" <<'EOF'
import http.client, json, random, sys, urllib.request
port, admin, pid, auth = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
k, n, memo = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

def memo_hits():
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("tpns_cache_memo_hits_total"))

c = http.client.HTTPConnection("127.0.0.1", port)
sizes = []
def ask(ids):
    body = json.dumps({"operator_type": 2, "token_list": [f"tok-{i:08d}" for i in ids]})
    c.request("POST", "/v3/device/account/query", body,
              {"Content-Type": "application/json", "Authorization": auth})
    r = c.getresponse()
    answer = r.read()
    assert r.status == 200 and json.loads(answer)["retCode"] == 0, answer[:200]
    sizes.append(len(body) + len(answer))

for start in range(0, 2000, 100):
    ask(range(start, start + 100))
random.seed(7)
bodies = [random.sample(range(2000), k) for _ in range(n)]
for b in bodies:                 # seen once: not memoized
    ask(b)
before = rss()
for b in bodies:                 # seen twice: memoized
    ask(b)
grown = rss() - before
charged = sum(sizes[-n:]) / n
charged = charged + charged // 8 + 1000  # the weigher in src/proxy/query/memo.rs
hits = memo_hits()
for b in bodies:                 # how many the memo answers
    ask(b)
kept = memo_hits() - hits
print(f"K={k} N={n} memo_max_bytes={memo}: {kept:.0f} entries memoized; "
      f"RSS +{grown / max(kept, 1):.0f} B per entry, charged {charged:.0f} B; "
      f"RSS grew {grown / 2**20:.1f} MiB in all")
EOF
