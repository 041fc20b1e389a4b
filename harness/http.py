"""Small blocking HTTP(S) probes for readiness checks and test clients (loopback only)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

IO_TIMEOUT = 5.0  # every single socket operation


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    host: str,
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    ctx: ssl.SSLContext | None = None,
    timeout: float = IO_TIMEOUT,
) -> Answer:
    """One request on a fresh connection (never through an HTTP proxy from the environment).
    With `ctx` it is HTTPS, verified by that context. Raises OSError/HTTPException."""
    conn: http.client.HTTPConnection
    if ctx is None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        resp = conn.getresponse()
        return Answer(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def probe(
    host: str,
    port: int,
    path: str,
    *,
    ctx: ssl.SSLContext | None = None,
    header: tuple[str, str] | None = None,
    timeout: float = 1.0,
) -> str | None:
    """None if `path` answers 200 (and carries `header` = (name, value) if given), else why
    not. The shape `Child.wait_ready` wants."""
    try:
        ans = request(host, port, path, ctx=ctx, timeout=timeout)
    except ssl.SSLCertVerificationError as exc:
        return f"certificate not trusted: {exc.verify_message}"
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    if ans.status != 200:
        return f"{path} answered HTTP {ans.status}"
    if header is not None and ans.headers.get(header[0]) != header[1]:
        return (
            f"{path} answered with {header[0]}: {ans.headers.get(header[0])!r}, not {header[1]!r}"
        )
    return None


def slow_download_across(
    host: str,
    port: int,
    n: int,
    at_head: Callable[[], None],
    *,
    mss: int = 536,
    rcvbuf: int = 8 * 1024,
    read: int = 16 * 1024,
    pause_s: float = 0.01,
    timeout: float = 2 * IO_TIMEOUT,
) -> tuple[bytes, int]:
    """GET /bytes?n=N as a slow reader with small kernel buffers, call `at_head()` once the
    response head has arrived (e.g. SIGTERM the server: the body is then in flight), read the
    rest slowly until EOF. Returns (head, body bytes received).

    The smallest MSS an IPv4 peer must accept and a small receive buffer keep the server's
    send buffer small, so the tail of the body waits in the server process, where a stop
    that exits too early loses it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(f"GET /bytes?n={n} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(read)
            if not chunk:
                raise ConnectionError(f"closed before the response head: {data!r}")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        received = len(body)
        at_head()
        while chunk := sock.recv(read):
            received += len(chunk)
            time.sleep(pause_s)
    return head, received
