#!/usr/bin/env python3
"""Checks behind deploy/validate.sh (run it through that script, which sets up the venv).

Subcommands (each prints PASS lines and exits non-zero with FAIL lines on a problem):
  render BASE OUT         render a kustomize base the way `kustomize build` does, for exactly the
                          features deploy/kubernetes/base uses (resources, configMapGenerator with
                          files, images); anything else is refused rather than rendered wrongly
  compare A B             two renderings hold the same objects (used to test `render`)
  k8s RENDERED VERSIONS   schema-validate the core objects with kubernetes-validate (strict) for
                          each Kubernetes version; check the CRD objects' shape; cross-check the
                          sidecar, its configuration, Secret, probes, PodMonitor and alerts
  extract RENDERED DIR    write DIR/tpns-cache.toml (from the ConfigMap) and
                          DIR/tpns-cache-rules.yaml (the PrometheusRule's spec.groups)
  config-keys TOML REF    every key of TOML is documented in REF (config/tpns-cache.toml)
  dashboard JSON OUT      check the Grafana dashboard; write its PromQL as recording rules to OUT
                          for `promtool check rules`
  metric-names FILE...    every metric name in the rules and the dashboard exists
  smoke BIN TOML DIR      run the built binary with the rendered configuration and check the
                          probes, /metrics, the admin token, the proxy listener, JSON logs and
                          the SIGTERM drain (loopback only)
"""

import hashlib
import json
import os
import re
import sys

import yaml

FAILURES = []


def ok(msg):
    print(f"PASS  {msg}")


def bad(msg):
    FAILURES.append(msg)
    print(f"FAIL  {msg}")


def finish():
    sys.exit(1 if FAILURES else 0)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# --------------------------------------------------------------------------------------------
# The metrics tpns-cache exports: read from README.md's metrics table, which tests/docs.rs keeps
# in step with the code (so this list cannot drift). Histograms also expose _bucket/_sum/_count.
def _readme_metrics():
    import re
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    counters, histograms, gauges = set(), set(), set()
    with open(readme) as f:
        for line in f:
            m = re.match(r"\| `(tpns_cache_[a-z0-9_]+)` \| (counter|histogram|gauge) \|", line)
            if m:
                {"counter": counters, "histogram": histograms, "gauge": gauges}[m.group(2)].add(m.group(1))
    if not counters or not histograms or not gauges:
        sys.exit("FAIL  README.md: no metrics table found")
    return counters, histograms, gauges


COUNTERS, HISTOGRAMS, GAUGES = _readme_metrics()
PROMETHEUS_OWN = {"up"}


def known_metric(name):
    if name in COUNTERS or name in GAUGES or name in PROMETHEUS_OWN:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return True
    return False


PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan", "atan2", "start", "end",
}


def known_family(name):
    """A metric family name as /metrics lists it in its '# TYPE' lines."""
    return known_metric(name) or name in HISTOGRAMS


