"""Failover drills: fixed-rate traffic through the service while something is broken.

    python -m loadtest.drill kill-backend --local --json out.json [--md out.md] [--plot out.png]
    python -m loadtest.drill scale-backends --json out.json   # docker only
    python -m loadtest.drill kill-active-balancer --json out.json --expect 'failover_s<=1.0'

Each scenario has default expectations (conditions on the report, see loadtest/expect.py
and `default_expectations`); the drill exits 1 when one is false, 2 when it cannot run.
Without --local it acts only on the compose project COMPOSE_PROJECT_NAME (default
lbtestbed), and refuses when that project has no running container.

A drill = a `Target` (loadtest.targets; where the stack runs: `LocalTarget` starts a `LocalStack`,
`DockerTarget` drives the compose containers) + a `Scenario` (what to break, and how to
restore it). While traffic runs, every balancer's /api/state is polled every 100 ms; the
report (see loadtest/report.py for the metric definitions) is built from the outcomes,
the drill events and those samples.

Two scenarios do not fit "break, then restore": `restart-backend` is one action (stop and
start again) recorded as a stop event and a restart event, and `scale-backends` adds a
backend replica and removes it again; its report has `added_s`/`removed_s` on top.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import aiohttp

from balancer.lb.algorithms import ALGORITHMS
from harness.traffic import Outcome, run_traffic
from loadtest.expect import Expectation, ExpectError, evaluate, parse_all
from loadtest.netdrill import TcpPoint, impairment_for, sample_tcp, tcp_backends
from loadtest.ready import NotReady, settled_active, wait_ready
from loadtest.report import (
    DrillEvent,
    StateSample,
    build_report,
    fmt_value,
    plot,
    to_markdown,
)
from loadtest.targets import (
    DEFAULT_PROJECT,
    SCENARIOS,
    DockerTarget,
    DrillError,
    LocalTarget,
    Scenario,
    Target,
)

POLL_INTERVAL_S = 0.1
POLL_TIMEOUT_S = 0.5


# Default expectations: every target, then the extra ones of one target.
_NO_LOSS = ("failed_requests==0", "recover_s!=null")
_DEFAULT_EXPECT: dict[str, tuple[str, ...]] = {
    "kill-backend": _NO_LOSS,
    "stop-backend": _NO_LOSS,  # SIGTERM: the backend finishes what it has, nothing is lost
    "restart-backend": _NO_LOSS,
    "pause-backend": ("detect_s!=null", "recover_s!=null"),
    "disconnect-backend": ("detect_s!=null", "recover_s!=null"),
    "scale-backends": ("failed_requests==0", "added_s!=null", "removed_s!=null"),
    "kill-active-balancer": ("active_changed==true",),
    "stop-active-balancer": ("active_changed==true",),
    "pause-active-balancer": ("failover_s!=null",),
    "delay-backend": _NO_LOSS,  # slower, nothing fails
    "loss-backend": ("recover_s!=null",),  # TCP retransmits; a request may still time out
    "bandwidth-backend": ("recover_s!=null",),
}
_DEFAULT_EXPECT_BY_TARGET: dict[tuple[str, str], tuple[str, ...]] = {
    # the entry relay retries the VIP: the takeover is latency, not a refused connection
    ("kill-active-balancer", "docker"): ("failed_new_connections==0",),
    ("stop-active-balancer", "docker"): ("failed_new_connections==0",),
}


def default_expectations(scenario: str, target: str) -> list[str]:
    """The conditions a scenario's drill checks unless --no-expect is given."""
    return [
        *_DEFAULT_EXPECT.get(scenario, ()),
        *_DEFAULT_EXPECT_BY_TARGET.get((scenario, target), ()),
    ]


def _expect_help() -> str:
    lines = [
        "default expectations (--no-expect drops them; --expect adds to them):",
    ]
    for name in sorted(SCENARIOS):
        local = default_expectations(name, "local")
        docker = default_expectations(name, "docker")
        text = (
            " ".join(local)
            if local == docker
            else " ".join(docker) + "  (local: " + (" ".join(local) or "none") + ")"
        )
        lines.append(f"  {name:22} {text}")
    lines += [
        "",
        "a condition is KEY OP VALUE: KEY a report key or dotted path (latency.after.failed),",
        "OP one of == != <= >= < >, VALUE a number, null, true or false. A null measurement",
        "(nothing measured, e.g. failover_s when nothing failed over) passes only ==null/!=.",
    ]
    return "\n".join(lines)


