"""The answer of the plain-HTTP listener that sends everyone to HTTPS (308).

Parsed with httptools like every other request, so the redirect listener has no parser of
its own: it answers once the head is complete, and refuses what llhttp refuses.
"""

from __future__ import annotations

import httptools

from balancer.http1.head import error_response

MAX_HEAD = 16384


class Redirect:
    """Feed bytes; `answer` is set once the request head is complete or unacceptable."""

    def __init__(self, https_port: int) -> None:
        self.https_port = https_port
        self.parser = httptools.HttpRequestParser(self)
        self.target = b""
        self.host = b""
        self.size = 0
        self.answer: bytes | None = None

    def feed(self, data: bytes) -> bytes | None:
        if self.answer is not None:
            return self.answer
        self.size += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the head is complete; what follows is not ours to read
        except httptools.HttpParserError:
            self.answer = error_response(400, "malformed request")
            return self.answer
        if self.answer is None and self.size > MAX_HEAD:
            self.answer = error_response(431, "request head too large")
        return self.answer

    # httptools callbacks ------------------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            self.host = value.strip()

    def on_headers_complete(self) -> None:
        self.answer = self._redirect()

    def _redirect(self) -> bytes:
        host = self.host  # without the port; an IPv6 literal keeps its brackets
        host = host[: host.find(b"]") + 1] if host.startswith(b"[") else host.rsplit(b":", 1)[0]
        if not host or any(c in host for c in b" \t\r\n/\\@"):
            return error_response(400, "missing Host")
        target = self.target if self.target.startswith(b"/") else b"/"
        port = b"" if self.https_port == 443 else b":%d" % self.https_port
        location = b"https://" + host + port + target
        return (
            b"HTTP/1.1 308 Permanent Redirect\r\nLocation: "
            + location
            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
