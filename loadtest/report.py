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
  it, minus t_f. 0.0 when no request sent after t_f was bad (nothing visible to clients);
  None when no good request followed.
- failed_requests: every request without a 2xx status (errors and timeouts included); the
  drills only send idempotent GETs, so each one is a request a client saw fail.
- phases: before = [0, t_f); during = [t_f, t_r + recover_s) for backend drills, or
  [t_f, t_f + failover_s) when there is no restore; after = the rest.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.traffic import Outcome, percentile

FAULT_KINDS = frozenset({"kill", "stop", "pause", "disconnect"})
RESTORE_KINDS = frozenset({"restart", "resume", "reconnect"})

DEFINITIONS = {
    "detect_s": "fault -> first /api/state sample (non-passive balancer) with the backend not up",
    "recover_s": "restore -> backend up in /api/state AND a 2xx from it completed (later of both)",
    "failover_s": "fault -> send time of the first good request sent after the first bad "
    "request sent after the fault (bad = non-2xx, error or slower than stall_s); 0 = none bad",
    "failed_requests": "requests without a 2xx status (errors and timeouts included)",
}


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
        return 0.0
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
    """Per-second bins by send time: sent, ok, failed, p50/p99 of the 2xx latencies."""
    n_bins = max(1, math.ceil(duration))
    bins: list[list[Outcome]] = [[] for _ in range(n_bins)]
    for o in outcomes:
        i = min(n_bins - 1, max(0, int(o.t_send)))
        bins[i].append(o)
    out = []
    for i, b in enumerate(bins):
        s = _lat_summary(b)
        out.append(
            {"t": i, "sent": len(b), "ok": len(b) - s["failed"], "failed": s["failed"]}
            | {"p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"]}
        )
    return out


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
) -> dict[str, Any]:
    """The report dict. `faulted` is the backend/balancer name; backend_id its /api/state id."""
    outs = [
        Outcome(o.t_send - t0, o.latency, o.status, o.error, o.backend)
        for o in sorted(outcomes, key=lambda o: o.t_send)
    ]
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
        "detect_s": _r(detect),
        "recover_s": _r(recover),
        "failover_s": _r(failover),
        "stall_s": stall_s,
        "active_before": active_at(smp, t_f) if fault is not None else None,
        "active_after": active_at(smp, math.inf),
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


def to_markdown(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        f"# Drill `{report['scenario']}` ({report['target']})",
        "",
        f"{report['rate']} req/s for {report['duration_s']} s; faulted: `{report['faulted']}`.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests sent | {c['sent']} |",
        f"| 2xx | {c['ok']} |",
        f"| failed requests | {report['failed_requests']} |",
        f"| detect_s | {_fmt(report['detect_s'])} |",
        f"| recover_s | {_fmt(report['recover_s'])} |",
        f"| failover_s | {_fmt(report['failover_s'])} |",
        f"| active before / after | {_fmt(report['active_before'])} / "
        f"{_fmt(report['active_after'])} |",
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


def plot(report: dict[str, Any], path: str) -> None:
    """PNG: req/s, failures/s and latency per second, drill events as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    t = [b["t"] + 0.5 for b in tl]
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    axes[0].plot(t, [b["sent"] for b in tl], label="sent/s")
    axes[0].plot(t, [b["ok"] for b in tl], label="2xx/s")
    axes[0].set_ylabel("req/s")
    axes[1].bar(t, [b["failed"] for b in tl], width=0.9, color="tab:red", label="failed/s")
    axes[1].set_ylabel("failed/s")
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(0, max([1, *(b["failed"] for b in tl)]) * 1.1)
    for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
        axes[2].plot(
            t, [b[key] if b[key] is not None else float("nan") for b in tl], style, label=key
        )
    axes[2].set_ylabel("latency ms")
    axes[2].set_xlabel("seconds since start of traffic")
    for e in report["events"]:
        for ax in axes:
            ax.axvline(e["t"], color="grey", linestyle=":")
        axes[0].annotate(
            f"{e['kind']} {e['target']}",
            (e["t"], 0),
            rotation=90,
            xycoords=("data", "axes fraction"),
            fontsize=8,
            va="bottom",
        )
    for ax in axes:
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"drill {report['scenario']} ({report['target']}), {report['rate']} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