def promql_metric_names(expr):
    """Metric names in a PromQL expression (without a full parser: strings, label matchers,
    ranges and grouping clauses are cut out first; function names are followed by '(')."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"'(?:[^'\\]|\\.)*'", "''", e)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


# --------------------------------------------------------------------------------------------
# render: the subset of kustomize that deploy/kubernetes/base uses.

KUSTOMIZE_ORDER = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
    "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
    "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]
KUSTOMIZE_LAST = [
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]


def kustomize_hash(obj):
    """kustomize's name-suffix hash of a generated ConfigMap (api/hasher): sha256 of Go's
    json.Marshal of {data, kind, name}, first 10 hex digits with 0 1 3 a e replaced. kustomize
    v5 hashes the generated object before it has a name, so name is ""."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def render(base, out):
    with open(os.path.join(base, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    understood = {"apiVersion", "kind", "resources", "configMapGenerator", "images"}
    unknown = set(kust) - understood
    if unknown:
        sys.exit(f"FAIL  python renderer: kustomization.yaml uses {sorted(unknown)}, which it does "
                 "not implement; install kubectl or kustomize")
    docs = []
    for res in kust.get("resources", []):
        path = os.path.join(base, res)
        if not os.path.isfile(path):
            sys.exit(f"FAIL  python renderer: resource {res} is not a file")
        docs.extend(load_docs(path))

    renamed = {}
    for gen in kust.get("configMapGenerator", []):
        extra = set(gen) - {"name", "files", "literals"}
        if extra:
            sys.exit(f"FAIL  python renderer: configMapGenerator uses {sorted(extra)}")
        data = {}
        for entry in gen.get("files", []):
            key, _, path = entry.rpartition("=") if "=" in entry else (os.path.basename(entry), "", entry)
            with open(os.path.join(base, path)) as f:
                data[key] = f.read()
        for lit in gen.get("literals", []):
            key, _, value = lit.partition("=")
            data[key] = value
        name = gen["name"]
        hashed = f"{name}-{kustomize_hash({'data': data, 'kind': 'ConfigMap', 'name': ''})}"
        renamed[name] = hashed
        docs.append({"apiVersion": "v1", "data": data, "kind": "ConfigMap",
                     "metadata": {"name": hashed}})

    images = {img["name"]: img for img in kust.get("images", [])}

    def pod_specs(doc):
        spec = doc.get("spec") or {}
        if doc.get("kind") == "Pod":
            yield spec
        elif doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield spec.get("template", {}).get("spec", {})
        elif doc.get("kind") == "CronJob":
            yield spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})

    for doc in docs:
        for ps in pod_specs(doc):
            for vol in ps.get("volumes", []):
                cm = vol.get("configMap")
                if cm and cm.get("name") in renamed:
                    cm["name"] = renamed[cm["name"]]
                for src in (vol.get("projected") or {}).get("sources", []):
                    cm = src.get("configMap")
                    if cm and cm.get("name") in renamed:
                        cm["name"] = renamed[cm["name"]]
            for c in ps.get("initContainers", []) + ps.get("containers", []):
                for ef in c.get("envFrom", []):
                    ref = ef.get("configMapRef")
                    if ref and ref.get("name") in renamed:
                        ref["name"] = renamed[ref["name"]]
                for ev in c.get("env", []):
                    ref = (ev.get("valueFrom") or {}).get("configMapKeyRef")
                    if ref and ref.get("name") in renamed:
                        ref["name"] = renamed[ref["name"]]
                image = c.get("image", "")
                m = re.match(r"^([^@]*?)(?::([^:/@]+))?(?:@(.+))?$", image)
                if m and m.group(1) in images:
                    img = images[m.group(1)]
                    new = img.get("newName", m.group(1))
                    if img.get("digest"):
                        new += "@" + img["digest"]
                    elif img.get("newTag"):
                        new += ":" + img["newTag"]
                    elif m.group(2):
                        new += ":" + m.group(2)
                    c["image"] = new

    def order(doc):
        kind = doc.get("kind", "")
        if kind in KUSTOMIZE_ORDER:
            rank = KUSTOMIZE_ORDER.index(kind)
        elif kind in KUSTOMIZE_LAST:
            rank = 1000 + KUSTOMIZE_LAST.index(kind)
        else:
            rank = len(KUSTOMIZE_ORDER)
        meta = doc.get("metadata", {})
        return (rank, kind, meta.get("namespace", ""), meta.get("name", ""))

    docs.sort(key=order)
    with open(out, "w") as f:
        yaml.safe_dump_all(docs, f, default_flow_style=False, sort_keys=True)
    ok(f"python renderer: {len(docs)} objects -> {out}")


def compare(a, b):
    def key(d):
        return (d["kind"], d["metadata"]["name"])
    da = {key(d): d for d in load_docs(a)}
    db = {key(d): d for d in load_docs(b)}
    if da == db:
        ok(f"{a} and {b} hold the same {len(da)} objects")
    else:
        for k in sorted(set(da) | set(db)):
            if da.get(k) != db.get(k):
                bad(f"{k[0]}/{k[1]} differs between {a} and {b}")
    finish()


# --------------------------------------------------------------------------------------------
# k8s: schemas and cross-checks of the rendered base.

CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def parse_duration(text):
    total = 0.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    pos = 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        if m.start() != pos:
            raise ValueError(text)
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(text)
    return total


