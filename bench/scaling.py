"""Throughput at 1, 2, 4 ... balancer workers, for a machine with cores to spare.

    python -m bench.scaling [--workers 1,2,4,8] [--duration 10] [--connections 256]
        [--load-cpus 0-3] [--proxy-cpus 4-11] [--json bench/results/scaling.json]

nginx (the backends) and wrk run on `--load-cpus`, the balancer (supervisor and workers)
on `--proxy-cpus`; keep the two apart or the load generator takes the cores the workers
should get (on this project's 2-core machine they cannot be apart: there it measures only
the CPU per request and the spread, see `make bench`). One row per worker count: requests
per second, CPU per request summed over every balancer process, and the spread of
requests over the workers. Expected on paper: throughput = workers x 1e6 / (CPU us per
request of one worker), until the load generator, the backends or the NIC saturate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import cpu, report, wrk
from bench.run import (
    BenchError,
    Pins,
    ensure_tools,
    proxy_argv,
    start_backends,
    validate,
    write_json,
)
from harness import Harness, StartError, free_ports, pinned

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


def _counts(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {value!r}") from None
    if not out or any(not 1 <= n <= 64 for n in out):
        raise argparse.ArgumentTypeError(f"worker counts must be 1..64, got {value!r}")
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=_counts, default=[1, 2, 4, 8])
    p.add_argument("--duration", type=int, default=10, help="measured seconds per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--threads", type=int, default=4, help="wrk threads")
    p.add_argument("--load-cpus", default=None, help="taskset list for nginx and wrk")
    p.add_argument("--proxy-cpus", default=None, help="taskset list for the balancer")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "scaling.json")
    args = p.parse_args(argv)
    if args.duration < 1 or args.connections < 1 or args.threads < 1 or args.warmup < 0:
        p.error("--duration, --connections and --threads must be >= 1, --warmup >= 0")
    return args


def worker_requests(admin_port: int) -> list[int]:
    url = f"http://127.0.0.1:{admin_port}/api/state"
    with urllib.request.urlopen(url, timeout=5) as resp:  # plain HTTP on loopback
        state = json.load(resp)
    return [int(w["requests"]) for w in state["workers"]] or [int(state["stats"]["requests_total"])]


def measure(n: int, args: argparse.Namespace, backends: list[int], h: Harness) -> dict[str, Any]:
    port, admin = free_ports(2)
    argv = proxy_argv("balancer", port, backends, None, h.workdir)
    argv += ["--workers", str(n), "--admin", f"127.0.0.1:{admin}"]
    child = h.child(f"balancer-w{n}", pinned(args.proxy_cpus, argv))
    url = f"http://127.0.0.1:{port}/"
    try:
        child.wait_listening(port, START_TIMEOUT_S)
        problem = validate(url, None)
        if problem:
            raise BenchError(problem)

        def load(seconds: int) -> wrk.WrkResult:
            cmd = wrk.wrk_command(
                url,
                duration_s=seconds,
                connections=args.connections,
                threads=args.threads,
                cpu=args.load_cpus,
            )
            out = subprocess.run(
                cmd, capture_output=True, text=True, timeout=seconds + 30, check=False
            )
            if out.returncode != 0:
                raise BenchError(f"wrk exited {out.returncode}: {out.stderr.strip()[-200:]}")
            return wrk.parse_wrk(out.stdout)

        if args.warmup:
            load(args.warmup)
        served_before = worker_requests(admin)
        before = cpu.read_tree_ticks(child.pid)
        result = load(args.duration)
        after = cpu.read_tree_ticks(child.pid)
        time.sleep(0.3)  # the workers' last reports
        served = [a - b for a, b in zip(worker_requests(admin), served_before, strict=True)]
        per_req = cpu.cpu_us_per_req(before, after, result.requests, cpu.CLK_TCK)
        return {
            "workers": n,
            "rps": round(result.rps, 1),
            "cpu_us_per_req": round(per_req, 2),
            "p99_ms": round(result.p99_ms, 3),
            "errors": result.errors,
            "worker_requests": served,
            "worker_spread_pct": report.spread_pct(served),
            # on paper: n workers, each one core, at this row's cost per request
            "expected_rps_if_cpu_bound": round(n * 1e6 / per_req, 0) if per_req else None,
        }
    except (StartError, BenchError, wrk.WrkParseError, OSError, ValueError) as exc:
        return {"workers": n, "error": str(exc) or type(exc).__name__}
    finally:
        child.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tools = ensure_tools(["balancer"])
        with Harness() as h:
            _, backends = start_backends(h, tools, 3, Pins(load=args.load_cpus, proxy=None))
            rows = [measure(n, args, backends, h) for n in args.workers]
    except BenchError as exc:
        print(f"bench.scaling: {exc}", file=sys.stderr)
        return 1
    print(f"{'workers':>7} {'rps':>9} {'cpu_us/req':>10} {'p99_ms':>8} {'spread%':>7}  expected")
    for r in rows:
        if "error" in r:
            print(f"{r['workers']:>7} ERROR: {r['error']}")
            continue
        print(
            f"{r['workers']:>7} {r['rps']:>9.0f} {r['cpu_us_per_req']:>10.1f} "
            f"{r['p99_ms']:>8.3f} {r['worker_spread_pct'] or 0:>7.1f}  "
            f"{r['expected_rps_if_cpu_bound'] or '-'}"
        )
    write_json(args.json, {"rows": rows, "connections": args.connections})
    print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
