// The Connections view: /api/connections once a second and /api/tcp every two while the
// tab is open (TCP_INFO is read only when someone looks). Uses el, fmt, color, $ of app.js.
"use strict";

const LAB_POINTS = 120;  // chart points kept (two minutes at 1 s)
const COLUMNS = [  // [key, header, numeric]
  ["id", "id", true], ["side", "side", false], ["backend", "backend", false],
  ["peer", "peer", false], ["age_s", "age s", true], ["state", "state", false],
  ["rtt_ms", "rtt ms", true], ["rttvar_ms", "rttvar", true], ["cwnd", "cwnd", true],
  ["ssthresh", "ssthresh", true], ["total_retrans", "retrans", true], ["lost", "lost", true],
  ["unacked", "unacked", true], ["snd_wnd", "peer wnd", true], ["rcv_wnd", "our wnd", true],
  ["delivery_rate_bps", "rate bps", true], ["bytes_sent", "sent", true],
  ["bytes_received", "received", true], ["idle_ms", "idle ms", true],
  ["congestion", "cc", false], ["tls", "tls", false],
  ["pid", "pid", false],  // the process that holds it (a worker with --workers N); as is, not 26.4k
];
const lab = {
  timer: null, tcpTimer: null, rows: [], sortKey: "id", asc: true, picked: null,
  series: [],  // [{t, rtt: {backend: ms}, cwnd: {backend: n}, retrans: {backend: n}}]
};

function cell(row, key) {
  if (key === "tls") return row.tls ? `${row.tls.version}${row.tls.resumed ? " resumed" : ""}` : "";
  return row[key];
}

function num(v) {  // small RTTs stay readable: 0.034, not 0
  if (typeof v === "number" && v !== 0 && Math.abs(v) < 10 && !Number.isInteger(v)) {
    return String(Number(v.toPrecision(2)));
  }
  return fmt(v);
}

function median(xs) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)];
}

function renderConnTable() {
  const head = document.querySelector("#conns thead tr");
  if (!head.children.length) {
    for (const [key, label] of COLUMNS) {
      const th = el("th", { text: label, "data-sort": key });
      th.addEventListener("click", () => {
        lab.asc = lab.sortKey === key ? !lab.asc : true;
        lab.sortKey = key;
        renderConnTable();
      });
      head.append(th);
    }
  }
  for (const th of head.children) {
    th.classList.toggle("sorted", th.dataset.sort === lab.sortKey);
    th.classList.toggle("asc", th.dataset.sort === lab.sortKey && lab.asc);
  }
  const numeric = Object.fromEntries(COLUMNS.map(([k, , n]) => [k, n]));
  const key = lab.sortKey, dir = lab.asc ? 1 : -1;
  const rows = [...lab.rows].sort((a, b) => {
    const x = cell(a, key), y = cell(b, key);
    if (x === y) return a.id - b.id;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (numeric[key] ? x - y : String(x).localeCompare(String(y))) * dir;
  });
  const body = document.querySelector("#conns tbody");
  body.replaceChildren(...rows.map((r) => {
    const tr = el("tr", { "data-conn": r.id, "data-side": r.side });
    if (r.id === lab.picked) tr.classList.add("picked");
    for (const [k, , n] of COLUMNS) {
      const v = cell(r, k);
      tr.append(el("td", { class: n ? "num" : "", text: n ? num(v) : (v ?? "") }));
    }
    tr.addEventListener("click", () => pick(r.id));
    return tr;
  }));
}

function kvList(pairs) {
  return el("div", {}, ...pairs.map(([k, v]) => el("div", { class: "kv" },
    el("span", { class: "k", text: k }),
    el("span", { class: "v", text: v === null || v === undefined ? "–" : String(v),
      "data-testid": "d-" + k.replace(/[^a-z0-9]+/gi, "-") }))));
}

