"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const int = (v) => String(Math.round(v));
  const pct = (v) => (v === null || v === undefined) ? "–" : (v * 100).toFixed(1) + "%";
  const bytes = (v) => {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? int(v) : v.toFixed(1)) + " " + units[i];
  };
  const duration = (s) => {
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m + "m " + Math.floor(s % 60) + "s";
  };
  const set = (id, text) => { $(id).textContent = text; };
  const counts = (obj) => {
    const parts = Object.keys(obj).filter((k) => obj[k] > 0).map((k) => k + " " + int(obj[k]));
    return parts.length ? parts.join(", ") : "none";
  };
  const svgNS = "http://www.w3.org/2000/svg";

  function sparkline(points) {
    const svg = $("sparkline");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    for (const y of [0, 30, 60]) {
      const l = document.createElementNS(svgNS, "line");
      l.setAttribute("x1", "0"); l.setAttribute("x2", "300");
      l.setAttribute("y1", String(y)); l.setAttribute("y2", String(y));
      svg.appendChild(l);
    }
    const known = points.filter((p) => p.ratio !== null);
    if (known.length < 1) return;
    const t0 = points[0].at, t1 = points[points.length - 1].at;
    const span = Math.max(t1 - t0, 1);
    const xy = known.map((p) => [(p.at - t0) / span * 300, (1 - p.ratio) * 58 + 1]);
    if (xy.length === 1) xy.unshift([Math.max(xy[0][0] - 6, 0), xy[0][1]]);
    const line = document.createElementNS(svgNS, "polyline");
    line.setAttribute("points", xy.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" "));
    svg.appendChild(line);
  }

  function render(s) {
    set("version", s.version);
    set("uptime", duration(s.uptime_seconds));
    set("upstream-url", s.upstream_url);
    set("hit-ratio-now", s.hit_ratio.now === null ? "idle" : pct(s.hit_ratio.now));
    set("hit-ratio-total", pct(s.hit_ratio.total));
    sparkline(s.hit_ratio.history);
    set("ids-asked", int(s.identifiers.asked));
    set("ids-cache", int(s.identifiers.from_cache));
    set("ids-upstream", int(s.identifiers.sent_upstream));
    set("ids-saved", int(s.identifiers.saved));
    set("req-queries", int(s.requests.queries));
    set("upstream-calls", int(s.requests.upstream_calls));
    set("calls-saved", int(s.requests.upstream_calls_saved));
    set("quota-now", s.quota.calls_per_second_now.toFixed(2));
    set("quota-limit", int(s.quota.calls_per_second_limit));
    const use = s.quota.calls_per_second_now / Math.max(s.quota.calls_per_second_limit, 1);
    $("quota-bar").style.width = Math.min(use * 100, 100).toFixed(1) + "%";
    $("quota-bar").className = use > 0.8 ? "hot" : "";
    set("limiter-waits", int(s.quota.limiter_waits));
    set("limiter-wait-seconds", s.quota.limiter_wait_seconds.toFixed(3) + " s");
    set("refusals", counts(s.quota.refusals));
    set("cooldowns", int(s.quota.refusals.cooldown || 0));
    set("breaker", s.quota.breaker + (s.quota.breaker_opens ? " (opened " + int(s.quota.breaker_opens) + "×)" : ""));
    $("breaker").className = s.quota.breaker === "closed" ? "ok" : "bad";
    set("outcomes", counts(s.upstream_outcomes));
    set("cache-bytes", bytes(s.cache.bytes));
    set("cache-max", bytes(s.cache.max_bytes));
    const fill = s.cache.bytes / Math.max(s.cache.max_bytes, 1);
    $("cache-bar").style.width = Math.min(fill * 100, 100).toFixed(1) + "%";
    set("cache-entries", int(s.cache.entries));
    set("evictions", counts(s.cache.evictions));
    set("memo-hits", int(s.requests.memo_hits));
    set("stale-served", int(s.cache.stale_served));
    $("fleet").hidden = !s.fleet;
    if (s.fleet) {
      set("redis-up", s.fleet.redis_up ? "up" : "down: serving alone");
      $("redis-up").className = s.fleet.redis_up ? "ok" : "bad";
      set("shared-hits", int(s.fleet.shared_hits));
      set("fallbacks", int(s.fleet.fallbacks));
      set("redis-errors", int(s.fleet.redis_errors));
    }
    const table = $("config");
    if (!table.rows.length) {
      for (const key of Object.keys(s.config)) {
        const row = table.insertRow();
        const th = document.createElement("th");
        th.textContent = key;
        row.appendChild(th);
        row.insertCell().textContent = JSON.stringify(s.config[key]);
      }
    }
  }

  async function refresh() {
    try {
      const r = await fetch("status.json", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      render(await r.json());
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes) + 1);
      set("state", "updated " + new Date().toLocaleTimeString());
      $("state").className = "meta";
    } catch (e) {
      set("state", "cannot reach the admin listener: " + e.message);
      $("state").className = "meta bad";
    }
  }
  refresh();
  setInterval(refresh, 2000);
})();
