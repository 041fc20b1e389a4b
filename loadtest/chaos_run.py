"""The chaos soak's driver: a LocalStack pair over TLS under steady load while the
schedule of `loadtest.chaos` breaks and restores its parts; records outcomes, drill
events, /api/state samples and each process's RSS and FDs.

Every action runs in a worker thread (a restart waits, bounded, for readiness) so the
traffic goes on; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509

from harness.procs import StartError, proc_fds, proc_rss_kib
from harness.stack import LocalStack
from harness.traffic import Outcome, run_traffic
from loadtest.chaos import DELAY_MS, KINDS, Planned
from loadtest.drill import POLL_INTERVAL_S, Progress, poll_states
from loadtest.netem import Impairment, NetemUnavailable, apply_local, clear_local, impaired
from loadtest.report import DrillEvent, StateSample

SERIAL_WAIT_S = 10.0  # the cert watcher polls every second
ACTIVE_WAIT_S = 10.0
CONFIG = """# written by the chaos soak: reload-config toggles backend_max_idle (a live setting)
[limits]
backend_max_idle = {idle}
"""
IDLE_VALUES = (128, 96)


def netns_usable() -> str | None:
    """None when the delayed backend can get its own namespace; else why not."""
    if os.geteuid() != 0:
        return "not root: no network namespace for the delayed backend"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "ip/tc (iproute2) not installed"
    return None


def make_stack(workdir: Path, *, netns: bool) -> LocalStack:
    """The soak's stack: three backends (b3 in its own namespace when `netns`), a pair,
    TLS with a CA of its own, and a configuration file for reloads."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "balancer.toml"
    config.write_text(CONFIG.format(idle=IDLE_VALUES[0]))
    return LocalStack.ephemeral(
        pair=True,
        tls=True,
        workdir=workdir,
        pki_dir=workdir / "pki",
        balancer_args=("--config", str(config)),
        netns_backends=(2,) if netns else (),
    )


