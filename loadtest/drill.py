"""Failover drills: fixed-rate traffic through the service while something is broken.

    python -m loadtest.drill kill-backend --local --json out.json [--md out.md] [--plot out.png]

A drill = a `Target` (where the stack runs: `LocalTarget` starts a `LocalStack`,
`DockerTarget` drives the compose containers) + a `Scenario` (what to break, and how to
restore it). While traffic runs, every balancer's /api/state is polled every 100 ms; the
report (see loadtest/report.py for the metric definitions) is built from the outcomes,
the drill events and those samples.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import io
import json
import signal
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import aiohttp

from loadtest.local import LocalStack, StackError, free_port
from loadtest.report import DrillEvent, StateSample, build_report, plot, to_markdown
from loadtest.traffic import Outcome, run_traffic

POLL_INTERVAL_S = 0.1
POLL_TIMEOUT_S = 0.5


class DrillError(RuntimeError):
    """The drill could not run; the message is for the user as-is."""


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "backend" or "balancer"
    fault: str  # kill, stop, pause, disconnect
    restore: str | None  # restart, resume, reconnect, or None (stay broken)
    docker_only: bool = False


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("kill-backend", "backend", "kill", "restart"),
        Scenario("stop-backend", "backend", "stop", "restart"),
        Scenario("pause-backend", "backend", "pause", "resume"),
        Scenario("disconnect-backend", "backend", "disconnect", "reconnect", docker_only=True),
        Scenario("kill-active-balancer", "balancer", "kill", None),
        Scenario("stop-active-balancer", "balancer", "stop", None),
        Scenario("pause-active-balancer", "balancer", "pause", "resume"),
    )
}


class Target(abc.ABC):
    """Where the stack runs. Names: backends as in X-Backend, balancers as in admin_urls."""

    name = "target"
    service_url = ""
    ca_file: str | None = None

    @abc.abstractmethod
    def setup(self, scenario: Scenario) -> None: ...

    @abc.abstractmethod
    def teardown(self) -> None: ...

    @abc.abstractmethod
    def admin_urls(self) -> dict[str, str]: ...

    @abc.abstractmethod
    def backend_names(self) -> list[str]: ...

    @abc.abstractmethod
    def backend_id(self, name: str) -> str:
        """The backend's id in /api/state."""

    @abc.abstractmethod
    def act(self, kind: str, name: str, action: str) -> str:
        """Do `action` to backend/balancer `name`; return a short description."""


_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGTERM, "pause": signal.SIGSTOP}


