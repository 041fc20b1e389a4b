// Balancer dashboard: one EventSource, plain DOM, a hand-drawn canvas chart.
"use strict";

const COLORS = ["#2d6cdf", "#1f9d55", "#e8833a", "#7b5cc4", "#d64545", "#17a2b8",
  "#b8a14a", "#e05fa8", "#5b6b82", "#8bc34a"];
const HISTORY_SECONDS = 600;  // what the balancer keeps (/api/history)
const CERT_WARN_DAYS = 14;
let chartSeconds = 120;        // the chart's window: 2 or 10 minutes
const LATENCY_WINDOW = 10;
const SMOOTH = 3;  // chart steps averaged per point
// Every kind the balancer emits (balancer/events.py EventKind), and its colour; "" is plain.
const EVENT_CLASS = {
  ejected: "bad", down: "bad", "reload-refused": "bad", "pool-mode": "bad",
  up: "good", recovered: "good", enable: "admin", drain: "admin", maint: "admin",
  weight: "admin", algorithm: "admin", reload: "admin", role: "admin",
  added: "", draining: "", removed: "", rescued: "", discovery: "", shutdown: "", worker: "",
};

const $ = (id) => document.getElementById(id);
const colorOf = {};
let state = null;
let samples = [];          // [{t, reqs: {id: n}, buckets: {id: [...]}}], newest last
let share = [];            // [{t, parts: {id: requests in that step}}] for the chart
let shareBase = null;      // {t, reqs}: the counters the next chart step starts from
let events = [];           // newest first, as in the state
let algorithmsFilled = false;

function color(id) {
  if (!(id in colorOf)) colorOf[id] = COLORS[Object.keys(colorOf).length % COLORS.length];
  return colorOf[id];
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function fmt(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return String(Math.round(n * 10) / 10);
}

function duration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  return `${m}m ${s % 60}s`;
}

function toast(msg, bad) {
  const t = $("toast");
  t.textContent = msg;
  t.className = "toast show" + (bad ? " bad" : "");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.className = "toast"; }, 3000);
}

// ---- numbers derived from successive states -------------------------------------------
function sampleAt(ageSeconds) {
  // the newest sample at least ageSeconds older than the latest (or the oldest one we have)
  const last = samples[samples.length - 1];
  for (let i = samples.length - 2; i >= 0; i--) {
    if (last.t - samples[i].t >= ageSeconds) return samples[i];
  }
  return samples.length > 1 ? samples[0] : null;
}

function rate(id) {
  const last = samples[samples.length - 1], prev = sampleAt(2);
  if (!prev || !(id in prev.reqs) || last.t <= prev.t) return null;
  return Math.max(0, last.reqs[id] - prev.reqs[id]) / (last.t - prev.t);
}

function percentile(id, q) {
  const last = samples[samples.length - 1], prev = sampleAt(LATENCY_WINDOW);
  const bounds = state.latency_bounds || [];
  const now = last.buckets[id];
  const before = prev && prev.buckets[id] ? prev.buckets[id] : now.map(() => 0);
  const delta = now.map((n, i) => Math.max(0, n - (before[i] || 0)));
  const total = delta.reduce((a, b) => a + b, 0);
  if (!total) return null;
  let rank = q * total, lower = 0;
  for (let i = 0; i < delta.length; i++) {
    const upper = i < bounds.length ? bounds[i] : lower * 2;
    if (rank <= delta[i]) return 1000 * (lower + (upper - lower) * (rank / delta[i]));
    rank -= delta[i];
    lower = upper;
  }
  return 1000 * lower;
}

function addShare(t, reqs) {
  // one chart step from the previous counters to these; a step back in time is ignored
  if (shareBase && t > shareBase.t) {
    const parts = {};
    for (const id in reqs) parts[id] = Math.max(0, reqs[id] - (shareBase.reqs[id] || 0));
    share.push({ t, parts });
    while (share.length && t - share[0].t > HISTORY_SECONDS) share.shift();
  }
  if (!shareBase || t > shareBase.t) shareBase = { t, reqs };
}

function record(s) {
  const reqs = {}, buckets = {};
  for (const b of s.backends) { reqs[b.id] = b.requests; buckets[b.id] = b.latency_buckets; }
  samples.push({ t: s.now, reqs, buckets });
  while (samples.length > 2 && samples[samples.length - 1].t - samples[1].t > LATENCY_WINDOW + 2) {
    samples.shift();
  }
  addShare(s.now, reqs);
}