# ---- pure helpers (no I/O) ---------------------------------------------------------------


def action_events(
    action: str, victim: str, t_start: float, t_end: float, detail: str, *, is_fault: bool
) -> list[DrillEvent]:
    """Events for one action. A restart *as the fault* is a stop at t_start and a restart
    at t_end, so the report's fault/restore metrics apply to it unchanged."""
    if is_fault and action == "restart":
        return [
            DrillEvent(t_start, "stop", victim, "restart: stopping"),
            DrillEvent(t_end, "restart", victim, detail),
        ]
    return [DrillEvent(t_start, action, victim, detail)]


def _first_event(events: list[DrillEvent], kind: str) -> DrillEvent | None:
    return min((e for e in events if e.kind == kind), key=lambda e: e.t, default=None)


def scale_summary(
    events: list[DrillEvent],
    samples: list[StateSample],
    outcomes: list[Outcome],
    name: str,
    backend_id: str | None,
) -> dict[str, Any]:
    """Metrics of an add + remove of one replica; times relative to the events.

    added_s: `add` -> the later of (a non-passive balancer shows it "up") and (the first
    2xx it served completed). removed_s: `remove` -> the first sample after which no
    reachable balancer lists it any more (drained and gone). None when never reached.
    """
    add, remove = _first_event(events, "add"), _first_event(events, "remove")
    served = [o for o in outcomes if o.ok and o.backend == name and o.latency is not None]
    out: dict[str, Any] = {
        "added_backend": name,
        "added_backend_id": backend_id,
        "served_by_added": len(served),
        "added_s": None,
        "removed_s": None,
    }
    if add is None or backend_id is None:
        return out
    ordered = sorted((s for s in samples if s.reachable), key=lambda s: s.t)
    t_up = next(
        (
            s.t
            for s in ordered
            if s.t >= add.t and s.role != "passive" and s.backends.get(backend_id) == "up"
        ),
        None,
    )
    first_served = min(
        (o.t_send + (o.latency or 0.0) for o in served if o.t_send >= add.t), default=None
    )
    if t_up is not None and first_served is not None:
        out["added_s"] = round(max(t_up, first_served) - add.t, 3)
    if remove is not None:
        after = [s for s in ordered if s.t >= remove.t]
        listed = [i for i, s in enumerate(after) if backend_id in s.backends]
        gone_from = listed[-1] + 1 if listed else 0
        if gone_from < len(after):
            out["removed_s"] = round(after[gone_from].t - remove.t, 3)
    return out


# ---- the run --------------------------------------------------------------------------


async def _poll_once(
    session: aiohttp.ClientSession, name: str, url: str, clock: Callable[[], float]
) -> StateSample:
    try:
        async with session.get(url + "/api/state") as resp:
            data = await resp.json()
        states = {str(b["id"]): str(b["state"]) for b in data.get("backends", [])}
        return StateSample(clock(), name, True, data.get("role"), states)
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError):
        return StateSample(clock(), name, False)


async def poll_states(
    admins: dict[str, str],
    samples: list[StateSample],
    clock: Callable[[], float],
    stop: asyncio.Event,
    max_polls: int,
) -> None:
    timeout = aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(max_polls):
            started = clock()
            samples.extend(
                await asyncio.gather(*(_poll_once(session, n, u, clock) for n, u in admins.items()))
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, POLL_INTERVAL_S - (clock() - started)))
            if stop.is_set():
                return


async def find_active(
    admins: dict[str, str], timeout: float = 10.0, confirm: int = 3, interval: float = 0.2
) -> str:
    """The active balancer, once `confirm` poll rounds in a row agree on it.

    One round is not enough: under CPU load a stalled active's peer can take over for a
    moment, and a drill that kills that peer kills the balancer that is about to go passive.
    """
    deadline = time.monotonic() + timeout
    seen: dict[str, str | None] = {}
    last, streak = None, 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        while time.monotonic() < deadline:
            samples = [await _poll_once(session, n, u, time.monotonic) for n, u in admins.items()]
            seen = {s.balancer: s.role for s in samples}
            active = settled_active(samples)
            streak = streak + 1 if active is not None and active == last else int(bool(active))
            last = active
            if last is not None and streak >= confirm:
                return last
            await asyncio.sleep(interval)
    raise DrillError(f"no single active balancer with a passive peer (roles seen: {seen})")


