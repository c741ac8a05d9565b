#!/usr/bin/env python3
"""The project-specific checks of deploy/validate.sh: what no general tool knows.

Everything general is done by the real tools there (kubectl kustomize renders, kubernetes-validate
checks the schemas, `tpns-cache check-config` loads the configuration exactly as `serve` would,
promtool checks PromQL, rules, alert tests and the scrape, hadolint the Dockerfile). This script
only connects the pieces:

  materialize RENDERED WORK   lays out the files the sidecar would see (its ConfigMap and Secret
                              mounts) under WORK/root, writes the configuration with its paths
                              moved there (WORK/tpns-cache.toml), the sidecar's TPNS_CACHE_*
                              environment (WORK/sidecar.env, one NAME=value per line) and the
                              PrometheusRule's groups (WORK/tpns-cache-rules.yaml)
  pod RENDERED SUMMARY        cross-checks the pod against the effective settings that
                              `tpns-cache check-config --json` printed (SUMMARY): ports, probes,
                              the app's base URL, admin token, grace period, hardening, the
                              PodMonitor, alert annotations
  dashboard JSON OUT          checks the Grafana dashboard's wiring and writes its queries as a
                              rule file (OUT) for `promtool check rules` to parse

Exit status 1 when a check failed. Needs PyYAML (kubernetes-validate's venv has it).
"""

import base64
import json
import os
import sys

import yaml

FAILURES = []


def ok(msg):
    print(f"PASS  {msg}")


def bad(msg):
    print(f"FAIL  {msg}")
    FAILURES.append(msg)


def load(rendered):
    by_kind = {}
    with open(rendered) as f:
        for d in yaml.safe_load_all(f):
            if d:
                by_kind.setdefault(d["kind"], []).append(d)
    return by_kind


def one(by_kind, kind):
    found = by_kind.get(kind, [])
    if len(found) != 1:
        sys.exit(f"FAIL  expected exactly one {kind} in the rendered objects, found {len(found)}")
    return found[0]