async function loadHistory() {
  // the balancer's last 10 minutes, so a new page does not start with an empty chart
  try {
    const r = await fetch("/api/history");
    if (!r.ok) return;
    const h = await r.json();
    for (const p of h.samples || []) addShare(p.t, p.requests);
    const served = share.reduce((n, p) => n + Object.values(p.parts).reduce((a, b) => a + b, 0), 0);
    $("chart").dataset.historySteps = String(share.length);
    $("chart").dataset.historyRequests = String(served);
  } catch (err) {
    console.warn("history unavailable:", err);
  }
}

// ---- rendering ---------------------------------------------------------------------------
function renderHeader(s) {
  const role = $("role");
  role.textContent = s.role;
  role.className = "badge role " + s.role;
  const d = s.role_detail || {};
  const detail = Object.entries(d).filter(([, v]) => v !== null && typeof v !== "object")
    .map(([k, v]) => `${k.replace(/_/g, " ")} ${v}`);
  role.title = detail.join("\n") || s.role;
  $("role-detail").textContent = detail.slice(0, 3).join(" · ");
  const mode = $("mode");
  mode.textContent = s.mode === "normal" ? "cluster normal" : s.mode;
  mode.className = "badge mode " + s.mode;
  const l = s.listener || {};
  $("listener").textContent = `${l.tls ? "https" : "http"}://${l.bound || l.configured}` +
    `  ·  up ${duration(s.uptime_s)}`;
  const sel = $("algorithm");
  if (!algorithmsFilled) {
    for (const a of s.algorithms) sel.append(el("option", { value: a, text: a }));
    algorithmsFilled = true;
  }
  if (document.activeElement !== sel) sel.value = s.algorithm;
}

function renderCards(s) {
  const total = s.backends.reduce((a, b) => a + (rate(b.id) || 0), 0);
  const up = s.backends.filter((b) => b.state === "up").length;
  const st = s.stats;
  const cards = [
    ["requests/s", fmt(total)],
    ["requests", fmt(st.requests_total)],
    ["backends up", `${up} / ${s.backends.length}`, up < s.backends.length],
    ["connections open", fmt(st.connections_open)],
    ["connections", fmt(st.connections_total)],
    ["TLS handshakes", fmt(st.tls_handshakes)],
    ["HTTP/1.1 / HTTP/2 connections",
      `${fmt(st.connections_total - st.h2_connections_total)} / ${fmt(st.h2_connections_total)}`],
    ["HTTP/2 streams open", fmt(st.h2_streams_open)],
    ["streams per HTTP/2 connection",
      st.h2_connections_total ? (st.h2_streams_total / st.h2_connections_total).toFixed(1) : "-"],
    ["bad requests", fmt(st.bad_requests), st.bad_requests > 0],
    ["overload / timeouts", `${fmt(st.overload_rejections)} / ${fmt(st.timeouts)}`],
  ];
  const rb = s.retry_budget;  // absent from an older balancer's state
  if (rb) cards.push(["retries allowed / refused", `${fmt(rb.allowed)} / ${fmt(rb.refused)}`,
    rb.refused > 0]);
  $("cards").replaceChildren(...cards.map(([k, v, warn]) =>
    el("div", { class: "card" + (warn ? " warn" : ""), "data-testid": "card-" + k },
      el("div", { class: "k", text: k }), el("div", { class: "v", text: v }))));
}

function actionButton(b, action, label, primary) {
  const btn = el("button", { type: "button", "data-action": action, text: label });
  if (primary) btn.className = "primary";
  btn.addEventListener("click", () => mutate("POST",
    `/api/backends/${encodeURIComponent(b.id)}/${action}`, null, `${label} ${b.id}`));
  return btn;
}

