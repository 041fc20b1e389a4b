"""The JSON access log, and the global client-connection limit."""

import asyncio
import json
from pathlib import Path
from typing import Any

from balancer.config import BackendSpec, Limits
from harness import run_backend


async def test_access_log_writes_one_json_line_per_request(
    start_balancer: Any, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    async with run_backend("b1") as backend:
        bal = await start_balancer([BackendSpec(backend.host, backend.port)], access_log=str(log))
        host, port = bal.address
        reader, writer = await asyncio.open_connection(host, port)
        for path in (b"/echo?x=1", b"/status/503"):
            writer.write(b"GET %s HTTP/1.1\r\nHost: t\r\nX-Request-Id: rid-1\r\n\r\n" % path)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["path"] for entry in lines] == ["/echo?x=1", "/status/503"]
    first = lines[0]
    assert first["status"] == 200 and lines[1]["status"] == 503
    assert first["method"] == "GET" and first["client"] == "127.0.0.1"
    assert first["backend"] == f"{backend.host}:{backend.port}"
    assert first["request_id"] == "rid-1" and first["retries"] == 0
    assert first["bytes_out"] > 0 and first["duration_ms"] >= 0 and first["ts"] > 0


async def test_connections_beyond_the_limit_get_503_with_retry_after(
    start_balancer: Any,
) -> None:
    async with run_backend("b1") as backend:
        bal = await start_balancer(
            [BackendSpec(backend.host, backend.port)],
            limits={"max_client_connections": 2},
        )
        assert isinstance(bal.cfg.limits, Limits)
        host, port = bal.address
        held = [await asyncio.open_connection(host, port) for _ in range(2)]
        reader, writer = await asyncio.open_connection(host, port)
        reply = await asyncio.wait_for(reader.read(), 5)  # answered, then closed
        assert reply.startswith(b"HTTP/1.1 503")
        assert b"Retry-After: 1" in reply
        writer.close()
        # the held connections are still served
        r, w = held[0]
        w.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await r.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
        for _, w in held:
            w.close()
