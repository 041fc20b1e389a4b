"""Shared fixtures for the CA tests: run the CLI as a subprocess, serve TLS with a CertStore.

Only fixtures (no `from conftest import`): several conftest.py files share that module name.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeAlias

import pytest

from balancer.tls.store import CertStore

REPO = Path(__file__).resolve().parents[2]
IO_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 5.0


def _facts(sslobj: ssl.SSLObject | None) -> tuple[str, str]:
    """(TLS version, cipher) of the connection, for the response body."""
    if sslobj is None:
        return "", ""
    cipher = sslobj.cipher()
    return sslobj.version() or "", cipher[0] if cipher else ""


CLI: TypeAlias = Callable[..., "subprocess.CompletedProcess[str]"]


def _run_ca(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ca", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def run_ca() -> CLI:
    """`run_ca("issue", "--dir", d, ...)` runs `python -m ca` in the repo; CompletedProcess."""
    return _run_ca


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    res = _run_ca("init", "--dir", d)
    assert res.returncode == 0, res.stderr
    return d


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP/1.1 response per connection; the body is '<version> <cipher>'."""
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        body = (" ".join(_facts(writer.get_extra_info("ssl_object"))) + "\n").encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def tls_server() -> AsyncIterator[Callable[[CertStore], Awaitable[int]]]:
    """Start an HTTPS server on 127.0.0.1 terminating TLS with `store.context`; returns port."""
    servers: list[asyncio.Server] = []

    async def start(store: CertStore) -> int:
        server = await asyncio.start_server(
            _handle, "127.0.0.1", 0, ssl=store.context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
        )
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()