function renderBackends(s) {
  const rows = s.backends.map((b) => {
    const errors = b.errors.connect + b.errors.response;
    const p50 = percentile(b.id, 0.5), p99 = percentile(b.id, 0.99);
    const check = b.last_check || {};
    const checkText = check.ok === null ? "pending" :
      `${check.ok ? "ok" : "failed"} ${check.duration_ms} ms${check.detail ? " · " + check.detail : ""}`;
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = color(b.id);
    const tags = [b.backup ? "backup" : null, b.discovered ? "discovered" : null].filter(Boolean);
    const buttons = el("td", { class: "num" });
    if (b.admin_state === "enabled") {
      buttons.append(actionButton(b, "drain", "drain"), actionButton(b, "maint", "maint"));
    } else {
      buttons.append(actionButton(b, "enable", "enable", true));
    }
    return el("tr", { "data-backend": b.id, "data-state": b.state, "data-testid": "backend-row" },
      el("td", { class: "id" }, swatch, b.name || b.id,
        b.address && b.address !== (b.name || b.id) ?
          el("span", { class: "addr", "data-testid": "address", text: b.address }) : null,
        tags.length ? el("span", { class: "tag", text: tags.join(", ") }) : null),
      el("td", {}, el("span", { class: "pill " + b.state, "data-testid": "state", text: b.state })),
      el("td", { class: "num", text: b.weight === b.effective_weight ? fmt(b.weight) :
        `${fmt(b.effective_weight)} → ${fmt(b.weight)}` }),
      el("td", { class: "num", text: fmt(b.in_flight) }),
      el("td", { class: "num", text: fmt(rate(b.id)) }),
      el("td", { class: "num", text: fmt(b.requests) }),
      el("td", { class: "num", text: p50 === null ? "–" : p50.toFixed(1) }),
      el("td", { class: "num", text: p99 === null ? "–" : p99.toFixed(1) }),
      el("td", { class: "num" + (errors ? " err" : ""), text: fmt(errors),
        title: `connect ${b.errors.connect}, response ${b.errors.response}, ` +
          `retries ${b.retries}, ejections ${b.ejections}` }),
      el("td", { class: "check" + (check.ok === false ? " bad" : ""), text: checkText,
        title: checkText }),
      buttons);
  });
  const body = $("backends").tBodies[0];
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "11", class: "empty",
    text: "no backends" })));
  body.replaceChildren(...rows);
}

function renderChart(s) {
  const canvas = $("chart");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); }
  if (canvas.height !== Math.round(h * dpr)) { canvas.height = Math.round(h * dpr); }
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const left = 36, right = 8, top = 8, bottom = 20;
  const pw = w - left - right, ph = h - top - bottom;
  const x = (t) => left + pw * (1 - (s.now - t) / chartSeconds);
  const y = (f) => top + ph * (1 - f);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#6b7585";
  g.strokeStyle = "#e3e7ee";
  g.lineWidth = 1;
  for (const f of [0, 0.25, 0.5, 0.75, 1]) {
    g.beginPath(); g.moveTo(left, y(f) + 0.5); g.lineTo(left + pw, y(f) + 0.5); g.stroke();
    g.textAlign = "right"; g.fillText(`${f * 100}%`, left - 4, y(f) + 4);
  }
  g.textAlign = "center";
  for (const f of [1, 0.75, 0.5, 0.25, 0]) {
    const ago = chartSeconds * f;
    const label = ago >= 120 && ago % 60 === 0 ? `-${ago / 60}m` : `-${ago}s`;
    g.fillText(ago ? label : "now", Math.min(x(s.now - ago), left + pw - 10), h - 4);
  }
  const ids = s.backends.map((b) => b.id);
  // shares smoothed over a few steps, as runs of points with traffic (gaps stay empty)
  const runs = [];
  let run = null;
  const first = share.findIndex((p) => s.now - p.t <= chartSeconds + 1);
  for (let i = Math.max(0, first); first >= 0 && i < share.length; i++) {
    const sums = {};
    let total = 0;
    for (let j = Math.max(0, i - SMOOTH + 1); j <= i; j++) {
      for (const id of ids) {
        const n = share[j].parts[id] || 0;
        sums[id] = (sums[id] || 0) + n;
        total += n;
      }
    }
    if (!total) { run = null; continue; }
    if (!run) {
      run = [];
      runs.push(run);
      // a run starts where its first step started, so a lone point still has a width
      run.push({ t: i ? share[i - 1].t : share[i].t - 1, sums, total });
    }
    run.push({ t: share[i].t, sums, total });
  }
  for (const r of runs) {
    const lower = r.map(() => 0);
    for (const id of ids) {
      const upper = r.map((p, k) => lower[k] + (p.sums[id] || 0) / p.total);
      g.beginPath();
      r.forEach((p, k) => g.lineTo(Math.max(left, x(p.t)), y(upper[k])));
      for (let k = r.length - 1; k >= 0; k--) g.lineTo(Math.max(left, x(r[k].t)), y(lower[k]));
      g.closePath();
      g.globalAlpha = 0.8;
      g.fillStyle = color(id);
      g.fill();
      g.globalAlpha = 1;
      g.strokeStyle = "#ffffff";
      g.beginPath();
      r.forEach((p, k) => g.lineTo(Math.max(left, x(p.t)), y(upper[k])));
      g.stroke();
      upper.forEach((u, k) => { lower[k] = u; });
    }
  }
  if (!share.some((p) => ids.some((id) => p.parts[id]))) {
    g.fillStyle = "#6b7585"; g.textAlign = "center";
    g.fillText("no traffic yet", left + pw / 2, top + ph / 2);
  }
  $("legend").replaceChildren(...ids.map((id) => {
    const span = el("span", { text: id });
    span.style.setProperty("--c", color(id));
    return span;
  }));
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds < 10 ? `${seconds.toFixed(1)} s ago` : `${duration(seconds)} ago`;
}

