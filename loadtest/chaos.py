"""The chaos soak's pure part: the schedule, per-event accounting and the run's summary.

No asyncio, sockets or subprocesses here: `loadtest.chaos_run` drives the stack and hands
in what it recorded (outcomes, drill events, state samples, process samples). The words
are the drills' (`loadtest.report`): fault, detect, takeover, failover, restore,
failed_in_flight, failed_new_connections.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.traffic import Outcome, percentile
from loadtest.expect import evaluate, parse_all
from loadtest.report import DrillEvent, StateSample, build_report

# kind -> (who is faulted, fault action, restore action or None)
KINDS: dict[str, tuple[str, str, str | None]] = {
    "kill-backend": ("backend", "kill", "restart"),
    "stop-backend": ("backend", "stop", "restart"),
    "pause-backend": ("backend", "pause", "resume"),
    "delay-backend": ("backend", "delay", "undelay"),
    "stop-active-balancer": ("balancer", "stop", "restart"),
    "kill-active-balancer": ("balancer", "kill", "restart"),
    "renew-cert": ("balancer", "renew", None),
    "reload-config": ("balancer", "reload", None),
}
ALL_KINDS = tuple(KINDS)
DELAY_MS = 100.0  # delay-backend: well under every timeout, so nothing may fail

# The documented window of each kind (README, drills section) and the conditions on the
# event's report that say it held. `{new_conn_max}` is filled in from the rate.
WINDOWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "kill-backend": (
        "SIGKILL costs in-flight requests only, retried on another backend (GETs are "
        "idempotent): no client sees a failure; the restarted backend serves again",
        ("failed_requests==0", "recover_s!=null"),
    ),
    "stop-backend": (
        "SIGTERM: the backend finishes what it has; nothing is lost",
        ("failed_requests==0", "recover_s!=null"),
    ),
    "pause-backend": (
        "SIGSTOP: the checks mark it down, requests on it time out and are retried; it "
        "comes back after SIGCONT",
        ("detect_s!=null", "recover_s!=null"),
    ),
    "delay-backend": (
        f"netem (nfqueue without sch_netem) delays one backend by {DELAY_MS:g} ms: "
        "slower, nothing fails",
        ("failed_requests==0", "delay_applied==true", "delay_cleared==true"),
    ),
    "stop-active-balancer": (
        "SIGTERM: the active stops accepting, finishes what is in flight and resigns; the "
        "passive takes over at once (about 0.1 s). Locally nobody listens on the shared port "
        "in that gap, so a new connection there is refused; nothing in flight is lost",
        (
            "takeover_s!=null",
            "restart_ready==true",
            "failed_in_flight==0",
            "failed_new_connections<={new_conn_max}",
        ),
    ),
    "kill-active-balancer": (
        "SIGKILL: the passive takes over after master-down (about 0.7 s); locally new "
        "connections are refused meanwhile, and requests in flight on the dead one are lost",
        ("takeover_s!=null", "restart_ready==true", "failed_new_connections<={new_conn_max}"),
    ),
    "renew-cert": (
        "the balancer's certificate hot reload serves the new certificate; nothing fails",
        ("failed_requests==0", "serial_changed==true"),
    ),
    "reload-config": (
        "a live setting changes in place (reload says applied); nothing fails",
        ("failed_requests==0", "reload_applied==true"),
    ),
}
# a balancer event may take over twice (the restarted node has the higher priority and
# preempts back): two ~0.7 s windows plus scheduling slack, in seconds of traffic
TAKEOVER_BUDGET_S = 3.0


class ScheduleError(ValueError):
    """The run is too short for the events asked for; one line for the user."""


@dataclass(frozen=True)
class Planned:
    index: int
    kind: str
    target: str  # a backend name (b1..), or "active" (resolved when it happens)
    at: float  # seconds from the start of traffic
    restore_at: float | None
    end: float  # the next event's start (or the end of the run)


def plan(
    duration_s: float,
    seed: int,
    kinds: Sequence[str] = ALL_KINDS,
    *,
    backends: Sequence[str] = ("b1", "b2", "b3"),
    delay_target: str = "b3",
    slot_s: float = 60.0,
    min_slot_s: float = 8.0,
    hold_s: float = 5.0,
) -> list[Planned]:
    """Events cycling through `kinds` (each cycle shuffled with `seed`), one per slot after
    a warm-up, each held `hold_s` (less in short slots) and followed by a quiet gap. Every
    kind occurs at least once; slots are `slot_s` long unless that would leave a kind out."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ScheduleError(f"unknown event kind(s) {unknown}; choose from {', '.join(KINDS)}")
    warmup = min(30.0, 0.1 * duration_s)
    span = duration_s - warmup
    n = max(len(kinds), int(span // slot_s))
    slot = span / n
    if slot < min_slot_s:
        need = warmup + len(kinds) * min_slot_s / 0.9
        raise ScheduleError(
            f"{len(kinds)} event kind(s) need at least {need:.0f} s ({need / 60:.1f} min)"
        )
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < n:
        cycle = list(kinds)
        rng.shuffle(cycle)
        order += cycle
    hold = min(hold_s, slot / 3)
    out = []
    for i, kind in enumerate(order[:n]):
        who, _, restore = KINDS[kind]
        if kind == "delay-backend":
            target = delay_target
        elif who == "backend":
            target = rng.choice(list(backends))
        else:
            target = "active"
        at = warmup + i * slot
        out.append(
            Planned(
                i,
                kind,
                target,
                round(at, 3),
                None if restore is None else round(at + hold, 3),
                round(at + slot, 3),
            )
        )
    return out


def describe_plan(planned: Sequence[Planned], seed: int) -> str:
    lines = [f"chaos schedule (seed {seed}, {len(planned)} events):"]
    for p in planned:
        back = f", restore at {p.restore_at:.1f} s" if p.restore_at is not None else ""
        lines.append(f"  #{p.index:<3} {p.at:8.1f} s  {p.kind:22} {p.target}{back}")
    return "\n".join(lines)


# ---- per event --------------------------------------------------------------------------
def expectations(kind: str, rate: float) -> list[str]:
    new_conn_max = int(rate * TAKEOVER_BUDGET_S)
    return [c.format(new_conn_max=new_conn_max) for c in WINDOWS[kind][1]]


def _slice(t0: float, t1: float, outcomes: Sequence[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if t0 <= o.t_send < t1]


def account(
    p: Planned,
    *,
    rate: float,
    outcomes: Sequence[Outcome],
    events: Sequence[DrillEvent],
    samples: Sequence[StateSample],
    faulted: str,
    backend_id: str | None,
    checks: dict[str, Any],
    skipped: str | None = None,
) -> dict[str, Any]:
    """One event's row: the drill report of its slot [at, end) (times relative to the run),
    the documented window, the conditions and whether they held. `checks` holds what the
    action itself verified (serial_changed, reload_applied, delay_applied, restart_ready).
    A skipped event (e.g. no netem in this kernel) is reported, not judged."""
    who, _, _ = KINDS[p.kind]
    evs = [e for e in events if p.at - 0.5 <= e.t < p.end]
    smp = [s for s in samples if p.at <= s.t < p.end]
    rep = build_report(
        scenario=p.kind,
        target="local",
        rate=rate,
        duration=max(1.0, p.end - p.at),
        t0=0.0,
        outcomes=_slice(p.at, p.end, outcomes),
        events=evs,
        samples=smp,
        faulted=faulted,
        backend_id=backend_id,
        kind=who,
    )
    rep |= checks
    conds = expectations(p.kind, rate)
    rows = [] if skipped else evaluate(rep, parse_all(conds))
    fault = next((e.t for e in evs if e.kind not in ("note",)), p.at)
    restore = next((e.t for e in evs if e.kind in ("restart", "resume", "undelay")), None)
    return {
        "index": p.index,
        "kind": p.kind,
        "target": faulted,
        "at_s": round(fault, 3),
        "restore_s": None if restore is None else round(restore, 3),
        "slot_s": [p.at, p.end],
        "requests": rep["counts"]["sent"],
        "failed_requests": rep["failed_requests"],
        "failed_in_flight": rep["failed_in_flight"],
        "failed_new_connections": rep["failed_new_connections"],
        "detect_s": rep["detect_s"],
        "recover_s": rep["recover_s"],
        "failover_s": rep["failover_s"],
        "takeover_s": rep.get("takeover_s"),
        "latency": rep["latency"],
        **checks,
        "events": rep["events"],
        "window": WINDOWS[p.kind][0],
        "expectations": rows,
        "held": None if skipped else all(r["ok"] for r in rows),
        "skipped": skipped,
    }


# ---- the whole run ----------------------------------------------------------------------
def windows(outcomes: Sequence[Outcome], duration: float, width: float) -> list[dict[str, Any]]:
    """Fixed windows by send time: requests, errors and 2xx latency p50/p95/p99 (ms)."""
    n = max(1, int(-(-duration // width)))
    bins: list[list[Outcome]] = [[] for _ in range(n)]
    for o in outcomes:
        bins[min(n - 1, max(0, int(o.t_send // width)))].append(o)
    out = []
    for i, b in enumerate(bins):
        lat = [o.latency * 1000 for o in b if o.ok and o.latency is not None]
        row: dict[str, Any] = {"t_s": round(i * width, 3), "requests": len(b)}
        row["errors"] = sum(1 for o in b if not o.ok)
        for q in (50, 95, 99):
            v = percentile(lat, q)
            row[f"p{q}_ms"] = None if v is None else round(v, 3)
        out.append(row)
    return out


def resources(samples: Sequence[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Per process name: RSS and FDs over the run; RSS growth per incarnation (pid) from
    its first sample after the warm-up (the run's, and as long again after a restart) to
    its last."""
    out: dict[str, Any] = {}
    for name in sorted({s["name"] for s in samples}):
        mine = [s for s in samples if s["name"] == name]
        growth = []
        for pid in dict.fromkeys(s["pid"] for s in mine):
            own = [s for s in mine if s["pid"] == pid]
            # a restarted process warms up again: its baseline is warmup_s after its start
            start = max(warmup_s, own[0]["t_s"] + warmup_s)
            run = [s for s in own if s["t_s"] >= start]
            if len(run) >= 2 and run[0]["rss_kib"]:
                pct = (run[-1]["rss_kib"] - run[0]["rss_kib"]) / run[0]["rss_kib"] * 100
                growth.append(
                    {
                        "pid": pid,
                        "from_s": run[0]["t_s"],
                        "to_s": run[-1]["t_s"],
                        "rss_kib_from": run[0]["rss_kib"],
                        "rss_kib_to": run[-1]["rss_kib"],
                        "growth_pct": round(pct, 2),
                    }
                )
        out[name] = {
            "incarnations": len({s["pid"] for s in mine}),
            "rss_kib_max": max(s["rss_kib"] for s in mine),
            "fds_min": min(s["fds"] for s in mine),
            "fds_max": max(s["fds"] for s in mine),
            "rss_growth": growth,
        }
    return out


def summary(
    outcomes: Sequence[Outcome], events: Sequence[dict[str, Any]], res: dict[str, Any]
) -> dict[str, Any]:
    lat = [o.latency * 1000 for o in outcomes if o.ok and o.latency is not None]
    failed = [e for e in events if e["held"] is False]
    return {
        "requests": len(outcomes),
        "errors": sum(1 for o in outcomes if not o.ok),
        "errors_outside_events": 0,  # filled by the caller when events do not cover all
        "p50_ms": _r(percentile(lat, 50)),
        "p95_ms": _r(percentile(lat, 95)),
        "p99_ms": _r(percentile(lat, 99)),
        "events": len(events),
        "events_held": sum(1 for e in events if e["held"]),
        "events_failed": [f"#{e['index']} {e['kind']}" for e in failed],
        "events_skipped": [
            f"#{e['index']} {e['kind']}: {e['skipped']}" for e in events if e["skipped"]
        ],
        "max_rss_growth_pct": max(
            (g["growth_pct"] for r in res.values() for g in r["rss_growth"]), default=None
        ),
        "ok": not failed,
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def compose(
    *,
    planned: Sequence[Planned],
    seed: int,
    rate: float,
    duration: float,
    window: float,
    outcomes: Sequence[Outcome],
    events: Sequence[DrillEvent],
    samples: Sequence[StateSample],
    procs: Sequence[dict[str, Any]],
    done: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    """The chaos report. `done[i]` holds what event i became: faulted, backend_id, checks,
    skipped (see chaos_run.Done)."""
    rows = []
    for p in planned:
        d = done.get(p.index)
        if d is None:  # interrupted before it happened
            continue
        rows.append(
            account(
                p,
                rate=rate,
                outcomes=outcomes,
                events=events,
                samples=samples,
                faulted=d["faulted"] or p.target,
                backend_id=d["backend_id"],
                checks=d["checks"],
                skipped=d["skipped"],
            )
        )
    warmup = planned[0].at if planned else 0.0
    res = resources(procs, warmup)
    summ = summary(outcomes, rows, res)
    summ["errors_before_first_event"] = sum(1 for o in outcomes if o.t_send < warmup and not o.ok)
    summ["ok"] = summ["ok"] and summ["errors_before_first_event"] == 0
    del summ["errors_outside_events"]
    return {
        "mode": "chaos",
        "seed": seed,
        "minutes": round(duration / 60, 3),
        "rate": rate,
        "window_s": window,
        "warmup_s": warmup,
        "summary": summ,
        "events": rows,
        "windows": windows(outcomes, duration, window),
        "resources": res,
        "process_samples": list(procs),
        "schedule": [p.__dict__ for p in planned],
    }


def _f(v: Any) -> str:
    return "-" if v is None else str(v)


def to_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        f"# Chaos soak: {report['minutes']} min at {report['rate']} req/s (seed {report['seed']})",
        "",
        f"Verdict: **{'every expectation held' if s['ok'] else 'EXPECTATIONS FAILED'}**",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests | {s['requests']} |",
        f"| errors | {s['errors']} (before the first event: {s['errors_before_first_event']}) |",
        f"| latency p50 / p95 / p99 ms | {_f(s['p50_ms'])} / {_f(s['p95_ms'])} / "
        f"{_f(s['p99_ms'])} |",
        f"| events held | {s['events_held']} of {s['events']} |",
        f"| max RSS growth after warm-up | {_f(s['max_rss_growth_pct'])} % |",
    ]
    if s["events_failed"]:
        lines.append(f"| events failed | {', '.join(s['events_failed'])} |")
    if s["events_skipped"]:
        lines.append(f"| events skipped | {'; '.join(s['events_skipped'])} |")
    lines += [
        "",
        "## Events",
        "",
        "| # | t s | kind | target | requests | failed in flight | failed new conn | "
        "detect s | takeover s | recover s | held | conditions |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["events"]:
        conds = ", ".join(
            f"`{r['condition']}` ({r['measured']}{'' if r['ok'] else ' NO'})"
            for r in e["expectations"]
        )
        held = "skipped" if e["skipped"] else ("yes" if e["held"] else "**NO**")
        lines.append(
            f"| {e['index']} | {e['at_s']} | {e['kind']} | {e['target']} | {e['requests']} | "
            f"{e['failed_in_flight']} | {e['failed_new_connections']} | {_f(e['detect_s'])} | "
            f"{_f(e['takeover_s'])} | {_f(e['recover_s'])} | {held} | {conds or '-'} |"
        )
    lines += ["", "Documented windows:", ""]
    lines += [
        f"- **{k}**: {WINDOWS[k][0]}" for k in dict.fromkeys(e["kind"] for e in report["events"])
    ]
    lines += [
        "",
        "## Processes (RSS growth per incarnation, from its first sample after the warm-up)",
        "",
        "| process | incarnations | max RSS KiB | FDs min-max | RSS growth % |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["resources"].items():
        growth = ", ".join(f"{g['growth_pct']}" for g in r["rss_growth"]) or "-"
        lines.append(
            f"| {name} | {r['incarnations']} | {r['rss_kib_max']} | {r['fds_min']}-{r['fds_max']}"
            f" | {growth} |"
        )
    lines += ["", "## Windows", "", "| t s | requests | errors | p50 ms | p95 ms | p99 ms |"]
    lines.append("|---|---|---|---|---|---|")
    for w in report["windows"]:
        lines.append(
            f"| {w['t_s']} | {w['requests']} | {w['errors']} | {_f(w['p50_ms'])} | "
            f"{_f(w['p95_ms'])} | {_f(w['p99_ms'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    """PNG: requests/errors per window, latency p50/p95/p99, RSS and FDs per process,
    with a marker per event."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = report["windows"]
    t = [w["t_s"] for w in ws]
    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    axes[0].plot(t, [w["requests"] for w in ws], label="requests")
    axes[0].bar(
        t,
        [w["errors"] for w in ws],
        width=report["window_s"] * 0.8,
        align="edge",
        color="tab:red",
        label="errors",
    )
    axes[0].set_ylabel("per window")
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        axes[1].plot(t, [float("nan") if w[q] is None else w[q] for w in ws], label=q)
    axes[1].set_ylabel("latency ms")
    samples = report["process_samples"]
    for name in sorted({s["name"] for s in samples}):
        mine = [s for s in samples if s["name"] == name]
        axes[2].plot([s["t_s"] for s in mine], [s["rss_kib"] / 1024 for s in mine], label=name)
        axes[3].plot([s["t_s"] for s in mine], [s["fds"] for s in mine], label=name)
    axes[2].set_ylabel("RSS MiB")
    axes[3].set_ylabel("open fds")
    axes[3].set_xlabel("seconds since the start of traffic")
    for e in report["events"]:
        colour = "grey" if e["skipped"] else ("tab:green" if e["held"] else "tab:red")
        for ax in axes:
            ax.axvline(e["at_s"], color=colour, linestyle=":", linewidth=1)
        axes[0].annotate(
            f" {e['kind']}",
            (e["at_s"], 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=6,
            va="top",
            color=colour,
        )
    for ax in axes:
        ax.legend(loc="upper right", fontsize=6)
    fig.suptitle(
        f"chaos soak, {report['minutes']} min at {report['rate']} req/s "
        "(event markers: green held, red failed, grey skipped)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
