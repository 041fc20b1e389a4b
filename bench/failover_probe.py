"""HTTP prober run inside the client namespace by bench/failover.py.

Starts a fresh GET (new TCP connection) every `--every` seconds, each with its own timeout,
so a probe stuck on a dead address does not delay the next one. One line per probe
(`START END STATUS BACKEND`, CLOCK_MONOTONIC, which network namespaces share), flushed at once.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from typing import TextIO

from bench.failover_core import Probe

MAX_IN_FLIGHT = 200


async def probe_once(host: str, port: int, timeout: float) -> tuple[int, str]:
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
    except TimeoutError:
        return 0, "timeout"
    except ConnectionRefusedError:
        return 0, "refused"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return 0, "error"
    finally:
        if writer is not None:
            writer.close()
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    backend = "-"
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "x-backend" and value.strip():
            backend = value.strip().split()[0]
    return status, backend


async def run(host: str, port: int, every: float, timeout: float, limit: float, out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        start = time.monotonic()
        status, backend = await probe_once(host, port, timeout)
        out.write(Probe(start, time.monotonic(), status, backend).line() + "\n")
        out.flush()

    deadline = time.monotonic() + limit
    next_at = time.monotonic()
    try:
        while not done.is_set() and time.monotonic() < deadline:
            if len(tasks) < MAX_IN_FLIGHT:
                task = loop.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_at += every
            delay = next_at - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(done.wait(), delay)
                except TimeoutError:
                    pass
            else:
                next_at = time.monotonic()  # fell behind: do not burst to catch up
        if tasks:
            await asyncio.wait(tasks, timeout=timeout + 1)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.failover_probe")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--every", type=float, default=0.01, help="seconds between probe starts")
    p.add_argument("--timeout", type=float, default=0.5, help="per-probe timeout (s)")
    p.add_argument("--max-seconds", type=float, default=120, help="hard stop (s)")
    p.add_argument("--out", required=True, help="file for probe lines")
    args = p.parse_args(argv)
    if not (0 < args.every <= 10 and 0 < args.timeout <= 30 and 0 < args.max_seconds <= 3600):
        print("failover_probe: --every/--timeout/--max-seconds out of range", file=sys.stderr)
        return 2
    with open(args.out, "a", encoding="utf-8") as out:
        return asyncio.run(
            run(args.host, args.port, args.every, args.timeout, args.max_seconds, out)
        )


if __name__ == "__main__":
    sys.exit(main())
