"""A small blocking HTTP/2 client (h2) for tests, Locust and attack drills (loopback only).

`H2Conn` opens one connection (TLS with ALPN h2, verified against our CA, or h2c with
prior knowledge) and sends many streams on it at once. Every wait is bounded by a deadline;
`raw` sends hand-made frames for the attack tests.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field
from types import TracebackType

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

IO_TIMEOUT = 5.0


@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, if the stream was reset
    trailers: dict[str, str] = field(default_factory=dict)  # a trailing HEADERS frame's

    @property
    def backend(self) -> str | None:
        return self.headers.get("x-backend")


class H2Conn:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca_file: str | None = None,
        server_name: str = "localhost",
        validate: bool = True,
        use_system_ca: bool = False,
        settings: dict[SettingCodes, int] | None = None,
        timeout: float = IO_TIMEOUT,
        source: str | None = None,
        proxy_header: bytes = b"",
    ) -> None:
        src = (source, 0) if source is not None else None
        sock = socket.create_connection((host, port), timeout=timeout, source_address=src)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if proxy_header:  # a PROXY protocol header, before any TLS
            sock.sendall(proxy_header)
        if ca_file is not None or use_system_ca:
            ctx = ssl.create_default_context(cafile=ca_file)  # verified, always
            ctx.set_alpn_protocols(["h2"])
            sock = ctx.wrap_socket(sock, server_hostname=server_name)
            if sock.selected_alpn_protocol() != "h2":
                sock.close()
                raise ConnectionError("the server did not choose h2 in ALPN")
        self.sock = sock
        self.timeout = timeout
        cfg = H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=validate
        )
        self.h2 = H2Connection(cfg)
        if settings:  # in the first SETTINGS frame (assigning values would wait for an ACK)
            self.h2.local_settings = Settings(client=True, initial_values=settings)
        self.h2.initiate_connection()
        self.authority = f"{server_name}:{port}".encode()
        self.scheme = b"https" if ca_file is not None or use_system_ca else b"http"
        self.replies: dict[int, Reply] = {}
        self.goaway: int | None = None  # the GOAWAY error code once one arrived
        self.goaway_last: int | None = None
        self.closed = False
        self.flush()

    def __enter__(self) -> H2Conn:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.raw(data)

    def raw(self, data: bytes) -> bool:
        """Send bytes as they are; False once the server has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False

    def send(
        self,
        path: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> int:
        sid = self.h2.get_next_available_stream_id()
        head = [
            (b":method", method.encode()),
            (b":scheme", self.scheme),
            (b":path", path.encode()),
            (b":authority", self.authority),
            *(headers or []),
        ]
        self.replies[sid] = Reply()
        self.h2.send_headers(sid, head, end_stream=body is None)
        if body is not None:
            self._send_body(sid, body)
        self.flush()
        return sid

    def _send_body(self, sid: int, body: bytes) -> None:
        view = memoryview(body)
        deadline = time.monotonic() + self.timeout
        while True:
            h2 = self.h2
            n = min(len(view), h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
            if n > 0 or not view:
                h2.send_data(sid, bytes(view[:n]), end_stream=n == len(view))
                view = view[n:]
                self.flush()
                if not view:
                    return
                deadline = time.monotonic() + self.timeout  # bounded per wait, not in total
            elif time.monotonic() > deadline or not self.pump(deadline - time.monotonic()):
                raise TimeoutError("the flow-control window stayed shut")

    def pump(self, timeout: float) -> bool:
        """Read once (at most `timeout` seconds) and handle what came; False on EOF/timeout."""
        self.sock.settimeout(max(0.01, timeout))
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, OSError):
            return False
        if not data:
            self.closed = True
            return False
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.closed = True
            return False
        for ev in events:
            r = self.replies.get(getattr(ev, "stream_id", 0) or 0)
            if isinstance(ev, ResponseReceived) and r is not None:
                hdrs = {n.decode(): v.decode("latin-1") for n, v in ev.headers}
                r.headers = hdrs
                r.status = int(hdrs[":status"])
            elif isinstance(ev, DataReceived):
                if r is not None:
                    r.body += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, TrailersReceived) and r is not None:
                r.trailers = {n.decode(): v.decode("latin-1") for n, v in ev.headers}
            elif isinstance(ev, StreamEnded) and r is not None:
                r.ended = True
            elif isinstance(ev, StreamReset) and r is not None:
                r.reset = int(ev.error_code)
            elif isinstance(ev, ConnectionTerminated):
                self.goaway = int(ev.error_code or 0)
                self.goaway_last = ev.last_stream_id
        self.flush()
        return True

    def wait(self, sids: list[int], timeout: float | None = None) -> list[Reply]:
        """Read until these streams ended or were reset (bounded by `timeout`)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline and not self.closed:
            if all(self.replies[s].ended or self.replies[s].reset is not None for s in sids):
                break
            self.pump(deadline - time.monotonic())
        return [self.replies[s] for s in sids]

    def wait_goaway(self, timeout: float | None = None) -> int | None:
        """Read until a GOAWAY or EOF (bounded); the GOAWAY's error code, if one came."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.goaway is None and not self.closed and time.monotonic() < deadline:
            self.pump(deadline - time.monotonic())
        return self.goaway

    def get(self, paths: list[str], timeout: float | None = None) -> list[Reply]:
        """GET every path as its own stream, all at once on this connection."""
        return self.wait([self.send(p) for p in paths], timeout)
