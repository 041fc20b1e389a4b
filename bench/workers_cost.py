"""What `--workers N` costs per request, process by process (issue #15's CPU bar).

    python -m bench.workers_cost instructions --workers 2 --requests 6000
    python -m bench.workers_cost cpu --workers 2 --seconds 8

`instructions`: callgrind over the supervisor and every worker (valgrind
--trace-children), Python backends, 8 keep-alive connections: the instructions of N
requests after a warm-up, minus each process's idle rate (measured first, 3 s) times the
load's duration. Instructions do not see the caches the workers share, nor other load on
the machine: they say whether the code path itself costs more. The idle rate is the
periodic work (reports, pushes, sweeps) in instructions per second.

`cpu`: CPU time per request of each process under wrk (64 keep-alive connections, one
thread) with nginx backends, pinned as `bench.run` pins them (proxy on one CPU, wrk and
nginx on the other), and each process's context switches per request.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench import configs
from bench.cpu import CLK_TCK, parse_proc_stat
from bench.run import choose_pins
from bench.wrk import WrkParseError, parse_wrk
from harness import Harness
from harness.procs import free_ports, pinned, wait_until

IDLE_S = 3.0
WARMUP_REQUESTS = 800
CONNECTIONS = 8


class CostError(Exception):
    """A setup problem: one line on stderr, exit 2."""


def _get_loop(port: int, count: int, connections: int = CONNECTIONS) -> None:
    """`count` GETs over `connections` keep-alive connections (threads); each must be 200."""
    errors: list[str] = []

    def run(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for _ in range(k):
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}")
                    return
        except OSError as exc:
            errors.append(str(exc))
        finally:
            conn.close()

    threads = [
        threading.Thread(target=run, args=(count // connections,)) for _ in range(connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise CostError(f"load failed: {errors[0]}")


def _answers(port: int) -> Callable[[], bool]:
    def ok() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/")
            status = conn.getresponse().status
            conn.close()
            return status == 200
        except OSError:
            return False

    return ok


def _tree(pid: int) -> list[int]:
    """The supervisor and its workers (its direct children)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [pid, *(int(p) for p in out.split())]


def _callgrind_totals(out_dir: Path, pids: list[int], dump: int) -> dict[int, int]:
    totals: dict[int, int] = {}
    for pid in pids:
        path = out_dir / f"cg.{pid}.{dump}"
        for _ in range(100):  # a dump is written by the process itself: bounded wait
            if path.exists() and "totals:" in path.read_text(errors="replace"):
                break
            time.sleep(0.1)
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                totals[pid] = int(line.split()[1])
                break
        else:
            raise CostError(f"no callgrind totals for pid {pid} in {path}")
    return totals


def instructions(workers: int, requests: int) -> str:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise CostError("needs valgrind (apt-get install valgrind)")
    with Harness() as h:
        out_dir = h.workdir / "callgrind"
        out_dir.mkdir(parents=True)
        a, b = h.backend("a"), h.backend("b")
        (port,) = free_ports(1)
        argv = [
            *("valgrind", "--tool=callgrind", "--trace-children=yes"),
            f"--callgrind-out-file={out_dir}/cg.%p",
            *(sys.executable, "-m", "balancer", "--listen", f"127.0.0.1:{port}"),
            *("--backend", a.address, "--backend", b.address, "--no-checks"),
            *("--workers", str(workers)),
        ]
        lb = h.child("lb", argv)
        if not wait_until(_answers(port), 240):
            raise CostError("the balancer under callgrind did not answer within 240 s")
        _get_loop(port, WARMUP_REQUESTS)
        time.sleep(1.0)
        pids = _tree(lb.pid)

        def control(flag: str) -> None:
            for pid in pids:
                subprocess.run(["callgrind_control", flag, str(pid)], capture_output=True)

        control("-z")
        time.sleep(IDLE_S)
        control("-d")
        idle = _callgrind_totals(out_dir, pids, 1)
        control("-z")
        started = time.monotonic()
        _get_loop(port, requests)
        took = time.monotonic() - started
        control("-d")
        busy = _callgrind_totals(out_dir, pids, 2)
    rate = {p: idle[p] / IDLE_S for p in pids}
    net = {p: (busy[p] - rate[p] * took) / requests for p in pids}
    lines = [f"--workers {workers}: {requests} requests in {took:.1f} s under callgrind"]
    serving = pids[1:] if workers > 1 else pids
    if workers > 1:
        # it serves no request: all it does is periodic, so per second, not per request
        # (under callgrind a request takes ~50x longer, so per request it would be inflated)
        lines.append(
            f"  supervisor {busy[pids[0]] / took / 1e6:.2f}M instructions/s under load, "
            f"idle {rate[pids[0]] / 1e6:.2f}M/s"
        )
    for i, pid in enumerate(serving):
        name = f"worker {i}" if workers > 1 else "process"
        lines.append(
            f"  {name:<10} {net[pid]:>9,.0f} instructions/request (its idle rate, "
            f"{rate[pid] / 1e6:.2f}M/s, taken off)"
        )
    lines.append(f"  serving    {sum(net[p] for p in serving):>9,.0f} instructions/request")
    return "\n".join(lines)


