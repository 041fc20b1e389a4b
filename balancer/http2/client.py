"""The client side of HTTP/2: one accepted connection, many streams, each one exchange.

Rules:
- h2 (through `balancer.http2.fastconn`) does the framing, stream states and flow control;
  this class turns its events into streams (`balancer.http2.stream.Stream`), each scheduled
  by the cluster on its own, so round robin spreads one connection's streams over backends.
  Upstream stays HTTP/1.1 over the listener's `ConnectionPool`.
- Output is batched like HTTP/1.1 (`Output`): streams queue, and once per loop turn `flush`
  frames what the client's windows allow and writes it in one piece. While the transport
  is paused nothing more is framed; streams then pause their own backends (OUT_HIGH).
- Defences, each ending in GOAWAY with its code (h2 itself refuses a bad preface,
  CONTINUATION floods, HPACK bombs and oversized header lists): rapid reset (more than
  RESET_FLOOR streams reset by the client before their response ended, and at least half
  of all), control-frame floods (SETTINGS, PING, PRIORITY, empty DATA: more than
  CONTROL_PER_SECOND per second), a write buffer the client never drains.
- Too many streams: a stream past MAX_STREAMS open is refused alone (RST_STREAM
  REFUSED_STREAM, RFC 9113 5.1.2: safe to retry); a client may race our SETTINGS that
  way. One refused more than REFUSED_FLOOR times ignores them: GOAWAY ENHANCE_YOUR_CALM.
  h2 enforces a looser bound (H2_STREAMS), reached only by one read opening that many.
  A stream whose window stays shut while its response waits is reset (`Stream.sweep`).
- Graceful stop: when the listener drains, GOAWAY names the last stream processed; newer
  streams are refused (REFUSED_STREAM, safe to retry) and open ones finish.
No I/O: the driver (`balancer.io.h2`) supplies the transport operations of `Output`.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from balancer.http1.exchange import BackendPort, Exchange, ListenerContext
from balancer.http1.head import BadRequest
from balancer.http1.output import Output
from balancer.http2.fastconn import SERVER_CONFIG, FastH2Connection
from balancer.http2.hpack import FastDecoder, StatelessEncoder
from balancer.http2.request import StreamError, placeholder, request_head, trailer_fields
from balancer.http2.stream import Stream

MAX_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS, enforced by refusing the stream
H2_STREAMS = 2 * MAX_STREAMS  # h2's own bound: GOAWAY PROTOCOL_ERROR past it
REFUSED_FLOOR = 100  # streams refused for the limit before the client is cut off
CONNECTION_WINDOW = 1 << 20  # request body in flight on one connection, all streams
STREAM_WINDOW = 256 * 1024  # request body in flight on one stream
RESET_FLOOR = 100  # client resets tolerated before the rapid-reset rule applies
CONTROL_PER_SECOND = 1000  # SETTINGS + PING + PRIORITY + empty DATA frames
MAX_UNSENT = 4 << 20  # bytes the client leaves unread before it is cut off


class H2ClientSide(Output):
    """A client's HTTP/2 connection (a `ClientPort` for the listener's set of clients)."""

    h2 = True
    tunnel: BackendPort | None = None
    queue: deque[Exchange] = deque()  # streams, not a queue, carry the exchanges

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.batch = ctx.batch
        self.conn = FastH2Connection(config=SERVER_CONFIG)
        self.conn.encoder = StatelessEncoder()  # type: ignore[assignment]
        self.conn.decoder = FastDecoder()
        self.client_ip = b"unknown"
        self.tls: tuple[str, str] | None = None
        self.streams: dict[int, Stream] = {}
        self.ready: dict[Stream, None] = {}  # streams with something to frame, in order
        self.closed = False
        self.paused = False  # reading the client is paused
        self.writing_paused = False  # the transport's buffer is full
        self.goaway = False
        self.deadline = 0.0  # idle: no open stream
        self.out: list[bytes] | None = None
        self.resp_extra: list[tuple[bytes, bytes]] = []
        self.opened_streams = 0
        self.refused = 0  # streams refused for exceeding MAX_STREAMS
        self.client_resets = 0
        self.control = 0
        self.control_since = 0.0

    @property
    def current(self) -> Exchange | None:
        """An exchange still in flight, if any (the graceful stop waits for none)."""
        for s in self.streams.values():
            if s.ex is not None and not s.ended:
                return s.ex
        return None

    @current.setter
    def current(self, ex: Exchange | None) -> None:
        pass  # the streams hold their exchanges

    # events from the driver ---------------------------------------------------------------
    def opened(self, client_ip: bytes | None, tls: tuple[str, str] | None) -> None:
        ctx = self.ctx
        stats = ctx.stats
        stats.connections_total += 1
        stats.connections_open += 1
        stats.h2_connections_total += 1
        stats.h2_connections_open += 1
        if client_ip:
            self.client_ip = client_ip
        if tls is not None:
            stats.tls_handshakes += 1
            self.tls = tls
        if ctx.proto == b"https" and ctx.cfg.tls.hsts:
            self.resp_extra = [(b"strict-transport-security", ctx.cfg.tls.hsts.encode())]
        ctx.clients.add(self)
        conn = self.conn
        # advertised in the first SETTINGS and enforced from the start (h2 reads these)
        values = {
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            SettingCodes.MAX_HEADER_LIST_SIZE: ctx.limits.max_header_bytes,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        }
        conn.local_settings = Settings(client=False, initial_values=values)
        conn.decoder.max_header_list_size = ctx.limits.max_header_bytes
        conn.initiate_connection()
        # what h2 enforces from now on (the frame above advertised MAX_STREAMS): a stream
        # past MAX_STREAMS reaches `_request`, which refuses it alone
        values[SettingCodes.MAX_CONCURRENT_STREAMS] = H2_STREAMS
        conn.local_settings = Settings(client=False, initial_values=values)
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.control_since = ctx.now
        self.deadline = ctx.now + ctx.timeouts.idle_keepalive
        if len(ctx.clients) > ctx.limits.max_client_connections or ctx.draining:
            stats.overload_rejections += 1
            self.go_away(ErrorCodes.REFUSED_STREAM if ctx.draining else ErrorCodes.NO_ERROR)
            return
        self._kick()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self not in self.ctx.clients:
            return
        self.closed = True
        stats = self.ctx.stats
        stats.connections_open -= 1
        stats.h2_connections_open -= 1
        self.ctx.clients.discard(self)
        for s in list(self.streams.values()):
            s._drop()
        self.ready.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.ready:
            self._kick()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        conn = self.conn
        try:
            for ev in conn.receive_data(data):
                if self.closed:
                    return
                self._event(ev)
        except ProtocolError as exc:
            # a connection error (a bad preface, a CONTINUATION flood, an HPACK bomb, too many
            # streams, ...): GOAWAY with its code (h2 queued it for most), then close
            self.ctx.stats.bad_requests += 1
            if not self.goaway:
                self.goaway = True
                if conn.state_machine.state is not ConnectionState.CLOSED:
                    conn.close_connection(
                        exc.error_code, last_stream_id=conn.highest_inbound_stream_id
                    )
            self._close()
            return
        if not self.closed:
            self._kick()

    def _event(self, ev: Any) -> None:
        if isinstance(ev, DataReceived):
            s = self.streams.get(ev.stream_id)
            if not ev.data and not ev.stream_ended:
                self._control()
            if s is not None:
                s.on_data(ev.data, ev.flow_controlled_length)
            else:
                self.ack(ev.stream_id, ev.flow_controlled_length)
        elif isinstance(ev, RequestReceived):
            self._request(ev.stream_id, ev.headers, ev.stream_ended is not None)
        elif isinstance(ev, StreamEnded):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_end()
                self._maybe_forget(s)
        elif isinstance(ev, TrailersReceived):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                try:
                    s.on_end(trailer_fields(ev.headers))
                except StreamError:
                    self.reset(s, ErrorCodes.PROTOCOL_ERROR)
                    return
                self._maybe_forget(s)
        elif isinstance(ev, StreamReset):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                if not s.done:
                    self.client_resets += 1
                s.reset_by_client()
                if (
                    self.client_resets > RESET_FLOOR
                    and self.client_resets * 2 > self.opened_streams
                ):
                    self.go_away(ErrorCodes.ENHANCE_YOUR_CALM)  # rapid reset
        elif isinstance(ev, WindowUpdated):
            if ev.stream_id == 0:
                self.ready.update(
                    (s, None) for s in self.streams.values() if s.out or s.head is not None
                )
            else:
                s = self.streams.get(ev.stream_id)
                if s is not None and s.out:
                    self.ready[s] = None
        elif isinstance(ev, PingReceived | RemoteSettingsChanged | PriorityUpdated):
            self._control()
        elif isinstance(ev, ConnectionTerminated):
            self.goaway = True  # the client is leaving: finish what is open, then close
            if not self.streams:
                self._close()

    def _control(self) -> None:
        now = self.ctx.now
        if now - self.control_since >= 1.0:
            self.control_since = now
            self.control = 0
        self.control += 1
        if self.control > CONTROL_PER_SECOND:
            self.go_away(ErrorCodes.ENHANCE_YOUR_CALM)

    def _request(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        ctx = self.ctx
        if self.goaway or ctx.draining:
            self._refuse(sid, ErrorCodes.REFUSED_STREAM)
            return
        stats = ctx.stats
        if len(self.streams) >= MAX_STREAMS:
            stats.overload_rejections += 1
            self._refuse(sid, ErrorCodes.REFUSED_STREAM)
            self.refused += 1
            if self.refused > REFUSED_FLOOR:
                self.go_away(ErrorCodes.ENHANCE_YOUR_CALM)
            return
        stats.requests_total += 1
        stats.h2_streams_total += 1
        self.opened_streams += 1
        s = Stream(self, sid)
        try:
            if len(headers) > ctx.limits.max_headers + 4:
                raise BadRequest(431, "too many header fields")
            req = request_head(headers, end)
            if ctx.limits.max_request_body and req.content_length > ctx.limits.max_request_body:
                raise BadRequest(413, "request body too large")
        except StreamError:
            stats.bad_requests += 1
            self._refuse(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        except BadRequest as exc:
            stats.bad_requests += 1
            ex = Exchange(s, placeholder(headers), True)
            ex.started = ctx.clock()
            self._add(s)
            s.ex = ex
            s.respond_error(ex, exc.status, exc.reason)
            return
        self._add(s)
        s.start(Exchange(s, req, True))

    def _refuse(self, sid: int, code: int) -> None:
        try:
            self.conn.reset_stream(sid, code)
        except ProtocolError:
            pass  # the connection is closing already

    def _add(self, s: Stream) -> None:
        self.streams[s.sid] = s
        self.ctx.stats.h2_streams_open += 1

    # what streams ask of the connection ---------------------------------------------------
    def want(self, s: Stream) -> None:
        self.ready[s] = None
        self._kick()

    def ack(self, sid: int, n: int) -> None:
        if n and not self.closed:
            try:
                self.conn.acknowledge_received_data(n, sid)
            except ProtocolError:
                pass  # the stream is gone; h2 still credited the connection window
            self._kick()

    def send_interim(self, s: Stream, headers: list[tuple[bytes, bytes]]) -> None:
        if not s.closed and not self.closed:
            try:
                self.conn.send_headers(s.sid, headers)
            except ProtocolError:
                self.reset(s, ErrorCodes.INTERNAL_ERROR)
            self._kick()

    def reset(self, s: Stream, code: int) -> None:
        if not s.ended and not self.closed:
            s.ended = True
            try:
                self.conn.reset_stream(s.sid, code)
            except ProtocolError:
                pass
            self._kick()
        s._drop()

    def forget(self, s: Stream) -> None:
        if self.streams.pop(s.sid, None) is not None:
            self.ctx.stats.h2_streams_open -= 1
        self.ready.pop(s, None)
        if not self.streams:
            if self.goaway:
                self._close()
            else:
                self.deadline = self.ctx.now + self.ctx.timeouts.idle_keepalive

    def _maybe_forget(self, s: Stream) -> None:
        if s.ended and (s.ex is None or s.ex.body_done):
            self.forget(s)

    def go_away(self, code: int = ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY naming the last stream processed; with an error, close at once."""
        if self.closed:
            return
        if not self.goaway:
            self.goaway = True
            last = self.conn.highest_inbound_stream_id
            if code != ErrorCodes.NO_ERROR:
                self.conn.close_connection(code, last_stream_id=last)
            else:
                # h2 sends nothing more once it sent GOAWAY, yet the open streams must
                # finish: frame this one by hand, behind what h2 has queued
                frame = GoAwayFrame(0, last_stream_id=last, error_code=0)
                self._write(self.conn.data_to_send() + frame.serialize())
        if code != ErrorCodes.NO_ERROR or not self.streams:
            self.ctx.stats.bad_requests += code != ErrorCodes.NO_ERROR
            self._close()
        else:
            self._kick()

    # output -------------------------------------------------------------------------------
    def _kick(self) -> None:
        if self.out is None:
            self.out = []
            batch = self.batch
            if not batch.dirty:
                batch.wake()
            batch.dirty.append(self)

    def flush(self) -> None:
        self.out = None
        if self.closed:
            return
        if self.ready and not self.writing_paused:
            ready, self.ready = self.ready, {}
            for s in ready:
                if not s.closed:
                    try:
                        self._frame(s)
                    except ProtocolError:  # h2 holds the stream closed: it ends here
                        self.reset(s, ErrorCodes.INTERNAL_ERROR)
        data = self.conn.data_to_send()
        if data:
            self._write(data)
            if self.unsent() > MAX_UNSENT:
                self._abort()  # the client sends, but never reads what we answer

    def _frame(self, s: Stream) -> None:
        """Frame a stream's head and as much body as its window allows."""
        conn = self.conn
        sid = s.sid
        # END_STREAM goes on the last frame: the head, the last DATA, or the trailers
        last = s.done and not s.trailers
        if s.head is not None:
            head, s.head = s.head, None
            end = last and not s.out
            conn.send_headers(sid, head, end_stream=end)
            if end:
                self._ended(s)
                return
        out = s.out
        if out:
            window = conn.local_flow_control_window(sid)
            frame = conn.max_outbound_frame_size
            sent = 0
            while out and window > 0:
                chunk = out[0]
                n = len(chunk)
                if n > window or n > frame:
                    n = min(window, frame)
                    out[0] = chunk[n:]
                    chunk = chunk[:n]
                else:
                    out.popleft()
                window -= n
                sent += n
                conn.send_data(sid, chunk, end_stream=last and not out)
            s.out_size -= sent
            if sent:
                s.drained()
            if out or not s.done:
                return
            if last:
                self._ended(s)
                return
        if s.done:
            if s.trailers:
                conn.send_headers(sid, s.trailers, end_stream=True)
            else:
                conn.send_data(sid, b"", end_stream=True)
            self._ended(s)

    def _ended(self, s: Stream) -> None:
        s.ended = True
        s.closed = True
        ex = s.ex
        if ex is not None and not ex.body_done:
            # answered before the request body ended: tell the client to stop (RFC 9113 8.1)
            self.conn.reset_stream(s.sid, ErrorCodes.NO_ERROR)
            s._drop()
            return
        self.forget(s)

    # the ClientPort of the listener's set -------------------------------------------------
    def _pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self._pause_reading()

    def _resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self._resume_reading()

    def _close(self) -> None:
        if not self.closed:
            if not self.goaway:
                self.goaway = True
                self.conn.close_connection(
                    ErrorCodes.NO_ERROR, last_stream_id=self.conn.highest_inbound_stream_id
                )
            self.ready.clear()
            data = self.conn.data_to_send()
            if data:
                self._write(data)
            self.flush()
            self.closed = True
            self._close_transport()

    def _abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._abort_transport()

    def finish(self, ex: Exchange) -> None:
        ex.client.finish(ex)

    def backend_failed(self, ex: Exchange, kind: str, reached: bool) -> None:
        ex.client.backend_failed(ex, kind, reached)

    def queue_timeout(self, ex: Exchange) -> None:
        ex.client.queue_timeout(ex)

    def start_tunnel(self, up: BackendPort, ex: Exchange) -> None:
        ex.client.start_tunnel(up, ex)

    def in_flight(self) -> list[Exchange]:
        return [s.current for s in self.streams.values() if s.current is not None]

    def sweep(self, now: float) -> None:
        if self.closed:
            return
        if self.ctx.draining and not self.goaway:
            self.go_away()
            if self.closed:
                return
        for s in list(self.streams.values()):
            s.sweep(now)
        if not self.streams and now >= self.deadline:
            self.ctx.stats.timeouts += 0 if self.goaway else 1
            self._close()