function lineChart(canvas, lines, yLabel) {
  // lines: [{color, points: [[t, v], ...]}]; a shared time axis
  const ctx = canvas.getContext("2d");
  const w = canvas.width = canvas.clientWidth || canvas.width;
  const h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const all = lines.flatMap((l) => l.points).filter((p) => p[1] !== null);
  if (!all.length) return;
  const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  const ymax = Math.max(...all.map((p) => p[1])) * 1.15 || 1;
  const x = (t) => 40 + (w - 50) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1);
  const y = (v) => h - 18 - (h - 28) * (v / ymax);
  ctx.strokeStyle = "#e3e7ee";
  ctx.fillStyle = "#6b7585";
  ctx.font = "11px system-ui";
  for (const f of [0, 0.5, 1]) {
    ctx.beginPath(); ctx.moveTo(40, y(ymax * f / 1.15)); ctx.lineTo(w - 10, y(ymax * f / 1.15));
    ctx.stroke();
    ctx.fillText(fmt(ymax * f / 1.15), 2, y(ymax * f / 1.15) + 4);
  }
  if (yLabel) ctx.fillText(yLabel, 40, h - 4);
  for (const l of lines) {
    ctx.strokeStyle = l.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    for (const [t, v] of l.points) {
      if (v === null) { started = false; continue; }
      if (started) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      started = true;
    }
    ctx.stroke();
  }
}

function recordSeries(body) {
  const point = { t: body.now, rtt: {}, cwnd: {}, retrans: {} };
  const by = {};
  for (const r of body.connections) {
    if (r.side !== "backend" || r.rtt_ms === undefined) continue;
    (by[r.backend] = by[r.backend] || []).push(r);
  }
  for (const [b, rs] of Object.entries(by)) {
    point.rtt[b] = median(rs.map((r) => r.rtt_ms));
    point.cwnd[b] = rs.reduce((a, r) => a + r.cwnd, 0) / rs.length;
  }
  for (const [b, s] of Object.entries(body.backends || {})) point.retrans[b] = s.retransmits;
  lab.series.push(point);
  if (lab.series.length > LAB_POINTS) lab.series.shift();
}

function renderBackendCharts() {
  const names = [...new Set(lab.series.flatMap((p) => [...Object.keys(p.rtt),
    ...Object.keys(p.retrans)]))].sort();
  for (const [id, field] of [["chart-rtt", "rtt"], ["chart-cwnd", "cwnd"],
    ["chart-retrans", "retrans"]]) {
    lineChart($(id), names.map((n) => ({ color: color(n),
      points: lab.series.map((p) => [p.t, p[field][n] ?? null]) })));
  }
  $("lab-legend").replaceChildren(...names.map((n) => {
    const span = el("span", { text: n });
    span.style.setProperty("--c", color(n));
    return span;
  }));
}

function renderTls(tls) {
  const box = $("tls-mix");
  if (!tls || !tls.handshakes) {
    box.replaceChildren(el("p", { class: "hint", text: "no TLS handshakes (plain HTTP or none yet)" }));
    return;
  }
  const rate = (100 * tls.resumed / tls.handshakes).toFixed(0) + "%";
  const table = el("table", { "data-testid": "tls-kinds" },
    el("thead", {}, el("tr", {}, el("th", { text: "version" }), el("th", { text: "cipher" }),
      el("th", { text: "handshake" }), el("th", { class: "num", text: "count" }))),
    el("tbody", {}, ...tls.kinds.map((k) => el("tr", {}, el("td", { text: k.version }),
      el("td", { text: k.cipher }), el("td", { text: k.resumed ? "resumed" : "full" }),
      el("td", { class: "num", text: String(k.count) })))));
  box.replaceChildren(kvList([["handshakes", tls.handshakes], ["resumption rate", rate],
    ["mean handshake ms", tls.mean_ms]]), table);
}

function renderTcp(tcp) {
  const side = (name, counts) => el("div", {}, el("h3", { text: name }),
    kvList(Object.entries(counts).sort()));
  const queues = (tcp.listen_queues || []).map((q) =>
    [`queue ${q.address}`, `${q.queue} / ${q.backlog}`]);
  $("tcp-states").replaceChildren(el("div", { class: "statecounts" },
    side("listener side", tcp.listener), side("backend side", tcp.backend),
    el("div", {}, el("h3", { text: "listen queue" }), kvList([...queues,
      ["overflows (netns)", tcp.listen_overflows], ["drops (netns)", tcp.listen_drops]]))));
}