def cpu(workers: int, seconds: int) -> str:
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise CostError(f"needs {tool} on PATH")
    pins = choose_pins()
    with Harness() as h:
        h.workdir.mkdir(parents=True, exist_ok=True)
        port, b1, b2 = free_ports(3)
        conf = h.workdir / "nginx.conf"
        conf.write_text(configs.nginx_config(h.workdir, [b1, b2]))
        nginx = h.child(
            "nginx",
            pinned(
                pins.load,
                [
                    "nginx",
                    "-p",
                    str(h.workdir),
                    "-c",
                    str(conf),
                    "-e",
                    str(h.workdir / "nginx.err"),
                ],
            ),
            cwd=None,
        )
        nginx.wait_listening(b1, 10)
        argv = [sys.executable, "-m", "balancer", "--listen", f"127.0.0.1:{port}"]
        argv += ["--backend", f"127.0.0.1:{b1}", "--backend", f"127.0.0.1:{b2}"]
        lb = h.child("lb", pinned(pins.proxy, [*argv, "--workers", str(workers)]))
        if not wait_until(_answers(port), 30):
            raise CostError("the balancer did not answer within 30 s")
        time.sleep(1.0)
        pids = _tree(lb.pid)
        wrk = pinned(pins.load, ["wrk", "-t1", "-c64", "--latency", f"http://127.0.0.1:{port}/"])
        subprocess.run([*wrk, "-d2"], capture_output=True, timeout=30)  # warm-up

        def sample() -> dict[int, tuple[int, int]]:
            out = {}
            for pid in pids:
                ticks = parse_proc_stat(Path(f"/proc/{pid}/stat").read_text()).ticks
                status = Path(f"/proc/{pid}/status").read_text().splitlines()
                switches = sum(int(s.split()[1]) for s in status if "ctxt_switches" in s)
                out[pid] = (ticks, switches)
            return out

        before = sample()
        run = subprocess.run(
            [*wrk, f"-d{seconds}"], capture_output=True, text=True, timeout=seconds + 60
        )
        after = sample()
    try:
        served = parse_wrk(run.stdout).requests
    except WrkParseError as exc:
        raise CostError(f"wrk: {exc}") from None
    names = (
        ["supervisor", *(f"worker {i}" for i in range(len(pids) - 1))]
        if workers > 1
        else ["process"]
    )
    lines = [f"--workers {workers}: {served} requests in {seconds} s ({served / seconds:.0f}/s)"]
    total = 0.0
    for name, pid in zip(names, pids, strict=True):
        us = (after[pid][0] - before[pid][0]) / CLK_TCK * 1e6 / served
        switches = (after[pid][1] - before[pid][1]) / served
        total += us
        lines.append(
            f"  {name:<10} {us:6.2f} us CPU/request, {switches:.4f} context switches/request"
        )
    lines.append(f"  total      {total:6.2f} us CPU/request")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.workers_cost", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="what", required=True)
    ins = sub.add_parser("instructions", help="callgrind instructions per request, per process")
    ins.add_argument("--workers", type=int, default=2)
    ins.add_argument("--requests", type=int, default=6000)
    c = sub.add_parser("cpu", help="CPU time per request under wrk, per process")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--seconds", type=int, default=8)
    args = p.parse_args(argv)
    if not 1 <= args.workers <= 16:
        p.error("--workers must be 1 to 16")
    count = args.requests if args.what == "instructions" else args.seconds
    if count < (CONNECTIONS if args.what == "instructions" else 1):
        p.error("--requests must be at least 8, --seconds at least 1")
    try:
        if args.what == "instructions":
            print(instructions(args.workers, args.requests))
        else:
            print(cpu(args.workers, args.seconds))
    except (CostError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"workers_cost: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