def k8s(rendered, versions):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    docs = load_docs(rendered)
    by_kind = {}
    for d in docs:
        if not isinstance(d, dict) or not all(k in d for k in ("apiVersion", "kind", "metadata")) \
                or not (d.get("metadata") or {}).get("name"):
            bad(f"object without apiVersion/kind/metadata.name: {str(d)[:80]}")
            continue
        by_kind.setdefault(d["kind"], []).append(d)
        ident = f"{d['kind']}/{d['metadata']['name']}"
        if (d["apiVersion"], d["kind"]) in CRD_KINDS:
            ok(f"{ident}: parses, apiVersion {d['apiVersion']}, kind and metadata present "
               "(CRD: no schema check)")
            continue
        for v in versions:
            try:
                kubernetes_validate.validate(d, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                bad(f"{ident}: Kubernetes {v} schema (strict): {path}: {e.message}")
                break
            except SchemaNotFoundError as e:
                bad(f"{ident}: {e.message}")
                break
        else:
            ok(f"{ident}: valid against the Kubernetes {', '.join(versions)} schemas (strict)")

    for kind in ("ConfigMap", "Secret", "Deployment", "PodMonitor", "PrometheusRule"):
        if len(by_kind.get(kind, [])) != 1:
            bad(f"expected exactly one {kind}, found {len(by_kind.get(kind, []))}")
    if FAILURES:
        finish()
    cross_checks(by_kind)
    finish()


def cross_checks(by_kind):
    import tomllib

    cm = by_kind["ConfigMap"][0]
    secret = by_kind["Secret"][0]
    dep = by_kind["Deployment"][0]
    pod = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})

    sidecars = [c for c in pod.get("initContainers", []) if c.get("name") == "tpns-cache"]
    if len(sidecars) != 1:
        bad("Deployment: no initContainer named tpns-cache")
        return
    sc = sidecars[0]
    name = "Deployment: sidecar tpns-cache"
    if sc.get("restartPolicy") == "Always":
        ok(f"{name} is a native sidecar (initContainer, restartPolicy: Always)")
    else:
        bad(f"{name}: restartPolicy must be Always (native sidecar)")

    # Configuration file: where TPNS_CACHE_CONFIG points, from the generated ConfigMap.
    env = {e["name"]: e.get("value") for e in sc.get("env", [])}
    config_path = env.get("TPNS_CACHE_CONFIG", "/etc/tpns-cache/tpns-cache.toml")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = sc.get("volumeMounts", [])

    def volume_for(path):
        for m in mounts:
            mp = m["mountPath"].rstrip("/")
            if path.startswith(mp + "/") and "subPath" not in m:
                return vols.get(m["name"]), path[len(mp) + 1:], m
        return None, None, None

    vol, key, _ = volume_for(config_path)
    if not vol or not vol.get("configMap") or vol["configMap"]["name"] != cm["metadata"]["name"] \
            or key not in cm.get("data", {}):
        bad(f"{name}: {config_path} is not the key of the generated ConfigMap {cm['metadata']['name']}")
        return
    ok(f"{name}: {config_path} comes from ConfigMap {cm['metadata']['name']}")
    try:
        conf = tomllib.loads(cm["data"][key])
    except tomllib.TOMLDecodeError as e:
        bad(f"ConfigMap {cm['metadata']['name']}: {key} is not TOML: {e}")
        return

    # Listeners: the app reaches the proxy on loopback, probes and Prometheus the admin port.
    listen = conf.get("listen", "127.0.0.1:8080")
    admin = conf.get("admin_listen", "127.0.0.1:9090")
    admin_port = int(admin.rsplit(":", 1)[1])
    if listen.startswith("127.0.0.1:"):
        ok(f"config: proxy listener {listen} is loopback only")
    else:
        bad(f"config: listen {listen} should be loopback in a sidecar")
    ports = {p.get("name"): p["containerPort"] for p in sc.get("ports", [])}
    if ports.get("tpns-admin") == admin_port and not admin.startswith("127."):
        ok(f"config: admin_listen {admin} is reachable as container port tpns-admin")
    else:
        bad(f"config: admin_listen {admin} must be non-loopback and match container port tpns-admin {ports}")
    apps = [c for c in pod.get("containers", [])]
    base_urls = [e.get("value") for c in apps for e in c.get("env", []) if e["name"] == "TPNS_BASE_URL"]
    want = f"http://127.0.0.1:{listen.rsplit(':', 1)[1]}"
    if base_urls and all(u.rstrip("/") == want for u in base_urls):
        ok(f"app: TPNS_BASE_URL={want} points at the sidecar")
    else:
        bad(f"app: TPNS_BASE_URL {base_urls} should be {want}")

    # Probes on the admin port.
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/readyz")):
        hg = (sc.get(probe) or {}).get("httpGet") or {}
        port = hg.get("port")
        port = ports.get(port, port)
        if hg.get("path") == path and port == admin_port:
            ok(f"{name}: {probe} GET {path} on admin port {admin_port}")
        else:
            bad(f"{name}: {probe} must be GET {path} on the admin port {admin_port}, is {hg}")

    # Secrets: every *_file of the config is a key of the mounted Secret; the admin token is set
    # (required on a non-loopback admin listener).
    files = []
    inject = conf.get("auth", {}).get("inject")
    if inject and inject.get("secret_key_file"):
        files.append(("auth.inject.secret_key_file", inject["secret_key_file"]))
    for i, app in enumerate(conf.get("auth", {}).get("apps", [])):
        if app.get("secret_key_file"):
            files.append((f"auth.apps[{i}].secret_key_file", app["secret_key_file"]))
    adm = conf.get("admin", {})
    if adm.get("token_file"):
        files.append(("admin.token_file", adm["token_file"]))
    elif not adm.get("token_env"):
        bad("config: admin_listen is not loopback, so [admin] token_file (or token_env) is required")
    for cfg_key, path in files:
        vol, key, mount = volume_for(path)
        sec = (vol or {}).get("secret")
        if not sec or sec.get("secretName") != secret["metadata"]["name"]:
            bad(f"config: {cfg_key} = {path} is not on a mount of Secret {secret['metadata']['name']}")
            continue
        keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
        if key not in keys:
            bad(f"config: {cfg_key} = {path}: Secret {secret['metadata']['name']} has no key {key}")
            continue
        ok(f"config: {cfg_key} = {path} is key {key} of Secret {secret['metadata']['name']}")
    mode = None
    for v in vols.values():
        if (v.get("secret") or {}).get("secretName") == secret["metadata"]["name"]:
            mode = v["secret"].get("defaultMode", 0o644)
    uid = (sc.get("securityContext") or {}).get("runAsUser")
    gid = (sc.get("securityContext") or {}).get("runAsGroup")
    fs_group = (pod.get("securityContext") or {}).get("fsGroup")
    if mode is not None and (mode & 0o004 or (mode & 0o040 and fs_group is not None and fs_group == gid)):
        ok(f"{name}: can read the Secret's files (mode {oct(mode)}, fsGroup {fs_group}, uid {uid})")
    else:
        bad(f"{name}: uid {uid} cannot read the Secret's files (mode {mode and oct(mode)}, fsGroup {fs_group})")

    # Graceful shutdown budget.
    grace = parse_duration(conf.get("shutdown_grace", "10s"))
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if tgps > grace:
        ok(f"terminationGracePeriodSeconds {tgps} exceeds shutdown_grace {grace:g}s")
    else:
        bad(f"terminationGracePeriodSeconds {tgps} must exceed shutdown_grace {grace:g}s")

    # Hardening and resources.
    sctx = sc.get("securityContext") or {}
    pod_sctx = pod.get("securityContext") or {}
    hardened = (
        (sctx.get("runAsNonRoot") or pod_sctx.get("runAsNonRoot")) is True
        and sctx.get("readOnlyRootFilesystem") is True
        and sctx.get("allowPrivilegeEscalation") is False
        and "ALL" in ((sctx.get("capabilities") or {}).get("drop") or [])
    )
    if hardened:
        ok(f"{name}: non-root, read-only root filesystem, no privilege escalation, drops ALL capabilities")
    else:
        bad(f"{name}: securityContext must set runAsNonRoot, readOnlyRootFilesystem, "
            "allowPrivilegeEscalation: false and drop ALL capabilities")
    res = sc.get("resources") or {}
    if (res.get("requests") or {}).get("cpu") and (res.get("requests") or {}).get("memory") \
            and (res.get("limits") or {}).get("memory"):
        ok(f"{name}: requests {res['requests']}, limits {res['limits']}, "
           f"cache.max_bytes {conf.get('cache', {}).get('max_bytes', '256MiB (default)')}")
    else:
        bad(f"{name}: needs requests cpu/memory and a memory limit")

    # PodMonitor: selects this pod, scrapes the admin port.
    pm = by_kind["PodMonitor"][0]
    sel = (pm["spec"].get("selector") or {}).get("matchLabels") or {}
    eps = pm["spec"].get("podMetricsEndpoints") or []
    if sel and all(pod_labels.get(k) == v for k, v in sel.items()):
        ok(f"PodMonitor/{pm['metadata']['name']}: selects the Deployment's pods ({sel})")
    else:
        bad(f"PodMonitor/{pm['metadata']['name']}: selector {sel} does not match pod labels {pod_labels}")
    if eps and all(e.get("port") in ports and e.get("path", "/metrics") == "/metrics" for e in eps):
        ok(f"PodMonitor/{pm['metadata']['name']}: scrapes port {eps[0].get('port')} /metrics")
    else:
        bad(f"PodMonitor/{pm['metadata']['name']}: endpoints {eps} must scrape a sidecar port's /metrics")

    # PrometheusRule: every alert has a severity, a summary and a description.
    pr = by_kind["PrometheusRule"][0]
    alerts = [r for g in pr["spec"].get("groups", []) for r in g.get("rules", []) if "alert" in r]
    for r in alerts:
        missing = [k for k in ("summary", "description") if not (r.get("annotations") or {}).get(k)]
        if not (r.get("labels") or {}).get("severity"):
            missing.append("labels.severity")
        if missing:
            bad(f"PrometheusRule alert {r['alert']}: missing {missing}")
    if alerts and not FAILURES:
        ok(f"PrometheusRule/{pr['metadata']['name']}: {len(alerts)} alerts "
           f"({', '.join(r['alert'] for r in alerts)}), each with severity, summary, description")