class LocalTarget(Target):
    """A LocalStack on free loopback ports (a pair for balancer scenarios)."""

    name = "local"

    def __init__(
        self,
        *,
        algorithm: str = "round-robin",
        tls: bool = False,
        pki_dir: Path | None = None,
        check_interval: float | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.tls = tls
        self.pki_dir = pki_dir
        self.check_interval = check_interval
        self.stack: LocalStack | None = None

    def setup(self, scenario: Scenario) -> None:
        if scenario.docker_only:
            raise DrillError(f"scenario {scenario.name} needs the docker target")
        stack = LocalStack(
            algorithm=self.algorithm,
            tls=self.tls,
            pair=scenario.kind == "balancer",
            backend_ports=tuple(free_port() for _ in range(3)),
            listen_port=free_port(),
            admin_ports=(free_port(), free_port()),
            election_ports=(free_port(), free_port()),
            pki_dir=self.pki_dir,
            check_interval=self.check_interval,
        )
        self.stack = stack
        try:
            stack.start()
        except StackError as exc:
            raise DrillError(f"local stack did not start: {exc}") from None
        self.service_url = stack.service_url
        self.ca_file = stack.ca_file

    def teardown(self) -> None:
        if self.stack is not None:
            self.stack.stop()

    def _stack(self) -> LocalStack:
        if self.stack is None:
            raise DrillError("local target used before setup()")
        return self.stack

    def admin_urls(self) -> dict[str, str]:
        return self._stack().admin_urls

    def backend_names(self) -> list[str]:
        return [b.name for b in self._stack().backends]

    def backend_id(self, name: str) -> str:
        return self._stack().backend_id(self.backend_names().index(name))

    def act(self, kind: str, name: str, action: str) -> str:
        stack = self._stack()
        if kind == "backend":
            i = self.backend_names().index(name)
            if action == "restart":
                stack.restart_backend(i, wait=False)
                return f"restarted (pid {stack.backends[i].pid})"
            proc = stack.backends[i]
        else:
            if action == "restart":
                stack.restart_balancer(name)
                return f"restarted (pid {stack.balancer(name).pid})"
            proc = stack.balancer(name)
        sig = signal.SIGCONT if action == "resume" else _SIGNALS.get(action)
        if sig is None:
            raise DrillError(f"local target cannot {action}")
        pid = proc.pid
        proc.signal(sig)
        return f"{signal.Signals(sig).name} pid {pid}"


class DockerTarget(Target):
    """The compose stack (`make up`), driven with the Docker SDK.

    Containers are found by the compose labels: service `balancer-a`, `balancer-b` and the
    `backend` replicas. Traffic goes to the host entry port; admins are the published 9001/9002.
    """

    name = "docker"
    BALANCERS = ("balancer-a", "balancer-b")

    def __init__(
        self,
        *,
        project: str | None = None,
        service_url: str = "https://localhost:8443",
        admin_urls: dict[str, str] | None = None,
        backend_port: int = 8080,
    ) -> None:
        self.project = project
        self.service_url = service_url
        self._admin_urls = admin_urls or {
            "balancer-a": "http://127.0.0.1:9001",
            "balancer-b": "http://127.0.0.1:9002",
        }
        self.backend_port = backend_port
        self.client: Any = None
        self.containers: dict[str, Any] = {}  # name -> container
        self.backend_ids: dict[str, str] = {}
        self.network: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def setup(self, scenario: Scenario) -> None:
        try:
            import docker

            self.client = docker.from_env()  # type: ignore[attr-defined]
            self.client.ping()
        except Exception as exc:  # the SDK raises several unrelated types here
            raise DrillError(f"Docker is not reachable: {str(exc).splitlines()[0]}") from None
        label = "com.docker.compose.service"
        found = self.client.containers.list(all=True, filters={"label": label})
        if self.project:
            found = [c for c in found if c.labels.get("com.docker.compose.project") == self.project]
        for c in found:
            service = c.labels.get(label)
            if service in self.BALANCERS:
                self.containers[service] = c
        backends = sorted(
            (c for c in found if c.labels.get(label) == "backend"),
            key=lambda c: int(c.labels.get("com.docker.compose.container-number", "0")),
        )
        missing = [b for b in self.BALANCERS if b not in self.containers]
        if missing or not backends:
            raise DrillError(
                f"compose containers not found (missing {', '.join(missing) or 'backend'}); "
                "start the stack with `make up`"
            )
        for c in backends:
            name = c.attrs["Config"]["Hostname"]  # backends use $(hostname) as X-Backend
            self.containers[name] = c
            nets = c.attrs["NetworkSettings"]["Networks"]
            net_name = next((n for n in nets if n.endswith("lbnet")), None)
            if net_name is None:
                raise DrillError(f"backend {c.name} is not on the lbnet network")
            self.network = self.client.networks.get(net_name)
            self.backend_ids[name] = f"{nets[net_name]['IPAddress']}:{self.backend_port}"
        self.ca_file = self._fetch_ca(self.containers["balancer-a"])

    def _fetch_ca(self, container: Any) -> str:
        stream, _ = container.get_archive("/certs/ca.crt")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.extractfile("ca.crt")
            if member is None:
                raise DrillError("cannot read /certs/ca.crt from balancer-a")
            pem = member.read()
        self._tmp = tempfile.TemporaryDirectory(prefix="lb-drill-")
        path = Path(self._tmp.name) / "ca.crt"
        path.write_bytes(pem)
        return str(path)

    def teardown(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def admin_urls(self) -> dict[str, str]:
        return dict(self._admin_urls)

    def backend_names(self) -> list[str]:
        return list(self.backend_ids)

    def backend_id(self, name: str) -> str:
        return self.backend_ids[name]

    def act(self, kind: str, name: str, action: str) -> str:
        c = self.containers[name]
        if action == "kill":
            c.kill("SIGKILL")
        elif action == "stop":
            c.stop(timeout=10)
        elif action == "pause":
            c.pause()
        elif action == "resume":
            c.unpause()
        elif action == "restart":
            c.reload()
            if c.status == "running":
                c.restart(timeout=10)
            else:
                c.start()
        elif action == "disconnect":
            self.network.disconnect(c)
        elif action == "reconnect":
            self.network.connect(c, aliases=[c.labels.get("com.docker.compose.service", "")])
        else:
            raise DrillError(f"docker target cannot {action}")
        return f"{action} container {c.name}"


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


async def find_active(admins: dict[str, str], timeout: float = 10.0) -> str:
    """The one balancer whose role is active (or standalone, when alone)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, str | None] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        while time.monotonic() < deadline:
            samples = [await _poll_once(session, n, u, time.monotonic) for n, u in admins.items()]
            seen = {s.balancer: s.role for s in samples}
            active = [s.balancer for s in samples if s.role in ("active", "standalone")]
            if len(active) == 1:
                return active[0]
            await asyncio.sleep(0.2)
    raise DrillError(f"no single active balancer (roles seen: {seen})")


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
    if scenario.kind == "backend":
        names = target.backend_names()
        victim = names[1] if len(names) > 1 else names[0]  # b2 locally
        backend_id = target.backend_id(victim)
    else:
        victim = await find_active(admins)
    stop = asyncio.Event()
    counter = Progress()
    max_polls = int((duration + timeout + 5) / POLL_INTERVAL_S) + 10
    poller = asyncio.create_task(poll_states(admins, samples, clock, stop, max_polls))
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
        await asyncio.sleep(max(0.0, t0 + at - clock()))
        t = clock()
        try:
            detail = target.act(scenario.kind, victim, action)
        except Exception as exc:  # one failed action must not lose the whole recording
            detail = f"failed: {exc}"
        events.append(DrillEvent(t, action, victim, detail))
        if progress:
            print(f"[{t - t0:5.1f}s] {action} {victim}: {detail}", file=sys.stderr, flush=True)

    try:
        await act_at(fault_at, scenario.fault)
        if scenario.restore is not None:
            await act_at(restore_at, scenario.restore)
        outcomes = await traffic
    finally:
        stop.set()
        await poller
        for task in (traffic, ticks):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return build_report(
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
    )


# ---- command line ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m loadtest.drill",
        description="Break part of the stack under fixed-rate traffic and measure the impact.",
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
    p.add_argument("--algorithm", default="round-robin", help="local: balancer algorithm")
    p.add_argument("--tls", action="store_true", help="local: HTTPS with a CA in --pki")
    p.add_argument("--pki", default="pki", help="local: CA directory for --tls (default ./pki)")
    p.add_argument("--check-interval", type=float, help="local: balancer check interval")
    p.add_argument("--project", help="docker: compose project name (default: any)")
    p.add_argument("--service-url", default="https://localhost:8443", help="docker: service")
    p.add_argument("--max-failed", type=int, help="exit 1 when more requests than this failed")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _check_args(args: argparse.Namespace) -> tuple[float, float]:
    if not 0 < args.rate <= 20000:
        raise DrillError("--rate must be in (0, 20000]")
    if not 1 <= args.duration <= 3600:
        raise DrillError("--duration must be in [1, 3600] seconds")
    if args.timeout <= 0 or args.stall <= 0:
        raise DrillError("--timeout and --stall must be > 0")
    fault_at = args.fault_at if args.fault_at is not None else 0.3 * args.duration
    restore_at = args.restore_at if args.restore_at is not None else 0.6 * args.duration
    if not 0 <= fault_at < restore_at <= args.duration:
        raise DrillError("need 0 <= --fault-at < --restore-at <= --duration")
    return fault_at, restore_at


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
    target: Target
    if args.local:
        target = LocalTarget(
            algorithm=args.algorithm,
            tls=args.tls,
            pki_dir=Path(args.pki),
            check_interval=args.check_interval,
        )
    else:
        target = DockerTarget(project=args.project, service_url=args.service_url)
    # SIGTERM takes the same clean path as Ctrl-C (the finally below stops the stack)
    old_sigterm = signal.signal(signal.SIGTERM, _sigterm)
    try:
        fault_at, restore_at = _check_args(args)
        for out in (args.json, args.md, args.plot):
            if out and not Path(out).resolve().parent.is_dir():
                raise DrillError(f"output directory does not exist: {out}")
        target.setup(scenario)
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
    try:
        _write(args.json, json.dumps(report, indent=2) + "\n")
        if args.md:
            _write(args.md, to_markdown(report))
        if args.plot:
            plot(report, args.plot)
    except DrillError as exc:
        print(f"drill: {exc}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("failed_requests", "detect_s", "recover_s", "failover_s")}
    print(f"drill {scenario.name}: {json.dumps(summary)} -> {args.json}", file=sys.stderr)
    if args.max_failed is not None and report["failed_requests"] > args.max_failed:
        print(
            f"drill: {report['failed_requests']} failed > --max-failed {args.max_failed}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
