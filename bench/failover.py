"""`make bench-failover`: keepalived vs our election, same topology, same run, same probes.

Topology (namespaces created here, deleted in `finally`, also on Ctrl-C/SIGTERM):

    a (10.213.0.1)  b (10.213.0.2)  c (10.213.0.10, client)  s (10.213.0.20, backends)
          \\              |                 |                   /
           +-------------- bridge br0 in namespace <prefix>-br --+

VIP 10.213.0.100/24 is held by whichever of a/b is active. The client in `c` starts a fresh
HTTP GET to the VIP every 10 ms; failover = event -> first answer from b.

- keepalived: keepalived in a (150) and b (100), unicast peers; an HTTP server (named a/b) on
  0.0.0.0:8080 in each host, so the VIP answers over HTTP wherever it is.
- balancer: `python -m balancer` in container mode (`--vip`) in a and b, backends in s.

Events: kill = link of a down + SIGKILL (the host dies; a SIGKILL alone leaves keepalived's VIP
on a live link), stop = SIGTERM (clean stop: both resign with priority 0).
Needs root, iproute2 (`ip netns`), keepalived and arping.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from bench.failover_core import (
    EVENTS,
    KeepalivedNode,
    Probe,
    Row,
    extract_failover,
    keepalived_master_down,
    parse_probe_log,
    render_keepalived,
    steady,
    table,
)
from bench.failover_netns import IFACE, PREFIX_LEN, SUBNET, NetnsError, Topology
from harness import Child, tail

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
VIP = f"{SUBNET}.100"
VIP_CIDR = f"{VIP}/{PREFIX_LEN}"
SERVICE_PORT = 8080
ELECTION_PORT = 7946
PRIORITY = {"a": 150, "b": 100}
STARTUP_BOUND_S = 30.0
FAILOVER_BOUND_S = 20.0


class BenchError(RuntimeError):
    pass


def ours_master_down(interval: float, priority: int) -> float:
    return 3 * interval + (256 - priority) / 256 * interval


class Bench:
    def __init__(self, topo: Topology, work: Path) -> None:
        self.topo = topo
        self.work = work
        self.daemons: list[Child] = []
        self.secret = work / "pair.secret"
        self.secret.write_text(os.urandom(16).hex() + "\n")
        self.secret.chmod(0o600)
        self.runs: list[dict[str, Any]] = []

    # processes ---------------------------------------------------------------------------
    def start(self, host: str, name: str, argv: list[str]) -> Child:
        # `ip netns exec` execs the command: the child's pid is the daemon's
        d = Child(name, self.topo.exec(host, argv), self.work / f"{name}.log", cwd=ROOT).start()
        self.daemons.append(d)
        return d

    def stop_all(self, daemons: list[Child]) -> None:
        for d in daemons:
            d.stop(grace=0.0)
            if d in self.daemons:
                self.daemons.remove(d)

    def wait_port(self, host: str, port: int, daemon: Child) -> None:
        code = (
            "import socket,sys,time\n"
            "for _ in range(300):\n"
            "    try:\n"
            f"        socket.create_connection(('{self.topo.addr(host)}', {port}), 0.2).close()\n"
            "        sys.exit(0)\n"
            "    except OSError:\n"
            "        time.sleep(0.05)\n"
            "sys.exit(1)\n"
        )
        res = subprocess.run(self.topo.exec(host, [PY, "-c", code]), timeout=30)
        if res.returncode != 0:
            raise BenchError(f"{daemon.name} did not listen on {port}:\n{tail(daemon.log, 8)}")

    def backend(self, host: str, port: int, name: str) -> Child:
        argv = [PY, "-m", "backends", "--host", "0.0.0.0", "--port", str(port), "--name", name]
        d = self.start(host, f"backend-{name}", argv)
        self.wait_port(host, port, d)
        return d

    # the two systems -----------------------------------------------------------------------
    def keepalived(self, host: str, interval: float, tag: str) -> Child:
        peer = "b" if host == "a" else "a"
        node = KeepalivedNode(
            name=f"lbfo_{host}",
            interface=IFACE,
            address=self.topo.addr(host),
            peer=self.topo.addr(peer),
            priority=PRIORITY[host],
            vip=VIP_CIDR,
            advert_interval=interval,
        )
        conf = self.work / f"keepalived-{host}.conf"
        conf.write_text(render_keepalived(node))
        run = self.work / f"run-{host}-{tag}"  # fresh: a SIGKILL leaves stale pid files
        run.mkdir()
        argv = ["keepalived", "-n", "-l", "-D", "-G", "-P", "-f", str(conf)]
        argv += ["-p", str(run / "keepalived.pid"), "-r", str(run / "vrrp.pid")]
        return self.start(host, f"keepalived-{host}-{tag}", argv)

    def balancer(self, host: str, interval: float, tag: str) -> Child:
        peer = "b" if host == "a" else "a"
        backend_port = 8001 if host == "a" else 8002
        argv = [PY, "-m", "balancer", "--listen", f"0.0.0.0:{SERVICE_PORT}"]
        argv += ["--backend", f"{self.topo.addr('s')}:{backend_port}"]
        argv += ["--vip", VIP_CIDR, "--vip-interface", IFACE]
        argv += ["--peer", f"{self.topo.addr(peer)}:{ELECTION_PORT}"]
        argv += ["--bind-election", f"{self.topo.addr(host)}:{ELECTION_PORT}"]
        argv += ["--priority", str(PRIORITY[host]), "--advert-interval", f"{interval:g}"]
        argv += ["--secret-file", str(self.secret)]
        return self.start(host, f"balancer-{host}-{tag}", argv)

    # one measurement ------------------------------------------------------------------------
    def measure(
        self,
        system: str,
        interval: float,
        event: str,
        rep: int,
        repeat: int,
        names: tuple[str, str],
        master_down: float,
    ) -> float:
        tag = f"{interval:g}-{event}-{rep}"
        for host in ("a", "b"):
            self.topo.reset_host(host, VIP_CIDR)
        self.topo.flush_neighbours("c")
        probe_log = self.work / f"probe-{system}-{tag}.log"
        probe = [PY, "-m", "bench.failover_probe", "--host", VIP, "--port", str(SERVICE_PORT)]
        probe += ["--every", "0.01", "--timeout", "0.5", "--max-seconds", "120"]
        prober = self.start("c", f"probe-{system}-{tag}", [*probe, "--out", str(probe_log)])
        start = self.keepalived if system == "keepalived" else self.balancer
        nodes = {host: start(host, interval, tag) for host in ("a", "b")}
        old, new = names

        def probes() -> list[Probe]:
            try:
                return parse_probe_log(probe_log.read_text())
            except OSError:
                return []

        try:
            # a (higher priority) holds the VIP; then let b hear a few adverts
            _wait(lambda: any(p.ok and p.backend == old for p in probes()), STARTUP_BOUND_S)
            settle_from = time.monotonic()
            time.sleep(master_down + 1.0)
            if not steady(probes(), old, settle_from, 20) or self.topo.has_addr("b", VIP):
                raise BenchError(f"{system}: a did not hold the VIP steadily before the event")
            for d in nodes.values():
                if not d.alive:
                    raise BenchError(f"{d.name} exited early:\n{tail(d.log, 8)}")
            # Adverts run on a schedule locked to the takeover we just waited for, so spread
            # the repetitions evenly over one advert cycle, at the same phases for both systems.
            phase = (rep + 0.5) / repeat * interval
            time.sleep(phase)
            event_at = time.monotonic()
            if event == "kill":
                self.topo.link("a", False)  # the host dies: no resign packet gets out
                nodes["a"].signal(signal.SIGKILL)
            else:
                nodes["a"].signal(signal.SIGTERM)
            _wait(
                lambda: any(p.ok and p.backend == new and p.end >= event_at for p in probes()),
                FAILOVER_BOUND_S,
            )
            time.sleep(0.3)
        except TimeoutError:
            tails = "\n".join(f"--- {d.name}\n{tail(d.log, 8)}" for d in nodes.values())
            raise BenchError(f"{system} {tag}: timed out\n{tails}") from None
        finally:
            prober.signal(signal.SIGTERM)
            try:
                prober.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.stop_all([prober, *nodes.values()])
        result = extract_failover(probes(), event_at, old, new)
        self.runs.append(
            {
                "system": system,
                "advert_interval": interval,
                "event": event,
                "rep": rep,
                "failover_s": round(result.failover_s, 4),
                "last_old_answer_s": None
                if result.last_old_s is None
                else round(result.last_old_s, 4),
                "failed_probes": result.failed_probes,
                "master_down_s": round(master_down, 4),
                "phase_s": round(phase, 4),
            }
        )
        return result.failover_s


def _wait(pred: Callable[[], bool], timeout: float, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    if not pred():
        raise TimeoutError


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGINT (even if inherited as ignored) unwind into the cleanup."""
    sigs = (signal.SIGTERM, signal.SIGINT)
    old = {sig: signal.signal(sig, _raise_interrupt) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in ("ip", "keepalived", "arping") if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install iproute2 keepalived iputils-arping"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--intervals", default="1,0.2", help="advert intervals (s), comma-separated")
    p.add_argument("--systems", default="keepalived,balancer")
    p.add_argument("--events", default=",".join(EVENTS))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "failover.json"))
    p.add_argument("--keep-logs", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    try:
        intervals = [float(x) for x in args.intervals.split(",")]
    except ValueError:
        print("bench-failover: --intervals must be numbers, e.g. 1,0.2", file=sys.stderr)
        return 2
    systems = args.systems.split(",")
    events = args.events.split(",")
    if (
        not 1 <= args.repeat <= 20
        or not all(0.01 <= i <= 10 for i in intervals)
        or not set(systems) <= {"keepalived", "balancer"}
        or not set(events) <= set(EVENTS)
    ):
        print("bench-failover: invalid --repeat/--intervals/--systems/--events", file=sys.stderr)
        return 2
    problem = preflight()
    if problem:
        print(f"bench-failover: {problem}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="lbfo-"))
    topo = Topology(f"lbfo-{os.getpid()}")
    bench = Bench(topo, work)
    rows: list[Row] = []
    try:
        with _interruptible():
            topo.create()
            for system in systems:
                if system == "keepalived":
                    # the VIP answers from whichever host holds it, on the service port
                    names = ("a", "b")
                    servers = [bench.backend(h, SERVICE_PORT, h) for h in ("a", "b")]
                else:
                    # the balancers own the service port; their backends live in s
                    names = ("via-a", "via-b")
                    servers = [bench.backend("s", 8001 + i, n) for i, n in enumerate(names)]
                for interval in intervals:
                    down = (
                        keepalived_master_down(interval, PRIORITY["b"])
                        if system == "keepalived"
                        else ours_master_down(interval, PRIORITY["b"])
                    )
                    for event in events:
                        samples = []
                        for rep in range(args.repeat):
                            took = bench.measure(
                                system, interval, event, rep, args.repeat, names, down
                            )
                            print(f"  {system} {interval:g}s {event} #{rep + 1}: {took:.3f} s")
                            samples.append(took)
                        rows.append(Row(system, interval, event, tuple(samples)))
                bench.stop_all(servers)
    except KeyboardInterrupt:
        print("bench-failover: interrupted, cleaning up", file=sys.stderr)
        return 130
    except (BenchError, NetnsError, ValueError, subprocess.TimeoutExpired) as exc:
        print(f"bench-failover: {exc}", file=sys.stderr)
        print(f"bench-failover: logs in {work}", file=sys.stderr)
        args.keep_logs = True
        return 1
    finally:
        bench.stop_all(list(bench.daemons))
        topo.destroy()
        if not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)

    # side by side: per interval and event, keepalived next to ours
    rows.sort(key=lambda r: (-r.advert_interval, r.event, r.system != "keepalived"))
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": "failover",
        "kernel": platform.release(),
        "keepalived": _keepalived_version(),
        "probe_every_s": 0.01,
        "rows": [r.as_dict() for r in rows],
        "runs": bench.runs,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _keepalived_version() -> str:
    res = subprocess.run(["keepalived", "--version"], capture_output=True, text=True, timeout=10)
    return (res.stdout + res.stderr).splitlines()[0].strip() if res.returncode == 0 else "?"


if __name__ == "__main__":
    sys.exit(main())
