"""Memory cost of idle keep-alive client connections, and their reclamation.

`python -m bench.idle_conns [--connections 10000]` starts one backend and one
balancer, opens N client connections that each make one request and then stay
idle, and reads the balancer's RSS from /proc before, while they are open, and
after the idle keep-alive timeout has reclaimed them. Writes
bench/results/idle_conns.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from harness import HOST, Harness
from harness.procs import proc_fds, proc_rss_kib

REQUEST = b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n"


async def open_idle(host: str, port: int, n: int, batch: int = 50) -> list[asyncio.StreamWriter]:
    """Open n connections, one request each; keep them open. Bounded by n and a timeout."""
    writers: list[asyncio.StreamWriter] = []

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response: {head[:40]!r}")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        return writer

    async with asyncio.timeout(300):
        for start in range(0, n, batch):
            writers += await asyncio.gather(*(one() for _ in range(min(batch, n - start))))
    return writers


async def wait_closed_by_server(writers: list[asyncio.StreamWriter], limit: float) -> int:
    """Count connections the server closed (EOF) within `limit` seconds."""
    deadline = time.monotonic() + limit
    closed = 0
    for w in writers:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        transport = w.transport
        if transport.is_closing():
            closed += 1
            continue
        reader = w._protocol._stream_reader  # type: ignore[attr-defined]
        try:
            async with asyncio.timeout(remaining):
                if await reader.read(1) == b"":
                    closed += 1
        except TimeoutError:
            break
    return closed


def measure(n: int, idle_timeout: float, workers: int = 1) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 200
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))
    host = HOST
    with Harness() as h:
        b1 = h.backend("b1")
        lb = h.balancer(
            *("--listen", f"{HOST}:0", "--backend", b1.address, "--no-checks"),
            *("--timeout-idle-keepalive", str(idle_timeout)),
            *(("--workers", str(workers), "--admin", f"{HOST}:0") if workers > 1 else ()),
        )
        lport = lb.port
        time.sleep(0.5)
        rss_before = proc_rss_kib(lb.pid)
        fds_before = proc_fds(lb.pid)
        pids = [int(w["pid"]) for w in lb.state()["workers"]] if workers > 1 else []

        def per_worker() -> list[dict[str, Any]]:
            rows = {int(w["pid"]): w for w in lb.state()["workers"]} if pids else {}
            return [
                {
                    "pid": pid,
                    "rss_kib": proc_rss_kib(pid),
                    "connections_open": rows.get(pid, {}).get("connections_open"),
                }
                for pid in pids
            ]

        workers_before = per_worker()

        async def run() -> dict[str, Any]:
            t0 = time.monotonic()
            writers = await open_idle(host, lport, n)
            opened_s = time.monotonic() - t0
            await asyncio.sleep(1.0)
            rss_open = proc_rss_kib(lb.pid)
            fds_open = proc_fds(lb.pid)
            workers_open = per_worker()
            closed = await wait_closed_by_server(writers, idle_timeout + 5)
            await asyncio.sleep(1.0)
            for w in writers:
                w.close()
            return {
                "opened_s": round(opened_s, 2),
                "rss_open_kib": rss_open,
                "fds_open": fds_open,
                "reclaimed_by_idle_timeout": closed,
                "rss_after_reclaim_kib": proc_rss_kib(lb.pid),
                "fds_after_reclaim": proc_fds(lb.pid),
                "workers_open": workers_open,
                "workers_after_reclaim": per_worker(),
            }

        out = asyncio.run(run())
    per_conn = (out["rss_open_kib"] - rss_before) * 1024 / n
    return {
        "connections": n,
        "idle_timeout_s": idle_timeout,
        "rss_before_kib": rss_before,
        "fds_before": fds_before,
        **out,
        "bytes_per_idle_connection": round(per_conn),
        # --workers N: the numbers above are the supervisor's; each worker's are here
        "workers": workers,
        "workers_before": workers_before,
        **_per_worker_cost(workers_before, out.get("workers_open", [])),
    }


def _per_worker_cost(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes per idle connection in each worker (its RSS growth over the connections it
    holds)."""
    if not before:
        return {}
    costs = []
    for b, o in zip(before, now, strict=False):
        held = o.get("connections_open") or 0
        costs.append(round((o["rss_kib"] - b["rss_kib"]) * 1024 / held) if held else None)
    return {"bytes_per_idle_connection_per_worker": costs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle_conns", description=__doc__)
    p.add_argument("--connections", type=int, default=10000)
    p.add_argument("--idle-timeout", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=1, help="balancer worker processes")
    p.add_argument("--json", type=Path, default=Path("bench/results/idle_conns.json"))
    args = p.parse_args(argv)
    if not 1 <= args.connections <= 15000:
        print("idle_conns: --connections must be 1..15000", file=sys.stderr)
        return 2
    if not 1 <= args.workers <= 64:
        print("idle_conns: --workers must be 1..64", file=sys.stderr)
        return 2
    result = measure(args.connections, args.idle_timeout, args.workers)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