function kv(rows) {
  return rows.map(([k, v, cls, testid]) => el("div", { class: "kv" },
    el("span", { class: "k", text: k }),
    el("span", { class: "v" + (cls ? " " + cls : ""), text: v,
      "data-testid": testid || "pair-" + k.replace(/ /g, "-") })));
}

function renderPair(s) {
  const d = s.role_detail || {};
  const box = $("pair");
  if (s.role === "standalone" || !d.node) {
    box.replaceChildren(el("div", { class: "empty", text: "standalone: no pair configured" }));
    return;
  }
  const peer = d.peer;
  const self = el("div", { class: "pairside", "data-testid": "pair-self" },
    el("h3", { text: "this balancer" }),
    ...kv([
      ["address", d.node, "mono", "pair-self-address"],
      ["role", s.role, "role-text " + s.role, "pair-self-role"],
      ["priority", d.effective_priority === d.priority ? String(d.priority) :
        `${d.effective_priority} (configured ${d.priority})`, "", "pair-self-priority"],
      ["last change", d.last_transition ?
        `${d.last_transition.to} ${ago(d.last_transition.ago_s)}: ${d.last_transition.reason}` :
        "none", "", "pair-self-change"],
    ]));
  const peerRole = !peer ? "never heard" : peer.role;
  const other = el("div", { class: "pairside" + (peer && !peer.reachable ? " down" : ""),
    "data-testid": "pair-peer" },
    el("h3", { text: "peer" }),
    ...kv([
      ["address", peer ? peer.node : (d.peer_address || "–"), "mono", "pair-peer-address"],
      ["role", peerRole, "role-text " + peerRole.replace(/ /g, "-"), "pair-peer-role"],
      ["priority", peer ? String(peer.priority) : "–", "", "pair-peer-priority"],
      ["last advert", peer ? ago(peer.last_seen_ago_s) : "none received",
        peer && !peer.reachable ? "crit" : "", "pair-peer-advert"],
      ["backends up", peer ? String(peer.healthy_backends) : "–", "", "pair-peer-backends"],
    ]));
  box.replaceChildren(self, other);
}

function renderCerts(s) {
  const certs = s.certificates || [];
  const rows = certs.map((c) => {
    const left = (Date.parse(c.not_after) - s.now * 1000) / 86400000;
    const status = left < 0 ? "expired" : left < CERT_WARN_DAYS ? "expires soon" : "valid";
    const cls = left < 0 ? "crit" : left < CERT_WARN_DAYS ? "soon" : "";
    const days = left < 0 ? `expired ${Math.ceil(-left)} d ago` : `${Math.floor(left)} d left`;
    return el("tr", { "data-testid": "cert-row", "data-status": status },
      el("td", { class: "mono" }, c.names.join(", "),
        c.default ? el("span", { class: "tag", text: "default" }) : null),
      el("td", { text: c.issuer || "–", "data-testid": "cert-issuer" }),
      el("td", { class: cls, "data-testid": "cert-expiry" },
        new Date(c.not_after).toISOString().slice(0, 10) + " · " + days),
      el("td", { class: "mono fp", text: c.sha256 || "–", title: "SHA-256 " + (c.sha256 || ""),
        "data-testid": "cert-fingerprint" }));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "4", class: "empty",
    text: s.listener && s.listener.tls ? "no certificate loaded" : "plain HTTP: no TLS" })));
  $("certs").tBodies[0].replaceChildren(...rows);
}