async def compose_ready(target: Target, timeout: float) -> float:
    """Wait (bounded) until the compose stack can take a drill's traffic (loadtest.ready):
    the pair settled, every backend up, the service answering through TLS. Seconds taken."""
    admins = target.admin_urls()
    ctx = ssl.create_default_context(cafile=target.ca_file)
    short = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=short) as session:

        async def poll() -> list[StateSample]:
            clock = time.monotonic
            return list(
                await asyncio.gather(*(_poll_once(session, n, u, clock) for n, u in admins.items()))
            )

        async def probe() -> bool:
            try:
                async with session.get(target.service_url, ssl=ctx) as resp:
                    await resp.read()
                    return resp.status == 200
            except (TimeoutError, aiohttp.ClientError, OSError):
                return False

        want = [target.backend_id(n) for n in target.backend_names()]
        try:
            return await wait_ready(poll, probe, want, timeout, asyncio.sleep)
        except NotReady as exc:
            raise DrillError(f"the compose stack is {exc}") from None


class Progress:
    """Counts outcomes; prints one line a second on stderr."""

    def __init__(self) -> None:
        self.sent = self.ok = self.failed = 0
        self.backends: Counter[str] = Counter()

    def add(self, o: Outcome) -> None:
        self.sent += 1
        if o.ok:
            self.ok += 1
            self.backends[o.backend or "-"] += 1
        else:
            self.failed += 1

    def line(self, t: float, samples: list[StateSample]) -> str:
        roles: dict[str, str] = {}
        for s in reversed(samples[-8:]):
            roles.setdefault(s.balancer, (s.role or "?") if s.reachable else "unreachable")
        per = " ".join(f"{b}={n}" for b, n in sorted(self.backends.items()))
        role = " ".join(f"{b}:{r}" for b, r in sorted(roles.items()))
        return f"[{t:5.1f}s] done {self.sent} ok {self.ok} failed {self.failed} | {per} | {role}"