# --------------------------------------------------------------------------------------------

def extract(rendered, outdir):
    docs = load_docs(rendered)
    cms = [d for d in docs if d.get("kind") == "ConfigMap"]
    rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
    if len(cms) != 1 or len(cms[0].get("data", {})) != 1 or len(rules) != 1:
        sys.exit("FAIL  extract: expected one ConfigMap with one file and one PrometheusRule")
    (name, text), = cms[0]["data"].items()
    with open(os.path.join(outdir, name), "w") as f:
        f.write(text)
    with open(os.path.join(outdir, "tpns-cache-rules.yaml"), "w") as f:
        yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}, f, sort_keys=False, width=1000)
    ok(f"extracted {name} and tpns-cache-rules.yaml (PrometheusRule spec.groups) to {outdir}")


def documented_keys(ref_path):
    """Dotted keys of config/tpns-cache.toml, live or commented out as '# key = ...' under a
    live or commented-out '# [table]' (commented examples indented further are ignored)."""
    keys, table = set(), ""
    for line in open(ref_path):
        m = re.match(r"^(?:# )?\[([a-z_.]+)\]\s*(?:#.*)?$", line)
        if m:
            table = m.group(1) + "."
            continue
        m = re.match(r"^(?:# )?([a-z_]+)\s*=", line)
        if m:
            keys.add(table + m.group(1))
    return keys


def flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            if not v:
                yield prefix + k
            yield from flatten(v, prefix + k + ".")
        else:
            yield prefix + k


# Keys announced but not yet in config/tpns-cache.toml: allowed with a warning until they land.
PENDING_KEYS = set()  # e.g. {"shutdown_grace"} while it was being added


def config_keys(toml_path, ref_path):
    import tomllib
    with open(toml_path, "rb") as f:
        conf = tomllib.load(f)
    doc = documented_keys(ref_path)
    tables = {k.rsplit(".", 1)[0] for k in doc if "." in k}
    used = set(flatten(conf))
    for key in sorted(used):
        if key in doc or key in tables:
            continue
        if key in PENDING_KEYS:
            print(f"WARN  {toml_path}: {key} is not in {ref_path} yet (announced; the binary "
                  "refuses it until it lands)")
            continue
        bad(f"{toml_path}: key {key} is not in {ref_path}: the binary would refuse to start")
    if not FAILURES:
        ok(f"{toml_path}: all {len(used)} keys are documented in {ref_path}")
    finish()


def dashboard(path, out):
    try:
        with open(path) as f:
            dash = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        bad(f"{path}: not valid JSON: {e}")
        finish()
    ok(f"{path}: valid JSON")
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        bad(f"{path}: schemaVersion {dash.get('schemaVersion')} (want 36 or later)")
    variables = dash.get("templating", {}).get("list", [])
    dsvars = [v for v in variables if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    if len(dsvars) != 1:
        bad(f"{path}: needs one datasource template variable of type prometheus")
    dsname = dsvars[0]["name"] if dsvars else "datasource"
    ids, rules, problems = set(), [], []

    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    n_panels = 0
    for p in walk(dash.get("panels", [])):
        n_panels += 1
        if p.get("id") in ids:
            problems.append(f"panel id {p.get('id')} used twice")
        ids.add(p.get("id"))
        if "gridPos" not in p:
            problems.append(f"panel {p.get('title')!r} has no gridPos")
        if p.get("type") == "row":
            continue
        if not p.get("targets"):
            problems.append(f"panel {p.get('title')!r} has no queries")
        for t in p.get("targets", []):
            ds = t.get("datasource") or p.get("datasource") or {}
            if ds.get("uid") not in (f"${dsname}", f"${{{dsname}}}"):
                problems.append(f"panel {p.get('title')!r} query {t.get('refId')}: datasource is not ${dsname}")
            expr = t.get("expr", "")
            if not expr:
                problems.append(f"panel {p.get('title')!r} query {t.get('refId')}: no expr")
                continue
            grafana_free = (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
                            .replace("$__range", "1h"))
            rules.append({"record": f"dashboard:panel_{p['id']}:{t.get('refId', 'A')}",
                          "expr": grafana_free})
    for v in variables:
        if v.get("type") == "query" and (v.get("datasource") or {}).get("uid") not in (f"${dsname}", f"${{{dsname}}}"):
            problems.append(f"variable {v.get('name')}: datasource is not ${dsname}")
    for msg in problems:
        bad(f"{path}: {msg}")
    with open(out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, f,
                       sort_keys=False, width=1000)
    if not problems:
        ok(f"{path}: schemaVersion {dash['schemaVersion']}, ${dsname} variable (prometheus), "
           f"{n_panels} panels, {len(rules)} queries on ${dsname}, unique panel ids")
    finish()


def metric_names(paths):
    used = {}
    for path in paths:
        exprs = []
        if path.endswith(".json"):
            try:
                dash = json.load(open(path))
            except ValueError as e:
                bad(f"{path}: not valid JSON: {e}")
                continue

            def walk(panels):
                for p in panels:
                    yield p
                    yield from walk(p.get("panels", []))
            for p in walk(dash.get("panels", [])):
                exprs += [t.get("expr", "") for t in p.get("targets", [])]
            for v in dash.get("templating", {}).get("list", []):
                q = v.get("query")
                q = q.get("query", "") if isinstance(q, dict) else (q or "")
                m = re.match(r"^\s*label_values\((.*),\s*[a-zA-Z_]\w*\s*\)\s*$", q, re.S)
                if m:
                    exprs.append(m.group(1))
            text = json.dumps(dash)
        else:
            docs = load_docs(path)
            for d in docs:
                groups = d.get("groups") or (d.get("spec") or {}).get("groups") or []
                exprs += [r["expr"] for g in groups for r in g.get("rules", [])]
            text = open(path).read()
        names = set()
        for e in exprs:
            names |= promql_metric_names(e)
        # Names mentioned anywhere else (descriptions, annotations).
        names |= set(re.findall(r"\btpns_cache_[a-z0-9_]+", text))
        used[path] = names
    for path, names in used.items():
        unknown = sorted(n for n in names if not known_metric(n))
        if unknown:
            bad(f"{path}: unknown metric names {unknown}")
        else:
            ok(f"{path}: all {len(names)} metric names exist ({', '.join(sorted(names))})")
    finish()


# --------------------------------------------------------------------------------------------
# smoke: start the real binary with the rendered configuration (secrets from temporary files,
# listeners on free loopback ports, the upstream on a closed loopback port) and check what the
# pod relies on: probes, metrics, the admin token, the proxy listener, JSON logs, SIGTERM drain.

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=5):
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def smoke(binary, toml_path, workdir):
    import signal
    import subprocess
    import time

    text = open(toml_path).read()
    secrets = os.path.join(workdir, "smoke-secrets")
    os.makedirs(secrets, exist_ok=True)
    token = "smoke-admin-token"
    with open(os.path.join(secrets, "secret_key"), "w") as f:
        f.write("smoke-secret-key\n")
    with open(os.path.join(secrets, "admin-token"), "w") as f:
        f.write(token + "\n")
    proxy_port, admin_port, dead_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TPNS_CACHE_") and k != "RUST_LOG"}
    env.update({
        "TPNS_CACHE_LISTEN": f"127.0.0.1:{proxy_port}",
        "TPNS_CACHE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "TPNS_CACHE_UPSTREAM__URL": f"http://127.0.0.1:{dead_port}",
        "TPNS_CACHE_AUTH__INJECT__SECRET_KEY_FILE": os.path.join(secrets, "secret_key"),
        "TPNS_CACHE_ADMIN__TOKEN_FILE": os.path.join(secrets, "admin-token"),
    })
    log_path = os.path.join(workdir, "smoke.log")

    def start(config):
        log = open(log_path, "w")
        return subprocess.Popen([binary, "serve", "--config", config], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(proc, seconds=15):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                if http("GET", f"http://127.0.0.1:{admin_port}/readyz", timeout=1)[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    proc = start(toml_path)
    ready = wait_ready(proc)
    if not ready and proc.poll() == 2:
        log = open(log_path).read()
        pending = [k for k in PENDING_KEYS if k in log and re.search(rf"^{k}\s*=", text, re.M)]
        if pending:
            print(f"WARN  smoke: this binary refuses {pending} (announced, not in it yet): "
                  "retrying without it")
            stripped = os.path.join(workdir, "smoke-tpns-cache.toml")
            with open(stripped, "w") as f:
                f.write("".join(l for l in text.splitlines(True)
                                if not any(re.match(rf"^{k}\s*=", l) for k in pending)))
            proc = start(stripped)
            ready = wait_ready(proc)
    try:
        if not ready:
            code = proc.poll()
            bad(f"smoke: {binary} did not become ready (exit code {code}); log: "
                + open(log_path).read()[-1500:])
            return
        ok(f"smoke: {binary} serves the rendered configuration; /readyz 200")
        status, _ = http("GET", f"http://127.0.0.1:{admin_port}/healthz")
        (ok if status == 200 else bad)(f"smoke: GET /healthz -> {status}")
        status, body = http("GET", f"http://127.0.0.1:{admin_port}/metrics")
        families = set(re.findall(r"^# TYPE (\S+) ", body, re.M))
        unknown = sorted(n for n in families if not known_family(n))
        if status == 200 and "tpns_cache_build_info" in families and not unknown:
            ok(f"smoke: GET /metrics -> 200, {len(families)} metric families, all in the known list")
        else:
            bad(f"smoke: GET /metrics -> {status}; families not in the known list: {unknown}")
        purge = json.dumps({"access_id": "smoke", "tokens": ["t"]}).encode()
        status, _ = http("POST", f"http://127.0.0.1:{admin_port}/purge", purge,
                         {"Content-Type": "application/json"})
        (ok if status in (401, 403) else bad)(f"smoke: POST /purge without the admin token -> {status}")
        status, _ = http("POST", f"http://127.0.0.1:{admin_port}/purge", purge,
                         {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        (ok if status == 200 else bad)(f"smoke: POST /purge with the token from token_file -> {status}")
        query = json.dumps({"operator_type": 1, "account_list": [{"account": "a"}]}).encode()
        status, body = http("POST", f"http://127.0.0.1:{proxy_port}/v3/device/account/query", query,
                            {"Content-Type": "application/json"})
        (ok if status in (502, 504) and "1008004" in body else bad)(
            f"smoke: proxy listener answers a query with the upstream down -> {status} {body[:80]}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=20)
                (ok if code == 0 else bad)(f"smoke: SIGTERM -> drained and exited with {code}")
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                bad("smoke: still running 20 s after SIGTERM; killed")
    lines = [l for l in open(log_path).read().splitlines() if l.strip()]
    try:
        for l in lines:
            json.loads(l)
        (ok if lines else bad)(f"smoke: {len(lines)} log lines, all JSON (log.format = \"json\")")
    except ValueError:
        bad(f"smoke: log line is not JSON: {l[:120]}")


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "render":
        render(*args)
    elif cmd == "compare":
        compare(*args)
    elif cmd == "k8s":
        k8s(args[0], args[1].split(","))
    elif cmd == "extract":
        extract(*args)
    elif cmd == "config-keys":
        config_keys(*args)
    elif cmd == "dashboard":
        dashboard(*args)
    elif cmd == "metric-names":
        metric_names(args)
    elif cmd == "smoke":
        smoke(*args)
    else:
        sys.exit(__doc__)
    finish()


if __name__ == "__main__":
    main(sys.argv)