def served_serial(stack: LocalStack) -> int | None:
    """The serial of the certificate the service serves now (verified against our CA)."""
    ctx = ssl.create_default_context(cafile=stack.ca_file)
    try:
        with (
            socket.create_connection((stack.host, stack.service_port), timeout=2.0) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return None if der is None else x509.load_der_x509_certificate(der).serial_number


def _poll(fn: Callable[[], Any], ok: Callable[[Any], bool], seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    value = fn()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = fn()
    return value


@dataclass
class Done:
    """What one event became: who was hit, the checks, a skip reason."""

    faulted: str = ""
    backend_id: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


class Actions:
    """The fault and restore of each kind on a LocalStack (blocking; run in a thread)."""

    def __init__(self, stack: LocalStack, config: Path) -> None:
        self.stack = stack
        self.config = config
        self.reloads = 0

    def _backend(self, name: str) -> int:
        return [b.name for b in self.stack.backends].index(name)

    def active(self) -> str:
        def find() -> str | None:
            roles = {b.name: b.role() for b in self.stack.balancers if b.alive}
            act = [n for n, r in roles.items() if r == "active"]
            return act[0] if len(act) == 1 else None

        name = _poll(find, lambda v: v is not None, ACTIVE_WAIT_S)
        if name is None:
            raise RuntimeError("no single active balancer")
        return str(name)

    def fault(self, p: Planned, done: Done) -> tuple[str, str]:
        """Do the fault; returns (event kind, detail)."""
        who, action, _ = KINDS[p.kind]
        stack = self.stack
        if who == "backend":
            i = self._backend(p.target)
            done.faulted, done.backend_id = p.target, stack.backend_id(i)
            if action == "delay":
                ns = stack.namespaces.get(i)
                if ns is None:
                    done.skipped = netns_usable() or f"{p.target} has no namespace"
                    return "note", f"delay skipped: {done.skipped}"
                try:
                    info = apply_local(ns.host_if, Impairment(delay_ms=DELAY_MS, jitter_ms=10))
                except NetemUnavailable as exc:
                    done.skipped = str(exc)
                    return "note", f"delay skipped: {exc}"
                done.checks["delay_applied"] = impaired(ns.host_if)
                done.checks["impairment"] = {"method": info["method"], "delay_ms": DELAY_MS}
                return "delay", f"{info['method']} {DELAY_MS:g}ms on {ns.host_if}"
            bsig = {"kill": signal.SIGKILL, "stop": signal.SIGTERM, "pause": signal.SIGSTOP}[action]
            pid = stack.backends[i].pid
            stack.kill_backend(i, bsig)
            return action, f"{bsig.name} pid {pid}"
        if action == "renew":
            done.faulted = "a+b"
            before = _poll(lambda: served_serial(stack), lambda v: v is not None, 5.0)
            line = stack.renew_cert()
            after = _poll(
                lambda: served_serial(stack), lambda v: v not in (None, before), SERIAL_WAIT_S
            )
            done.checks["serial_changed"] = before is not None and after not in (None, before)
            done.checks["serial_before"] = None if before is None else f"{before:x}"
            done.checks["serial_after"] = None if after is None else f"{after:x}"
            return "renew", line
        if action == "reload":
            done.faulted = "a+b"
            self.reloads += 1
            idle = IDLE_VALUES[self.reloads % 2]
            self.config.write_text(CONFIG.format(idle=idle))
            results = {}
            for b in stack.balancers:
                status, body = b.post_reload()
                results[b.name] = {"status": status, **body}
            done.checks["reload"] = results
            done.checks["reload_applied"] = all(
                r["status"] == 200 and any("backend_max_idle" in a for a in r["applied"])
                for r in results.values()
            )
            return "reload", f"backend_max_idle={idle}"
        name = self.active()
        done.faulted = name
        sig = signal.SIGKILL if action == "kill" else signal.SIGTERM
        pid = stack.balancer(name).pid
        stack.kill_balancer(name, sig)
        return action, f"{sig.name} pid {pid} (active)"

    def restore(self, p: Planned, done: Done) -> tuple[str, str]:
        who, _, restore = KINDS[p.kind]
        stack = self.stack
        if done.skipped:
            return "note", "nothing to restore"
        if who == "backend":
            i = self._backend(p.target)
            if restore == "undelay":
                ns = stack.namespaces[i]
                cleared = clear_local(ns.host_if)
                done.checks["delay_cleared"] = cleared and not impaired(ns.host_if)
                return "undelay", f"impairment cleared on {ns.host_if}"
            if restore == "resume":
                stack.kill_backend(i, signal.SIGCONT)
                return "resume", f"SIGCONT pid {stack.backends[i].pid}"
            try:
                stack.restart_backend(i, wait=True)
            except StartError as exc:
                return "restart", f"failed: {str(exc).splitlines()[0]}"
            return "restart", f"pid {stack.backends[i].pid}"
        try:
            stack.restart_balancer(done.faulted, wait=True)
            done.checks["restart_ready"] = True
        except StartError as exc:
            done.checks["restart_ready"] = False
            return "restart", f"failed: {str(exc).splitlines()[0]}"
        return "restart", f"pid {stack.balancer(done.faulted).pid}"


@dataclass
class Recorded:
    """The run's raw material, times in seconds from the start of traffic."""

    outcomes: list[Outcome]
    events: list[DrillEvent]
    samples: list[StateSample]
    procs: list[dict[str, Any]]
    done: dict[int, Done]
    duration: float


def sample_procs(stack: LocalStack, t: float) -> list[dict[str, Any]]:
    rows = []
    for proc in stack.procs:
        pid = proc.pid
        if pid is None or not proc.alive:
            continue
        with contextlib.suppress(OSError, RuntimeError):
            rss, fds = proc_rss_kib(pid), proc_fds(pid)
            rows.append(
                {"t_s": round(t, 1), "name": proc.name, "pid": pid, "rss_kib": rss, "fds": fds}
            )
    return rows


async def run_chaos(
    stack: LocalStack,
    planned: list[Planned],
    config: Path,
    *,
    rate: float,
    duration: float,
    window: float,
    timeout: float = 2.0,
) -> Recorded:
    clock = time.monotonic
    actions = Actions(stack, config)
    events: list[DrillEvent] = []
    samples: list[StateSample] = []
    procs: list[dict[str, Any]] = []
    done: dict[int, Done] = {}
    counter = Progress()
    stop = asyncio.Event()
    max_polls = int((duration + timeout + 60) / POLL_INTERVAL_S)
    poller = asyncio.create_task(poll_states(stack.admin_urls, samples, clock, stop, max_polls))
    t0 = clock()
    traffic = asyncio.create_task(
        run_traffic(
            stack.service_url,
            rate,
            duration,
            ca_file=stack.ca_file,
            timeout=timeout,
            clock=clock,
            on_outcome=counter.add,
        )
    )

    async def sampler() -> None:
        for _ in range(int(duration / window) + 10):
            procs.extend(await asyncio.to_thread(sample_procs, stack, clock() - t0))
            print(f"soak {counter.line(clock() - t0, samples)}", file=sys.stderr, flush=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), window)
            if stop.is_set():
                return

    sampling = asyncio.create_task(sampler())

    async def step(p: Planned, which: str) -> None:
        d = done.setdefault(p.index, Done())
        t = clock()
        fn = actions.fault if which == "fault" else actions.restore
        try:
            kind, detail = await asyncio.to_thread(fn, p, d)
        except Exception as exc:  # one failed action must not lose the whole recording
            kind, detail = (
                "note",
                f"{which} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}",
            )
        events.append(DrillEvent(t, kind, d.faulted or p.target, detail))
        print(
            f"soak [{t - t0:7.1f}s] #{p.index} {p.kind} {which}: {kind} "
            f"{d.faulted or p.target}: {detail}",
            file=sys.stderr,
            flush=True,
        )

    try:
        for p in planned:
            await asyncio.sleep(max(0.0, t0 + p.at - clock()))
            await step(p, "fault")
            if p.restore_at is not None:
                await asyncio.sleep(max(0.0, t0 + p.restore_at - clock()))
                await step(p, "restore")
        outcomes = await traffic
    finally:
        stop.set()
        for task in (traffic, poller, sampling):
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return Recorded(
        outcomes=[replace(o, t_send=o.t_send - t0) for o in outcomes],
        events=[DrillEvent(e.t - t0, e.kind, e.target, e.detail) for e in events],
        samples=[
            StateSample(s.t - t0, s.balancer, s.reachable, s.role, s.backends) for s in samples
        ],
        procs=procs,
        done=done,
        duration=duration,
    )