async function pick(id) {
  lab.picked = id;
  const r = await fetch(`/api/connections/${id}`);
  if (!r.ok) { $("conn-detail").hidden = true; return; }
  const d = await r.json();
  $("conn-detail").hidden = false;
  $("conn-detail").dataset.conn = d.id;
  $("conn-title").textContent = `#${d.id} ${d.side}${d.backend ? " → " + d.backend : ""} ${d.peer}`;
  const syn = d.syn;
  $("d-syn").replaceChildren(d.side !== "client" ? el("p", { class: "hint",
    text: "we sent this SYN (backend side)" }) : syn ? kvList([["mss", syn.mss],
    ["window scale", syn.wscale], ["SACK permitted", syn.sack_permitted],
    ["timestamps", syn.timestamps], ["ECN", syn.ecn], ["window", syn.window],
    ["ttl", syn.ttl], ["options", syn.options.join(" ")]]) :
    el("p", { class: "hint", text: d.syn_error || "not read yet" }));
  const tls = d.tls;
  $("d-tls").replaceChildren(tls ? kvList([["version", tls.version], ["cipher", tls.cipher],
    ["ALPN", tls.alpn], ["SNI", tls.sni], ["resumed", tls.resumed ? "resumed" : "full"],
    ["handshake ms", tls.handshake_ms]]) : el("p", { class: "hint", text: "no TLS" }));
  $("d-close").replaceChildren(kvList([["state", d.state], ["first FIN", d.first_fin || "none yet"],
    ["TIME_WAIT held by", d.time_wait || (d.first_fin === "reset" ? "nobody (reset)" : "–")],
    ["open", d.open]]));
  const i = d.tcp_info || {};
  $("d-tcp").replaceChildren(kvList([["rtt ms", i.rtt_ms], ["rttvar ms", i.rttvar_ms],
    ["cwnd", i.cwnd], ["ssthresh", i.ssthresh ?? "∞ (slow start)"], ["ca state", i.ca_state],
    ["peer window", i.snd_wnd], ["our window", i.rcv_wnd], ["retransmits", i.total_retrans],
    ["congestion", d.congestion]]));
  lineChart($("d-chart"), [
    { color: "#2d6cdf", points: d.history.map((p) => [p.t, p.rtt_ms]) },
    { color: "#1f9d55", points: d.history.map((p) => [p.t, p.cwnd]) },
  ]);
  renderConnTable();
}

async function labTick() {
  try {
    const r = await fetch("/api/connections");
    if (!r.ok) return;
    const body = await r.json();
    lab.rows = body.connections;
    recordSeries(body);
    renderConnTable();
    renderBackendCharts();
    renderTls(body.tls);
    if (lab.picked !== null && !$("conn-detail").hidden) await pick(lab.picked);
  } catch (e) { /* the next tick retries */ }
}

async function tcpTick() {
  try {
    const r = await fetch("/api/tcp");
    if (r.ok) renderTcp(await r.json());
  } catch (e) { /* the next tick retries */ }
}

function showView(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("on", b.dataset.view === name);
  $("view-overview").hidden = name !== "overview";
  $("view-connections").hidden = name !== "connections";
  clearInterval(lab.timer);
  clearInterval(lab.tcpTimer);
  lab.timer = lab.tcpTimer = null;
  if (name === "connections") {
    labTick(); tcpTick();
    lab.timer = setInterval(labTick, 1000);
    lab.tcpTimer = setInterval(tcpTick, 2000);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll(".tab")) {
    b.addEventListener("click", () => showView(b.dataset.view));
  }
  $("conn-close").addEventListener("click", () => {
    lab.picked = null;
    $("conn-detail").hidden = true;
    renderConnTable();
  });
  if (location.hash === "#connections") showView("connections");
});
