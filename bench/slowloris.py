"""Slowloris: does normal traffic stay fast while 500 connections dribble their headers?

`python -m bench.slowloris [--slow 500]` starts one backend and one balancer on
loopback, measures p50/p99 of fixed-rate normal traffic (baseline), then again
while N connections each send a partial request head one byte per second, and
counts how many of those the header timeout closed (with 408). Target: p99 under
attack within 2x the baseline. Writes bench/results/slowloris.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from harness import HOST, Harness
from harness.traffic import percentile, run_traffic


async def slow_client(host: str, port: int, stop: asyncio.Event) -> str:
    """Send a head one byte a second until the server closes us or we are told to stop."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: slow\r\n")
    try:
        for _ in range(600):  # bounded: 10 minutes at most
            if stop.is_set():
                return "open"
            writer.write(b"x")  # a header name that never ends
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(64), 1.0)
            except TimeoutError:
                continue
            return "408" if data.startswith(b"HTTP/1.1 408") else "closed"
        return "open"
    except (ConnectionError, OSError):
        return "closed"
    finally:
        writer.close()


def summary(outcomes: list[Any]) -> dict[str, Any]:
    lat = [o.latency * 1000 for o in outcomes if o.ok and o.latency is not None]
    return {
        "requests": len(outcomes),
        "errors": sum(1 for o in outcomes if not o.ok),
        "p50_ms": round(percentile(lat, 50) or 0.0, 3),
        "p99_ms": round(percentile(lat, 99) or 0.0, 3),
    }


async def _slow_swarm(host: str, port: int, n: int, seconds: float) -> list[str]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(slow_client(host, port, stop)) for _ in range(n)]
    await asyncio.sleep(seconds)
    stop.set()
    return [r if isinstance(r, str) else "error" for r in await asyncio.gather(*tasks)]


def _swarm_process(host: str, port: int, n: int, seconds: float, out: Any) -> None:
    out.put(asyncio.run(_slow_swarm(host, port, n, seconds)))


def attack(url: str, host: str, port: int, n: int, rate: float, seconds: float) -> Any:
    """The slow clients run in their own process: sharing the measuring client's event
    loop would add their wake-ups to the latencies we are trying to measure."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    swarm = ctx.Process(target=_swarm_process, args=(host, port, n, seconds + 3.0, results))
    swarm.start()
    try:
        time.sleep(2.0)  # let them all connect and start dribbling
        outcomes = asyncio.run(run_traffic(url, rate, seconds))
        slow = results.get(timeout=seconds + 30)
    finally:
        swarm.join(10)
        if swarm.is_alive():
            swarm.kill()
    return outcomes, slow


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.slowloris", description=__doc__)
    p.add_argument("--slow", type=int, default=500, help="slow connections (1..5000)")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--header-timeout", type=float, default=5.0)
    p.add_argument("--json", type=Path, default=Path("bench/results/slowloris.json"))
    args = p.parse_args(argv)
    if not 1 <= args.slow <= 5000 or not 0 < args.seconds <= 120:
        print("slowloris: --slow 1..5000 and --seconds (0, 120]", file=sys.stderr)
        return 2
    with Harness() as h:
        b1 = h.backend("b1")
        lb = h.balancer(
            *("--listen", f"{HOST}:0", "--backend", b1.address, "--no-checks"),
            *("--timeout-client-header", str(args.header_timeout)),
        )
        url = lb.url + "/"
        baseline = summary(asyncio.run(run_traffic(url, args.rate, args.seconds)))
        outcomes, slow = attack(url, HOST, lb.port, args.slow, args.rate, args.seconds)
    under = summary(outcomes)
    result = {
        "slow_connections": args.slow,
        "rate": args.rate,
        "seconds": args.seconds,
        "header_timeout_s": args.header_timeout,
        "baseline": baseline,
        "under_attack": under,
        "p99_ratio": round(under["p99_ms"] / baseline["p99_ms"], 2) if baseline["p99_ms"] else None,
        "slow_closed_with_408": sum(1 for r in slow if r == "408"),
        "slow_closed_other": sum(1 for r in slow if r == "closed"),
        "slow_still_open": sum(1 for r in slow if r == "open"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