def sidecar_of(by_kind):
    dep = one(by_kind, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    found = [c for c in pod.get("initContainers", []) if c.get("name") == "tpns-cache"]
    if len(found) != 1:
        sys.exit("FAIL  Deployment: no initContainer named tpns-cache")
    return dep, pod, found[0]


def materialize(rendered, work):
    by_kind = load(rendered)
    _, pod, sc = sidecar_of(by_kind)
    sources = {("configMap", d["metadata"]["name"]): d for d in by_kind.get("ConfigMap", [])}
    sources |= {("secret", d["metadata"]["name"]): d for d in by_kind.get("Secret", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    root = os.path.abspath(os.path.join(work, "root"))
    mounts = []
    for m in sc.get("volumeMounts", []):
        vol = volumes.get(m["name"], {})
        if "configMap" in vol:
            src = sources.get(("configMap", vol["configMap"]["name"]))
        elif "secret" in vol:
            src = sources.get(("secret", vol["secret"]["secretName"]))
        else:
            continue
        if src is None:
            bad(f"sidecar mount {m['mountPath']}: volume {m['name']} names an object that is not rendered")
            continue
        if src["kind"] == "Secret":  # data is base64, stringData plain text
            files = {k: base64.b64decode(v).decode() for k, v in (src.get("data") or {}).items()}
            files |= src.get("stringData") or {}
        else:  # a ConfigMap's data is plain text
            files = dict(src.get("data") or {})
        directory = root + m["mountPath"]
        os.makedirs(directory, exist_ok=True)
        for key, value in files.items():
            with open(os.path.join(directory, key), "w") as f:
                f.write(value)
        mounts.append((m["mountPath"].rstrip("/") + "/", directory.rstrip("/") + "/"))
    env = {e["name"]: e.get("value") for e in sc.get("env", []) if "value" in e}
    config_path = env.pop("TPNS_CACHE_CONFIG", None)
    if not config_path:
        bad("sidecar: TPNS_CACHE_CONFIG is not set")
        return
    local = next((config_path.replace(m, d, 1) for m, d in mounts if config_path.startswith(m)), None)
    if not local or not os.path.isfile(local):
        bad(f"sidecar: TPNS_CACHE_CONFIG={config_path} is not a file of a mounted ConfigMap")
        return
    text = open(local).read()
    for mount, directory in mounts:
        text = text.replace(f'"{mount}', f'"{directory}')
    with open(os.path.join(work, "tpns-cache.toml"), "w") as f:
        f.write(text)
    with open(os.path.join(work, "sidecar.env"), "w") as f:
        for name, value in env.items():
            if name.startswith("TPNS_CACHE_"):
                f.write(f"{name}={value}\n")
    ok(f"sidecar files laid out under {root} ({len(mounts)} mounts); configuration {config_path}")
    rules = by_kind.get("PrometheusRule", [])
    if rules:
        with open(os.path.join(work, "tpns-cache-rules.yaml"), "w") as f:
            yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}, f, sort_keys=False)


def pod_checks(rendered, summary_path):
    by_kind = load(rendered)
    dep, pod, sc = sidecar_of(by_kind)
    summary = json.load(open(summary_path))
    name = "sidecar tpns-cache"
    if sc.get("restartPolicy") == "Always":
        ok(f"{name} is a native sidecar (initContainer, restartPolicy: Always)")
    else:
        bad(f"{name}: restartPolicy must be Always (a native sidecar starts before the app)")

    listen, admin = summary["listen"], summary["admin_listen"]
    admin_port = int(admin.rsplit(":", 1)[1])
    if listen.startswith("127.0.0.1:"):
        ok(f"proxy listener {listen} is loopback only")
    else:
        bad(f"listen {listen} should be loopback in a sidecar")
    ports = {p.get("name"): p["containerPort"] for p in sc.get("ports", [])}
    if ports.get("tpns-admin") == admin_port and not admin.startswith("127."):
        ok(f"admin_listen {admin} is container port tpns-admin")
    else:
        bad(f"admin_listen {admin} must be reachable and equal container port tpns-admin ({ports})")
    base_urls = [e.get("value") for c in pod.get("containers", []) for e in c.get("env", [])
                 if e["name"] == "TPNS_BASE_URL"]
    want = f"http://127.0.0.1:{listen.rsplit(':', 1)[1]}"
    if base_urls and all(u.rstrip("/") == want for u in base_urls):
        ok(f"app: TPNS_BASE_URL={want} points at the sidecar")
    else:
        bad(f"app: TPNS_BASE_URL {base_urls} should be {want}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/readyz")):
        get = (sc.get(probe) or {}).get("httpGet") or {}
        port = ports.get(get.get("port"), get.get("port"))
        if get.get("path") == path and port == admin_port:
            ok(f"{name}: {probe} GET {path} on the admin port {admin_port}")
        else:
            bad(f"{name}: {probe} must be GET {path} on the admin port {admin_port}, is {get}")
    if summary["admin_token"] or admin.startswith("127."):
        ok("admin token configured (POST /purge on a reachable admin port needs one)")
    else:
        bad("admin_listen is not loopback: set [admin] token_file (or token_env)")

    grace = summary["shutdown_grace_seconds"]
    period = pod.get("terminationGracePeriodSeconds", 30)
    if period > grace:
        ok(f"terminationGracePeriodSeconds {period} exceeds shutdown_grace {grace:g}s")
    else:
        bad(f"terminationGracePeriodSeconds {period} must exceed shutdown_grace {grace:g}s")

    # The Secret's files must be readable by the sidecar's user (check-config read them as us).
    secret_names = {d["metadata"]["name"] for d in by_kind.get("Secret", [])}
    sctx = sc.get("securityContext") or {}
    pod_sctx = pod.get("securityContext") or {}
    for v in pod.get("volumes", []):
        if (v.get("secret") or {}).get("secretName") in secret_names:
            mode = v["secret"].get("defaultMode", 0o644)
            readable = mode & 0o004 or (mode & 0o040 and pod_sctx.get("fsGroup") is not None
                                        and pod_sctx.get("fsGroup") == sctx.get("runAsGroup"))
            (ok if readable else bad)(
                f"{name}: Secret volume {v['name']} mode {oct(mode)}, fsGroup "
                f"{pod_sctx.get('fsGroup')}, runAsGroup {sctx.get('runAsGroup')}: "
                + ("readable" if readable else "not readable by the sidecar"))
    hardened = ((sctx.get("runAsNonRoot") or pod_sctx.get("runAsNonRoot")) is True
                and sctx.get("readOnlyRootFilesystem") is True
                and sctx.get("allowPrivilegeEscalation") is False
                and "ALL" in ((sctx.get("capabilities") or {}).get("drop") or []))
    (ok if hardened else bad)(
        f"{name}: non-root, read-only root filesystem, no privilege escalation, drops ALL")
    res = sc.get("resources") or {}
    limit = (res.get("limits") or {}).get("memory")
    if (res.get("requests") or {}).get("cpu") and (res.get("requests") or {}).get("memory") and limit:
        ok(f"{name}: requests {res['requests']}, memory limit {limit}, "
           f"cache.max_bytes {summary['cache_max_bytes']} B")
    else:
        bad(f"{name}: needs cpu and memory requests and a memory limit")

    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    for pm in by_kind.get("PodMonitor", []):
        sel = (pm["spec"].get("selector") or {}).get("matchLabels") or {}
        eps = pm["spec"].get("podMetricsEndpoints") or []
        (ok if sel and all(labels.get(k) == v for k, v in sel.items()) else bad)(
            f"PodMonitor/{pm['metadata']['name']}: selector {sel} vs pod labels {labels}")
        (ok if eps and all(ports.get(e.get("port")) == admin_port
                           and e.get("path", "/metrics") == "/metrics" for e in eps) else bad)(
            f"PodMonitor/{pm['metadata']['name']}: scrapes /metrics on the admin port")
    for pr in by_kind.get("PrometheusRule", []):
        alerts = [r for g in pr["spec"].get("groups", []) for r in g.get("rules", []) if "alert" in r]
        for r in alerts:
            missing = [k for k in ("summary", "description") if not (r.get("annotations") or {}).get(k)]
            if not (r.get("labels") or {}).get("severity"):
                missing.append("labels.severity")
            if missing:
                bad(f"alert {r['alert']}: missing {missing}")
        ok(f"PrometheusRule/{pr['metadata']['name']}: {len(alerts)} alerts checked for "
           "severity, summary and description")


