"""Closed-loop load generator for full TLS handshakes: one request per new connection.

wrk and h2load both resume TLS sessions on reconnect (HAProxy reports 100% session
reuse under them), so they measure resumptions, not handshakes. This client never
offers a session, so every connection is a full handshake; it verifies the server
certificate against the bench CA.

    python -m bench.handshake_load --url https://127.0.0.1:8443/ --cafile ca.pem \
        --connections 64 --duration 10

Prints one JSON object: requests, duration_s, rps, p50_ms, p99_ms, socket_errors, non_2xx_3xx.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.wrk import WrkResult
from harness.traffic import percentile

IO_TIMEOUT_S = 5.0
MAX_RESPONSE_BYTES = 1 << 16


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    socket_errors: int = 0
    non_2xx_3xx: int = 0

    def summary(self, duration_s: float) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        return {
            "requests": len(lat),
            "duration_s": round(duration_s, 3),
            "rps": round(len(lat) / duration_s, 1) if duration_s > 0 else 0.0,
            "p50_ms": round(p50, 3) if (p50 := percentile(lat, 50)) is not None else None,
            "p99_ms": round(p99, 3) if (p99 := percentile(lat, 99)) is not None else None,
            "socket_errors": self.socket_errors,
            "non_2xx_3xx": self.non_2xx_3xx,
        }


def status_ok(head: bytes) -> bool:
    """True for a 2xx/3xx HTTP/1.x status line (the same rule wrk uses)."""
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1][:1] in (b"2", b"3")


def parse_summary(text: str) -> WrkResult:
    """Turn this tool's JSON line into the same result type as a wrk run."""
    try:
        data = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ValueError("handshake load generator printed no JSON summary") from None
    if data.get("p50_ms") is None or data.get("p99_ms") is None:
        raise ValueError("no successful handshakes")
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=float(data["duration_s"]),
        rps=float(data["rps"]),
        p50_ms=float(data["p50_ms"]),
        p99_ms=float(data["p99_ms"]),
        socket_errors=int(data["socket_errors"]),
        non_2xx_3xx=int(data["non_2xx_3xx"]),
    )


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """The whole response (the server closes after it), capped at MAX_RESPONSE_BYTES."""
    chunks: list[bytes] = []
    size = 0
    while size < MAX_RESPONSE_BYTES:
        chunk = await reader.read(MAX_RESPONSE_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _one(host: str, port: int, ctx: ssl.SSLContext, request: bytes, tally: Tally) -> None:
    started = time.perf_counter()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host),
            IO_TIMEOUT_S,
        )
        writer.write(request)
        data = await asyncio.wait_for(_read_to_eof(reader), IO_TIMEOUT_S)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        if not data:
            raise ConnectionError("closed before a response")
    except (OSError, TimeoutError, ssl.SSLError, ConnectionError):
        tally.socket_errors += 1
        return
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), IO_TIMEOUT_S)
    tally.latencies_ms.append(elapsed_ms)
    if not status_ok(data):
        tally.non_2xx_3xx += 1


async def drive(url: str, cafile: str, connections: int, duration_s: float) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or not parts.port:
        raise ValueError(f"expected https://HOST:PORT/..., got {url!r}")
    host, port = parts.hostname, parts.port
    ctx = ssl.create_default_context(cafile=cafile)  # verification on
    ctx.set_alpn_protocols(["http/1.1"])
    path = parts.path or "/"
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    tally = Tally()
    deadline = time.monotonic() + duration_s
    started = time.monotonic()

    async def worker() -> None:
        # Bounded by the deadline; each attempt is bounded by IO_TIMEOUT_S.
        while time.monotonic() < deadline:
            await _one(host, port, ctx, request, tally)

    await asyncio.gather(*(worker() for _ in range(connections)))
    return tally.summary(time.monotonic() - started)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.handshake_load", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0)
    args = p.parse_args(argv)
    if args.connections < 1 or args.duration <= 0:
        p.error("--connections and --duration must be positive")

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            summary = runner.run(drive(args.url, args.cafile, args.connections, args.duration))
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"handshake_load: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
