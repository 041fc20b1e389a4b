"""Drill results: the metrics (pure functions over a recorded timeline), Markdown and a plot.

All times are seconds on one monotonic clock; `build_report` makes them relative to the
start of traffic. Definitions (also written into every report):

- fault moment t_f: the first kill/stop/pause/disconnect event.
- detect_s: from t_f to the first /api/state sample, taken from a non-passive balancer,
  in which the faulted backend's state is no longer "up" (sample time = response time).
- recover_s: from the restore event (restart/resume/reconnect) t_r to the later of
  (a) the first sample showing the backend "up" again and (b) the completion of the first
  2xx response sent after t_r that carries the backend's X-Backend name.
- failover_s: among requests *sent* at or after t_f, find the first bad one (not 2xx, or
  slower than `stall_s`); failover_s is the send time of the first good request sent after
  it, minus t_f. None (null) when nothing failed over: no request sent after t_f was bad
  (`disrupted` false), or no good request followed (`disrupted` true).
- failed_requests: every request without a 2xx status (errors and timeouts included); the
  drills only send idempotent GETs, so each one is a request a client saw fail. It is split
  in two: failed_in_flight (the request had a connection, pooled or just opened, and lost
  it or got an error status on it) and failed_new_connections (no connection could be
  opened for it: connect or TLS handshake failed, or it timed out waiting for one).
- phases: before = [0, t_f); during = [t_f, t_r + recover_s) for backend drills, or
  [t_f, t_f + failover_s) when there is no restore; after = the rest.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from harness.traffic import Outcome, percentile

FAULT_KINDS = frozenset({"kill", "stop", "pause", "disconnect", "netem"})
RESTORE_KINDS = frozenset({"restart", "resume", "reconnect", "clear"})

DEFINITIONS = {
    "detect_s": "fault -> first /api/state sample (non-passive balancer) with the backend not up",
    "recover_s": "restore -> backend up in /api/state AND a 2xx from it completed (later of both)",
    "failover_s": "fault -> send time of the first good request sent after the first bad "
    "request sent after the fault (bad = non-2xx, error or slower than stall_s); null when "
    "none was bad (disrupted false) or none good followed (disrupted true)",
    "failed_requests": "requests without a 2xx status (errors and timeouts included)",
    "takeover_s": "pair runs: fault -> first /api/state sample in which another balancer "
    "is active (the peer detected the fault and took over)",
    "failed_in_flight": "failed requests that had a connection (pooled or just opened)",
    "failed_new_connections": "failed requests for which no connection could be opened "
    "(connect or TLS handshake failed, or timed out waiting for one)",
}

# A connection that could not be opened, by error text, for outcomes without `conn`.
_CONNECT_ERRORS = ("ClientConnectorError", "ClientConnectorSSLError", "ConnectionRefusedError")


def failure_kind(o: Outcome) -> str | None:
    """None for a 2xx; else "new_connection" (no connection was had) or "in_flight"."""
    if o.ok:
        return None
    if o.conn in ("failed", "waiting"):
        return "new_connection"
    if o.conn in ("new", "reused"):
        return "in_flight"
    return "new_connection" if (o.error or "").startswith(_CONNECT_ERRORS) else "in_flight"


@dataclass(frozen=True)
class DrillEvent:
    t: float
    kind: str  # kill, stop, pause, resume, restart, disconnect, reconnect, note
    target: str  # backend or balancer name
    detail: str = ""


@dataclass(frozen=True)
class StateSample:
    t: float
    balancer: str
    reachable: bool
    role: str | None = None
    backends: dict[str, str] = field(default_factory=dict)  # backend id -> state


def _first(events: Iterable[DrillEvent], kinds: frozenset[str], after: float) -> DrillEvent | None:
    for e in sorted(events, key=lambda e: e.t):
        if e.kind in kinds and e.t >= after:
            return e
    return None


def fault_event(events: Sequence[DrillEvent]) -> DrillEvent | None:
    return _first(events, FAULT_KINDS, -math.inf)


def restore_event(events: Sequence[DrillEvent]) -> DrillEvent | None:
    fault = fault_event(events)
    return None if fault is None else _first(events, RESTORE_KINDS, fault.t)


def _authoritative(samples: Iterable[StateSample]) -> list[StateSample]:
    """Samples from balancers that serve traffic (active or standalone), by time."""
    return sorted((s for s in samples if s.reachable and s.role != "passive"), key=lambda s: s.t)


def detect_time(
    events: Sequence[DrillEvent], samples: Sequence[StateSample], backend_id: str
) -> float | None:
    fault = fault_event(events)
    if fault is None:
        return None
    for s in _authoritative(samples):
        if s.t >= fault.t and s.backends.get(backend_id) != "up":
            return s.t - fault.t
    return None


def recover_time(
    events: Sequence[DrillEvent],
    samples: Sequence[StateSample],
    outcomes: Sequence[Outcome],
    backend_id: str,
    backend_name: str,
) -> float | None:
    restore = restore_event(events)
    if restore is None:
        return None
    t_up = next(
        (
            s.t
            for s in _authoritative(samples)
            if s.t >= restore.t and s.backends.get(backend_id) == "up"
        ),
        None,
    )
    served = [
        o.t_send + o.latency
        for o in outcomes
        if o.t_send >= restore.t and o.ok and o.backend == backend_name and o.latency is not None
    ]
    if t_up is None or not served:
        return None
    return max(t_up, min(served)) - restore.t


def _bad(o: Outcome, stall_s: float) -> bool:
    return not o.ok or o.latency is None or o.latency > stall_s


def failover_time(
    events: Sequence[DrillEvent], outcomes: Sequence[Outcome], stall_s: float = 1.0
) -> float | None:
    fault = fault_event(events)
    if fault is None:
        return None
    after = sorted((o for o in outcomes if o.t_send >= fault.t), key=lambda o: o.t_send)
    first_bad = next((o for o in after if _bad(o, stall_s)), None)
    if first_bad is None:
        return None  # nothing failed over: clients saw nothing
    good = next((o for o in after if o.t_send > first_bad.t_send and not _bad(o, stall_s)), None)
    return None if good is None else good.t_send - fault.t


def active_at(samples: Sequence[StateSample], before: float) -> str | None:
    """Balancer(s) reporting role active in the last sample round before `before`."""
    latest: dict[str, StateSample] = {}
    for s in sorted(samples, key=lambda s: s.t):
        if s.t < before:
            latest[s.balancer] = s
    active = sorted(b for b, s in latest.items() if s.reachable and s.role == "active")
    return ",".join(active) or None


def disrupted(events: Sequence[DrillEvent], outcomes: Sequence[Outcome], stall_s: float) -> bool:
    """Whether any request sent at or after the fault was bad (clients saw the fault)."""
    fault = fault_event(events)
    return fault is not None and any(_bad(o, stall_s) for o in outcomes if o.t_send >= fault.t)


def _lat_summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    lat = [o.latency * 1000 for o in outcomes if o.ok and o.latency is not None]
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    return {
        "n": len(outcomes),
        "failed": sum(1 for o in outcomes if not o.ok),
        "p50_ms": None if p50 is None else round(p50, 2),
        "p99_ms": None if p99 is None else round(p99, 2),
    }


def timeline(outcomes: Sequence[Outcome], duration: float) -> list[dict[str, Any]]:
    """Per-second bins by send time: bin i holds requests sent in [i, i+1). sent, ok,
    failed, p50/p99 of the 2xx latencies, and the 2xx served by each backend."""
    n_bins = max(1, math.ceil(duration))
    bins: list[list[Outcome]] = [[] for _ in range(n_bins)]
    for o in outcomes:
        i = min(n_bins - 1, max(0, int(o.t_send)))
        bins[i].append(o)
    out = []
    for i, b in enumerate(bins):
        s = _lat_summary(b)
        served = Counter(o.backend or "-" for o in b if o.ok)
        out.append(
            {"t": i, "sent": len(b), "ok": len(b) - s["failed"], "failed": s["failed"]}
            | {"p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"]}
            | {"by_backend": dict(sorted(served.items()))}
        )
    return out


def drill_notes(kind: str, target: str, in_flight: int, new_connections: int) -> list[str]:
    """What the failure counts mean for this kind of drill, in words, with the counts."""
    if kind != "balancer":
        return []
    notes = [
        f"{in_flight} request(s) failed in flight: whatever was on a connection to the "
        "faulted balancer dies with it, as with keepalived (the TCP connections belonged to "
        "the process that held them); an idempotent client retries them."
    ]
    if target == "local":
        notes.append(
            f"{new_connections} new connection(s) failed: locally the pair shares one loopback "
            "port that only the active balancer binds, so from the fault until the passive "
            "one takes over and binds it (about 0.7 s, the missed-advert interval) nobody "
            "listens and connections are refused. In containers the entry relay retries the "
            "VIP instead."
        )
    else:
        notes.append(
            f"{new_connections} new connection(s) failed: the host entry relay keeps a new "
            "connection and retries the VIP for up to about 2 s, so the takeover is latency "
            "for new connections, not a failure."
        )
    return notes


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def build_report(
    *,
    scenario: str,
    target: str,
    rate: float,
    duration: float,
    t0: float,
    outcomes: Sequence[Outcome],
    events: Sequence[DrillEvent],
    samples: Sequence[StateSample],
    faulted: str,
    backend_id: str | None = None,
    stall_s: float = 1.0,
    kind: str = "backend",
) -> dict[str, Any]:
    """The report dict. `faulted` is the backend/balancer name (`kind` says which);
    backend_id its /api/state id. The pair rows (active before/after) appear only when
    more than one balancer was polled."""
    outs = [replace(o, t_send=o.t_send - t0) for o in sorted(outcomes, key=lambda o: o.t_send)]
    evs = sorted(
        (DrillEvent(e.t - t0, e.kind, e.target, e.detail) for e in events), key=lambda e: e.t
    )
    smp = [StateSample(s.t - t0, s.balancer, s.reachable, s.role, s.backends) for s in samples]
    fault, restore = fault_event(evs), restore_event(evs)
    detect = recover = None
    if backend_id is not None:
        detect = detect_time(evs, smp, backend_id)
        recover = recover_time(evs, smp, outs, backend_id, faulted)
    failover = failover_time(evs, outs, stall_s)
    t_f = fault.t if fault is not None else math.inf
    if restore is not None:
        t_end = restore.t + (recover or 0.0)
    elif failover is not None:
        t_end = t_f + failover
    else:
        t_end = math.inf
    phases = {
        "before": [o for o in outs if o.t_send < t_f],
        "during": [o for o in outs if t_f <= o.t_send < t_end],
        "after": [o for o in outs if o.t_send >= max(t_f, t_end)],
    }
    statuses = Counter(str(o.status) for o in outs if o.status is not None)
    errors = Counter(o.error for o in outs if o.error is not None)
    failed = sum(1 for o in outs if not o.ok)
    kinds = Counter(failure_kind(o) for o in outs if not o.ok)
    pair = len({s.balancer for s in smp}) > 1
    pair_rows: dict[str, Any] = {}
    if pair:
        before = active_at(smp, t_f) if fault is not None else None
        after = active_at(smp, math.inf)
        changed = before is not None and after is not None and after != before
        takeover = next(
            (
                s.t - t_f
                for s in sorted(smp, key=lambda s: s.t)
                if s.t >= t_f and s.reachable and s.role == "active" and s.balancer != faulted
            ),
            None,
        )
        if kind != "balancer":
            takeover = None  # a backend drill: no balancer was faulted, none took over
        pair_rows = {
            "active_before": before,
            "active_after": after,
            "active_changed": changed,
            "takeover_s": _r(takeover),
        }
    markers = {
        "fault": _r(fault.t) if fault is not None else None,
        "detect": _r(fault.t + detect) if fault is not None and detect is not None else None,
        "takeover": _r(t_f + pair_rows["takeover_s"]) if pair_rows.get("takeover_s") else None,
        "failover": _r(t_f + failover) if failover is not None else None,
        "restore": _r(restore.t) if restore is not None else None,
        "recovered": _r(restore.t + recover) if restore and recover is not None else None,
    }
    notes = drill_notes(kind, target, kinds["in_flight"], kinds["new_connection"])
    return {
        "scenario": scenario,
        "target": target,
        "faulted": faulted,
        "rate": rate,
        "duration_s": duration,
        "counts": {
            "sent": len(outs),
            "ok": len(outs) - failed,
            "failed": failed,
            "by_status": dict(sorted(statuses.items())),
            "by_error": dict(errors.most_common(10)),
        },
        "failed_requests": failed,
        "failed_in_flight": kinds["in_flight"],
        "failed_new_connections": kinds["new_connection"],
        "detect_s": _r(detect),
        "recover_s": _r(recover),
        "failover_s": _r(failover),
        "disrupted": disrupted(evs, outs, stall_s),
        "stall_s": stall_s,
        **pair_rows,
        "markers": markers,
        "notes": notes,
        "latency": {name: _lat_summary(group) for name, group in phases.items()},
        "per_backend": dict(sorted(Counter(o.backend or "-" for o in outs if o.ok).items())),
        "per_backend_by_phase": {
            name: dict(sorted(Counter(o.backend or "-" for o in group if o.ok).items()))
            for name, group in phases.items()
        },
        "events": [
            {"t": round(e.t, 3), "kind": e.kind, "target": e.target, "detail": e.detail}
            for e in evs
        ],
        "state_samples": len(smp),
        "timeline": timeline(outs, duration),
        "definitions": DEFINITIONS,
    }


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def fmt_value(v: Any) -> str:
    """A measured value as the expectation syntax writes it (null, true, false, 0.62)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def to_markdown(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        f"# Drill `{report['scenario']}` ({report['target']})",
        "",
        f"{report['rate']} req/s for {report['duration_s']} s; faulted: `{report['faulted']}`"
        + (f"; lb policy `{report['algorithm']}`." if report.get("algorithm") else "."),
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests sent | {c['sent']} |",
        f"| 2xx | {c['ok']} |",
        f"| failed requests | {report['failed_requests']} |",
        f"| failed in flight | {report['failed_in_flight']} |",
        f"| failed new connections | {report['failed_new_connections']} |",
        f"| detect_s | {_fmt(report['detect_s'])} |",
        f"| recover_s | {_fmt(report['recover_s'])} |",
        f"| failover_s | {_fmt(report['failover_s'])} |",
    ]
    if "active_before" in report:
        lines.append(f"| takeover_s | {_fmt(report['takeover_s'])} |")
        lines.append(
            f"| active before / after | {_fmt(report['active_before'])} / "
            f"{_fmt(report['active_after'])} |"
        )
    if report.get("expectations"):
        verdict = "met" if report["expectations_met"] else "NOT met"
        lines += ["", f"Expectations ({verdict}):", "", "| condition | measured | holds |"]
        lines.append("|---|---|---|")
        lines += [
            f"| `{e['condition']}` | {fmt_value(e['measured'])} | {'yes' if e['ok'] else 'NO'} |"
            for e in report["expectations"]
        ]
    if report.get("notes"):
        lines += ["", "Notes:", ""]
        lines += [f"- {n}" for n in report["notes"]]
    lines += [
        "",
        "| phase | requests | failed | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name, s in report["latency"].items():
        lines.append(
            f"| {name} | {s['n']} | {s['failed']} | {_fmt(s['p50_ms'])} | {_fmt(s['p99_ms'])} |"
        )
    names = sorted({b for p in report["per_backend_by_phase"].values() for b in p})
    lines += ["", "| backend | " + " | ".join(report["per_backend_by_phase"]) + " | total |"]
    lines.append("|---" * (len(report["per_backend_by_phase"]) + 2) + "|")
    for b in names:
        row = [str(p.get(b, 0)) for p in report["per_backend_by_phase"].values()]
        lines.append(f"| {b} | " + " | ".join(row) + f" | {report['per_backend'].get(b, 0)} |")
    lines += ["", "Events (seconds from the start of traffic):", ""]
    lines += [
        f"- {e['t']:.3f} s: {e['kind']} {e['target']} {e['detail']}".rstrip()
        for e in report["events"]
    ]
    if c["by_error"]:
        lines += ["", "Errors:", ""]
        lines += [f"- {n} x {err}" for err, n in c["by_error"].items()]
    lines += ["", "Definitions:", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
    return "\n".join(lines) + "\n"


MARKER_STYLE = {  # marker -> (colour, line style)
    "fault": ("tab:red", "-"),
    "detect": ("tab:orange", "--"),
    "takeover": ("tab:orange", "-."),
    "failover": ("tab:purple", "--"),
    "restore": ("tab:green", "-"),
    "recovered": ("tab:olive", "--"),
}


def plot_series(report: dict[str, Any]) -> dict[str, Any]:
    """What the plot draws, as data: `edges` are the one-second bucket boundaries (bucket
    i = requests sent in [i, i+1)), each series has one value per bucket (drawn as a step
    over its bucket, so a fall starts exactly where its bucket starts); `backends` maps each
    backend to its 2xx per second; `markers` maps marker name -> time, absent ones left out."""
    tl = report["timeline"]
    names = sorted({b for bin_ in tl for b in bin_.get("by_backend", {})} - {"-"})
    extra = [e["t"] for e in report["events"] if e["kind"] in ("add", "remove")]
    return {
        "edges": [float(b["t"]) for b in tl] + [float(tl[-1]["t"] + 1) if tl else 0.0],
        "sent": [b["sent"] for b in tl],
        "ok": [b["ok"] for b in tl],
        "failed": [b["failed"] for b in tl],
        "p50_ms": [b["p50_ms"] for b in tl],
        "p99_ms": [b["p99_ms"] for b in tl],
        "backends": {n: [b.get("by_backend", {}).get(n, 0) for b in tl] for n in names},
        "markers": {k: v for k, v in report.get("markers", {}).items() if v is not None},
        "other_events": extra,
    }


def plot(report: dict[str, Any], path: str) -> None:
    """PNG: sent/s beside 2xx/s and failed/s; one panel per backend (2xx it served per
    second); latency. Steps cover their one-second buckets; vertical markers for the fault,
    detection, failover, restore and recovery."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    d = plot_series(report)
    edges = d["edges"]
    backends: dict[str, list[int]] = d["backends"]
    tcp: dict[str, Any] = report.get("backends") or {}  # network drills: RTT and cwnd
    n_panels = 2 + len(backends) + (2 if tcp else 0)
    fig, axes = plt.subplots(
        n_panels, 1, figsize=(10, 2.6 + 1.4 * n_panels), sharex=True, squeeze=False
    )
    ax_all = list(axes[:, 0])
    top, lat = ax_all[0], ax_all[len(backends) + 1]
    if tcp:
        for ax, key, label in ((ax_all[-2], "rtt_series", "RTT ms"), (ax_all[-1], "cwnd", "cwnd")):
            for name, b in sorted(tcp.items()):
                pts = [(t, v) for t, v in b.get(key, []) if v is not None]
                if pts:
                    ax.plot([t for t, _ in pts], [v for _, v in pts], marker=".", label=name)
            ax.set_ylabel(label)
        ax_all[-2].set_yscale("symlog", linthresh=1.0)
    top.stairs(d["sent"], edges, color="tab:blue", linewidth=4, alpha=0.35, label="sent/s")
    top.stairs(d["ok"], edges, color="tab:green", linewidth=1.5, label="2xx/s")
    top.stairs(d["failed"], edges, color="tab:red", fill=True, alpha=0.6, label="failed/s")
    top.set_ylabel("req/s")
    top.set_ylim(bottom=0, top=max([1, *d["sent"]]) * 1.25)
    peak = max([1, *(v for series in backends.values() for v in series)]) * 1.25
    for ax, (name, series) in zip(ax_all[1 : len(backends) + 1], backends.items(), strict=True):
        ax.stairs(series, edges, color="tab:cyan", fill=True, alpha=0.5, label=f"{name} 2xx/s")
        ax.set_ylim(0, peak)
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
        values = [v if v is not None else float("nan") for v in d[key]]
        lat.stairs(values, edges, linestyle=style, label=key)
    lat.set_ylabel("latency ms")
    lat.set_xlabel("seconds since start of traffic (one bucket = requests sent in that second)")
    for i, (name, t) in enumerate(sorted(d["markers"].items(), key=lambda m: m[1])):
        colour, style = MARKER_STYLE.get(name, ("grey", ":"))
        for ax in ax_all:
            ax.axvline(t, color=colour, linestyle=style, linewidth=1)
        top.annotate(  # labels alternate high and low: close markers stay readable
            f" {name} {t:.2f}s",
            (t, 1.0 if i % 2 == 0 else 0.55),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            va="top",
            color=colour,
        )
    for t in d["other_events"]:
        for ax in ax_all:
            ax.axvline(t, color="grey", linestyle=":")
    for ax in ax_all:
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(
        f"drill {report['scenario']} ({report['target']}), {report['rate']} req/s, "
        f"faulted {report['faulted']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