function renderWorkers(s) {
  const workers = s.workers || [];
  $("workers-panel").hidden = !workers.length;  // one process: nothing to show
  const rows = workers.map((w) => el("tr", { "data-testid": "worker-row" },
    el("td", { text: String(w.index) }),
    el("td", { class: w.alive ? "mono" : "mono crit", text: w.alive ? String(w.pid) : "restarting" }),
    el("td", { text: String(w.requests) }),
    el("td", { text: String(w.connections_open) }),
    el("td", { text: w.cpu_seconds.toFixed(1) }),
    el("td", { text: (w.rss_bytes / 1048576).toFixed(1) }),
    el("td", { class: w.restarts ? "soon" : "", text: String(w.restarts) })));
  $("workers").tBodies[0].replaceChildren(...rows);
}

function eventClass(e) {
  if (e.kind === "pool-mode") return /normal$/.test(e.detail) ? "good" : "bad";
  return EVENT_CLASS[e.kind] || "";
}

function renderEvents() {
  const items = events.slice(0, 100).map((e) => {
    const t = new Date(e.ts * 1000).toLocaleTimeString([], { hour12: false });
    return el("li", { "data-testid": "event", "data-kind": e.kind, "data-backend": e.backend },
      el("span", { class: "t", text: t }),
      el("span", { class: "kind " + eventClass(e), text: e.kind }),
      el("span", { class: "what" }, e.backend ? el("b", { text: e.backend }) : null,
        e.backend && e.detail ? " · " : "", e.detail || ""));
  });
  if (!items.length) items.push(el("li", { class: "empty", text: "no events yet" }));
  $("timeline").replaceChildren(...items);
}

function render(s) {
  state = s;
  record(s);
  renderHeader(s);
  renderCards(s);
  renderBackends(s);
  renderChart(s);
  renderPair(s);
  renderCerts(s);
  renderWorkers(s);
}

// ---- mutations ---------------------------------------------------------------------------
async function mutate(method, url, body, what) {
  const headers = { "Content-Type": "application/json" };
  const token = localStorage.getItem("lb-admin-token");
  if (token) headers.Authorization = "Bearer " + token;
  try {
    const r = await fetch(url, { method, headers, body: body ? JSON.stringify(body) : null });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      toast(`${what}: ${data.error || r.status}`, true);
      if (r.status === 401) $("token").focus();
      return false;
    }
    toast(`${what}: done`);
    return true;
  } catch (err) {
    toast(`${what}: ${err}`, true);
    return false;
  }
}

// ---- wiring ------------------------------------------------------------------------------
function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => {
    $("live").className = "live"; $("live").textContent = "live";
  });
  source.addEventListener("error", () => {
    $("live").className = "live off"; $("live").textContent = "reconnecting";
  });
  source.addEventListener("state", (m) => {
    const s = JSON.parse(m.data);
    events = s.events || [];
    render(s);
    renderEvents();
  });
  source.addEventListener("event", (m) => {
    const e = JSON.parse(m.data);
    if (!events.some((x) => x.ts === e.ts && x.kind === e.kind && x.backend === e.backend)) {
      events.unshift(e);
      renderEvents();
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const token = $("token");
  token.value = localStorage.getItem("lb-admin-token") || "";
  token.addEventListener("change", () => {
    if (token.value) localStorage.setItem("lb-admin-token", token.value.trim());
    else localStorage.removeItem("lb-admin-token");
  });
  const sel = $("algorithm");
  sel.addEventListener("change", async () => {
    const ok = await mutate("PUT", "/api/algorithm", { algorithm: sel.value },
      `algorithm ${sel.value}`);
    if (!ok && state) sel.value = state.algorithm;
    sel.blur();
  });
  const win = $("window");
  win.addEventListener("change", () => {
    chartSeconds = Number(win.value);
    $("chart").dataset.window = win.value;
    if (state) renderChart(state);
  });
  window.addEventListener("resize", () => { if (state) renderChart(state); });
  loadHistory().then(connect);
});
