"""HTTP/2 playbooks: `H2ClientSide` with recorded transport operations, a real h2 client as
the peer, the HTTP/1.1 backend side and pool of the HTTP/1.1 playbooks, a fake clock."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)

from balancer.http1.exchange import ListenerContext
from balancer.http2.client import H2ClientSide

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "http1"))
from playbook import Playbook, Recorder


class H2Client(Recorder, H2ClientSide):
    def __init__(self, ctx: ListenerContext) -> None:
        super().__init__(ctx)
        self.calls = []
        self.lost = False


@dataclass
class Response:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    interim: list[int] = field(default_factory=list)
    body: bytes = b""
    ended: bool = False
    reset: int | None = None
    trailers: list[tuple[bytes, bytes]] | None = None  # a trailing HEADERS frame's fields
    trailers_ended: bool = False  # that frame carried END_STREAM


def base(path: bytes = b"/a", method: bytes = b"GET") -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"https"), (b":path", path), (b":authority", b"x")]


class Peer:
    """An HTTP/2 client (h2) talking to one `H2ClientSide` through the playbook."""

    def __init__(self, pb: Playbook, *, auto_ack: bool = True, validate: bool = True) -> None:
        self.pb = pb
        self.side = H2Client(pb.ctx)
        self.side.opened(b"127.0.0.9", None)
        pb.clients.append(self.side)  # type: ignore[arg-type]  # settle() delivers closes
        cfg = H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=validate
        )
        self.h2 = H2Connection(cfg)
        self.h2.initiate_connection()
        self.auto_ack = auto_ack
        self.seen = 0
        self.responses: dict[int, Response] = {}
        self.goaway: ConnectionTerminated | None = None
        self.send()

    def send(self, raw: bytes = b"") -> None:
        data = self.h2.data_to_send() + raw
        if data:
            self.side.data_received(data)
        self.pb.settle()
        self.receive()

    def receive(self) -> None:
        out = self.side.written()
        new, self.seen = out[self.seen :], len(out)
        if not new or self.goaway is not None:
            return
        for ev in self.h2.receive_data(new):
            sid = getattr(ev, "stream_id", None)
            r = self.responses.setdefault(sid, Response()) if sid else None
            if isinstance(ev, ResponseReceived) and r is not None:
                r.headers = dict(ev.headers)
                r.status = int(r.headers[b":status"])
            elif isinstance(ev, InformationalResponseReceived) and r is not None:
                r.interim.append(int(dict(ev.headers)[b":status"]))
            elif isinstance(ev, DataReceived) and r is not None:
                r.body += ev.data
                if self.auto_ack:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, TrailersReceived) and r is not None:
                r.trailers = list(ev.headers)
                r.trailers_ended = ev.stream_ended is not None
            elif isinstance(ev, StreamEnded) and r is not None:
                r.ended = True
            elif isinstance(ev, StreamReset) and r is not None:
                r.reset = int(ev.error_code)
            elif isinstance(ev, ConnectionTerminated):
                self.goaway = ev
        pending = self.h2.data_to_send()
        if pending and not self.side.closed:
            self.side.data_received(pending)
            self.pb.settle()
            self.receive()

    def request(
        self,
        path: bytes = b"/a",
        *,
        method: bytes = b"GET",
        extra: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.responses[sid] = Response()
        self.h2.send_headers(sid, headers or base(path, method) + (extra or []), end_stream=end)
        self.send()
        return sid

    def body(self, sid: int, data: bytes, end: bool = False) -> None:
        self.h2.send_data(sid, data, end_stream=end)
        self.send()

    def reset(self, sid: int) -> None:
        self.h2.reset_stream(sid, 8)
        self.send()


def goaway_code(peer: Peer) -> int | None:
    return int(peer.goaway.error_code) if peer.goaway is not None else None


def ok(body: bytes = b"hi", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)
