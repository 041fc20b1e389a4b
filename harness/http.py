"""Small blocking HTTP(S) probes for readiness checks and test clients (loopback only)."""

from __future__ import annotations

import http.client
import json
import ssl
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