def dashboard(path, out):
    dash = json.load(open(path))
    variables = dash.get("templating", {}).get("list", [])
    dsvars = [v["name"] for v in variables if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    if len(dsvars) != 1:
        bad(f"{path}: needs one datasource variable of type prometheus")
        return
    wanted = (f"${dsvars[0]}", f"${{{dsvars[0]}}}")

    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    ids, rules, panels = set(), [], 0
    for p in walk(dash.get("panels", [])):
        panels += 1
        if p.get("id") in ids:
            bad(f"{path}: panel id {p.get('id')} used twice")
        ids.add(p.get("id"))
        if p.get("type") == "row":
            continue
        if not p.get("targets"):
            bad(f"{path}: panel {p.get('title')!r} has no query")
        for t in p.get("targets", []):
            ds = t.get("datasource") or p.get("datasource") or {}
            if ds.get("uid") not in wanted:
                bad(f"{path}: panel {p.get('title')!r} query {t.get('refId')} is not on {wanted[0]}")
            # Grafana's own variables are not PromQL: give them the values Grafana would.
            expr = (t.get("expr", "").replace("$__rate_interval", "5m")
                    .replace("$__interval", "1m").replace("$__range", "1h"))
            rules.append({"record": f"dashboard:panel_{p.get('id')}:{t.get('refId', 'A')}", "expr": expr})
    with open(out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False, width=1000)
    ok(f"{path}: {panels} panels, {len(rules)} queries, all on {wanted[0]}, unique ids")


if __name__ == "__main__":
    commands = {"materialize": materialize, "pod": pod_checks, "dashboard": dashboard}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
    sys.exit(1 if FAILURES else 0)