async def run_drill(
    target: Target,
    scenario: Scenario,
    *,
    rate: float,
    duration: float,
    fault_at: float,
    restore_at: float,
    keepalive: bool = True,
    timeout: float = 2.0,
    stall_s: float = 1.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one drill on an already set-up target; return the report dict."""
    clock = time.monotonic
    admins = target.admin_urls()
    events: list[DrillEvent] = []
    samples: list[StateSample] = []
    backend_id = None
    if scenario.fault == "add":
        victim = target.extra_backend_name()
    elif scenario.kind == "backend":
        names = target.backend_names()
        victim = names[1] if len(names) > 1 else names[0]  # b2 locally
        backend_id = target.backend_id(victim)
    else:
        victim = await find_active(admins)
    stop = asyncio.Event()
    counter = Progress()
    max_polls = int((duration + timeout + 5) / POLL_INTERVAL_S) + 10
    poller = asyncio.create_task(poll_states(admins, samples, clock, stop, max_polls))
    tcp: list[TcpPoint] = []
    sampler = None
    if scenario.fault == "netem":  # what TCP did: /api/connections once a second
        sampler = asyncio.create_task(sample_tcp(admins, tcp, clock, stop, max_polls))
    t0 = clock()
    traffic = asyncio.create_task(
        run_traffic(
            target.service_url,
            rate,
            duration,
            ca_file=target.ca_file,
            keepalive=keepalive,
            timeout=timeout,
            clock=clock,
            on_outcome=counter.add,
        )
    )

    async def ticker() -> None:
        for _ in range(int(duration + timeout + 5)):
            await asyncio.sleep(1.0)
            print(counter.line(clock() - t0, samples), file=sys.stderr, flush=True)

    ticks = asyncio.create_task(ticker()) if progress else None

    async def act_at(at: float, action: str) -> None:
        nonlocal victim
        await asyncio.sleep(max(0.0, t0 + at - clock()))
        if scenario.kind == "balancer" and action == scenario.fault:
            # the pair may have moved since the drill began: fault the one active now
            victim = await find_active(admins, timeout=3.0, confirm=1)
        t = clock()
        try:
            # in a thread: docker stop/restart block for seconds, traffic must go on
            detail = await asyncio.to_thread(target.act, scenario.kind, victim, action)
        except Exception as exc:  # one failed action must not lose the whole recording
            detail = f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        is_fault = action == scenario.fault
        events.extend(action_events(action, victim, t, clock(), detail, is_fault=is_fault))
        if progress:
            print(f"[{t - t0:5.1f}s] {action} {victim}: {detail}", file=sys.stderr, flush=True)

    try:
        await act_at(fault_at, scenario.fault)
        if scenario.fault == "netem" and events and events[-1].detail.startswith("failed:"):
            # a network drill that could not impair anything has nothing to report
            raise DrillError(
                f"{scenario.name}: the impairment was not applied ({events[-1].detail})"
            )
        if scenario.restore is not None:
            await act_at(restore_at, scenario.restore)
        outcomes = await traffic
    finally:
        stop.set()
        await poller
        if sampler is not None:
            await sampler
        for task in (traffic, ticks):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    report = build_report(
        scenario=scenario.name,
        target=target.name,
        rate=rate,
        duration=duration,
        t0=t0,
        outcomes=outcomes,
        events=events,
        samples=samples,
        faulted=victim,
        backend_id=backend_id,
        stall_s=stall_s,
        kind=scenario.kind,
    )
    if sampler is not None:
        report["backends"] = tcp_backends(
            tcp, outcomes, t0=t0, t_fault=report["markers"]["fault"],
            t_restore=report["markers"]["restore"],
        )  # fmt: skip
    if scenario.fault == "add":
        extra_id = None
        with contextlib.suppress(KeyError):  # the add itself failed
            extra_id = target.backend_id(victim)
        rel_events = [DrillEvent(e.t - t0, e.kind, e.target, e.detail) for e in events]
        rel_samples = [
            StateSample(s.t - t0, s.balancer, s.reachable, s.role, s.backends) for s in samples
        ]
        rel_outcomes = [replace(o, t_send=o.t_send - t0) for o in outcomes]
        report |= scale_summary(rel_events, rel_samples, rel_outcomes, victim, extra_id)
    return report


# ---- command line ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m loadtest.drill",
        description="Break part of the stack under fixed-rate traffic and measure the impact.",
        epilog=_expect_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="start a LocalStack (default: docker)")
    where.add_argument("--docker", action="store_true", help="the compose stack (default)")
    p.add_argument("--json", required=True, metavar="OUT", help="write the JSON report here")
    p.add_argument("--md", metavar="OUT.md", help="also write a Markdown report")
    p.add_argument("--plot", metavar="OUT.png", help="also write a PNG plot")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of traffic (default 20)")
    p.add_argument("--fault-at", type=float, help="seconds into traffic (default 30%%)")
    p.add_argument("--restore-at", type=float, help="seconds into traffic (default 60%%)")
    p.add_argument("--timeout", type=float, default=2.0, help="per-request timeout (default 2)")
    p.add_argument("--stall", type=float, default=1.0, help="slower than this = bad (failover)")
    p.add_argument("--new-connections", action="store_true", help="no keep-alive: new conn each")
    p.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        help="the lb policy to drill under (local default round-robin; docker: both "
        "balancers are switched for the drill and back after; default: as they run)",
    )
    p.add_argument("--tls", action="store_true", help="local: HTTPS with a CA in --pki")
    p.add_argument("--pki", default="pki", help="local: CA directory for --tls (default ./pki)")
    p.add_argument("--check-interval", type=float, help="local: balancer check interval")
    p.add_argument("--workers", default="1", metavar="N|auto", help="local: balancer workers")
    p.add_argument("--delay-ms", type=float, default=50.0, help="delay-backend (default 50)")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="delay-backend (default 0)")
    p.add_argument("--loss-pct", type=float, default=5.0, help="loss-backend (default 5)")
    p.add_argument("--rate-kbit", type=int, default=1000, help="bandwidth-backend (default 1000)")
    p.add_argument(
        "--project",
        default=os.environ.get("COMPOSE_PROJECT_NAME") or DEFAULT_PROJECT,
        help="docker: the compose project to act on (default: $COMPOSE_PROJECT_NAME, "
        f"else {DEFAULT_PROJECT}); no other project's containers are touched",
    )
    p.add_argument("--service-url", default="https://localhost:8443", help="docker: service")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=90.0,
        help="docker: wait at most this long (s) for the stack to be ready before traffic",
    )
    p.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="COND",
        help="a condition on the report, e.g. failed_requests==0 or 'failover_s<=1.0' "
        "(repeatable); exit 1 when one is false",
    )
    p.add_argument("--no-expect", action="store_true", help="drop the default expectations")
    p.add_argument(
        "--max-failed", type=int, help="same as --expect 'failed_requests<=N' (kept for scripts)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _check_args(args: argparse.Namespace) -> tuple[float, float]:
    if not 0 < args.rate <= 20000:
        raise DrillError("--rate must be in (0, 20000]")
    if not 1 <= args.duration <= 3600:
        raise DrillError("--duration must be in [1, 3600] seconds")
    if args.timeout <= 0 or args.stall <= 0:
        raise DrillError("--timeout and --stall must be > 0")
    if not 0 < args.ready_timeout <= 600:
        raise DrillError("--ready-timeout must be in (0, 600] seconds")
    fault_at = args.fault_at if args.fault_at is not None else 0.3 * args.duration
    restore_at = args.restore_at if args.restore_at is not None else 0.6 * args.duration
    if not 0 <= fault_at < restore_at <= args.duration:
        raise DrillError("need 0 <= --fault-at < --restore-at <= --duration")
    return fault_at, restore_at


def expectations_for(args: argparse.Namespace) -> list[Expectation]:
    """Defaults (unless --no-expect), then --max-failed, then each --expect; ExpectError on
    the first bad one."""
    target = "local" if args.local else "docker"
    texts = [] if args.no_expect else default_expectations(args.scenario, target)
    if args.max_failed is not None:
        texts.append(f"failed_requests<={args.max_failed}")
    return parse_all([*texts, *args.expect])


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise DrillError(f"cannot write {path}: {exc.strerror}") from None


def _sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    try:
        expectations = expectations_for(args)
    except ExpectError as exc:
        print(f"drill: {exc}", file=sys.stderr)
        return 2
    target: Target
    if args.local:
        target = LocalTarget(
            algorithm=args.algorithm or "round-robin",
            tls=args.tls,
            pki_dir=Path(args.pki),
            check_interval=args.check_interval,
            workers=args.workers,
        )
    else:
        target = DockerTarget(
            project=args.project, service_url=args.service_url, algorithm=args.algorithm
        )
    if scenario.fault == "netem":
        try:
            target.impairment = impairment_for(
                args.scenario, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms,
                loss_pct=args.loss_pct, rate_kbit=args.rate_kbit,
            )  # fmt: skip
        except ValueError as exc:
            print(f"drill: {exc}", file=sys.stderr)
            return 2
    # SIGTERM takes the same clean path as Ctrl-C (the finally below stops the stack)
    old_sigterm = signal.signal(signal.SIGTERM, _sigterm)
    try:
        fault_at, restore_at = _check_args(args)
        for out in (args.json, args.md, args.plot):
            if out and not Path(out).resolve().parent.is_dir():
                raise DrillError(f"output directory does not exist: {out}")
        target.setup(scenario)
        if not args.local:  # right after `make up` the pair, checks and VIP are settling
            waited = asyncio.run(compose_ready(target, args.ready_timeout))
            if not args.quiet:
                print(f"drill: the stack is ready (waited {waited:.1f} s)", file=sys.stderr)
        target.prepare()
        report = asyncio.run(
            run_drill(
                target,
                scenario,
                rate=args.rate,
                duration=args.duration,
                fault_at=fault_at,
                restore_at=restore_at,
                keepalive=not args.new_connections,
                timeout=args.timeout,
                stall_s=args.stall,
                progress=not args.quiet,
            )
        )
    except DrillError as exc:
        print(f"drill: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("drill: interrupted; stack stopped, no report written", file=sys.stderr)
        return 130
    finally:
        target.teardown()
        signal.signal(signal.SIGTERM, old_sigterm)
    report["algorithm"] = target.algorithm
    rows = evaluate(report, expectations)
    report["expectations"] = rows
    report["expectations_met"] = all(r["ok"] for r in rows)
    try:
        _write(args.json, json.dumps(report, indent=2) + "\n")
        if args.md:
            _write(args.md, to_markdown(report))
        if args.plot:
            plot(report, args.plot)
    except DrillError as exc:
        print(f"drill: {exc}", file=sys.stderr)
        return 2
    keys = ["failed_requests", "failed_in_flight", "failed_new_connections"]
    keys += ["detect_s", "recover_s", "failover_s"]
    if scenario.fault == "add":
        keys = ["failed_requests", "added_s", "removed_s", "served_by_added"]
    summary = {k: report[k] for k in keys}
    print(f"drill {scenario.name}: {json.dumps(summary)} -> {args.json}", file=sys.stderr)
    for r in rows:
        verdict = "ok  " if r["ok"] else "FAIL"
        measured = fmt_value(r["measured"])
        print(f"drill: expect {verdict} {r['condition']} (measured {measured})", file=sys.stderr)
    return 0 if report["expectations_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
