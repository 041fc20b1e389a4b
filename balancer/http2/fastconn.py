"""`FastH2Connection`: h2's server connection with its hot paths done in fewer steps.

A subclass of `h2.connection.H2Connection` (h2 4.4.1, pinned in pyproject.toml: this module
reads and writes h2's private state, so another version must be checked again first). It
overrides the methods that dominate a request's cost and leaves everything else to h2:
- `send_headers`/`send_data` on an existing stream (the server's response): the stream
  state machine and both flow-control windows move exactly as h2 moves them, and the
  HEADERS/CONTINUATION/DATA frames are written as bytes (a 9-byte frame header) instead of
  hyperframe objects serialised one by one;
- `receive_data`: h2's loop over its frame buffer, but a plain HEADERS frame (END_HEADERS,
  no padding or priority, outside a header block) is taken as bytes, with no hyperframe
  objects; its handler (`_headers`, also behind `_receive_headers_frame`) does h2's
  transitions for a new request stream inline, without building the validation flags h2
  only uses when validation is on;
- `_open_streams` (h2 scans every stream to count the open ones each time a stream
  opens, and drops closed streams as it goes): the same scan and clean-up, inlined;
- `_receive_frame`: without the eager `repr(frame)` for a trace log that is a no-op.
Whatever the fast paths do not cover (padding, priority, CONTINUATION, a stream h2 has not
seen, another state, a logger or header validation turned on) goes to h2's own code, so
events, bytes out and exceptions stay h2's: `tests/balancer/http2/test_fastconn.py` drives
this class and h2's side by side and compares them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

from h2.config import DummyLogger, H2Configuration
from h2.connection import (
    AllowedStreamIDs,
    ConnectionInputs,
    ConnectionState,
    H2Connection,
    _decode_headers,
)
from h2.errors import ErrorCodes
from h2.events import Event, RequestReceived, StreamEnded
from h2.exceptions import (
    FlowControlError,
    FrameTooLargeError,
    ProtocolError,
    StreamClosedError,
    StreamIDTooLowError,
    TooManyStreamsError,
)
from h2.stream import STREAM_OPEN, H2Stream, StreamClosedBy, StreamInputs, StreamState
from h2.utilities import is_informational_response
from hyperframe.exceptions import InvalidPaddingError
from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame

_HEADER = struct.Struct(">HBBBL")  # hyperframe's frame header: 24-bit length, type, flags, id
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4

_OPEN = StreamState.OPEN
_HALF_CLOSED_REMOTE = StreamState.HALF_CLOSED_REMOTE
_HALF_CLOSED_LOCAL = StreamState.HALF_CLOSED_LOCAL
_CLOSED = StreamState.CLOSED
_IDLE = StreamState.IDLE
_SERVER_OPEN = ConnectionState.SERVER_OPEN


# fields are validated by `request_head` (a malformed one is a stream error, not the end of
# the connection) and response heads are built lowercase without connection-specific fields
# (`response_headers`); h2 still checks framing, states, flow control and content-length.
# The fast paths need exactly this: no header validation or normalisation either way.
SERVER_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


def _frame_header(length: int, kind: int, flags: int, sid: int) -> bytes:
    return _HEADER.pack((length >> 8) & 0xFFFF, length & 0xFF, kind, flags, sid & 0x7FFFFFFF)


def _send_end_stream(stream: H2Stream) -> None:
    """StreamInputs.SEND_END_STREAM, as h2's state machine applies it."""
    sm = stream.state_machine
    state = sm.state
    if state is _HALF_CLOSED_REMOTE:
        sm.state = _CLOSED
        sm.stream_closed_by = StreamClosedBy.SEND_END_STREAM
    elif state is _OPEN:
        sm.state = _HALF_CLOSED_LOCAL
    else:
        sm.process_input(StreamInputs.SEND_END_STREAM)


class FastH2Connection(H2Connection):
    """A server-side `H2Connection` whose per-request methods are cheaper, same behaviour.

    The configuration is read once, here: the fast paths need no logger (h2's default
    `DummyLogger`) and, for headers, no normalisation or validation in that direction.
    `send_headers` takes its fast path for a list of (bytes, bytes) pairs.
    """

    def __init__(self, config: H2Configuration | None = None) -> None:
        super().__init__(config=config)
        cfg = self.config
        quiet = type(cfg.logger) is DummyLogger
        self._quiet = quiet
        self._fast_out = (
            quiet
            and not cfg.client_side
            and not cfg.normalize_outbound_headers
            and not cfg.validate_outbound_headers
        )
        self._fast_in = (
            quiet
            and not cfg.client_side
            and not cfg.normalize_inbound_headers
            and not cfg.validate_inbound_headers
            and not isinstance(cfg.header_encoding, str)
        )

    # streams ------------------------------------------------------------------------------
    def _open_streams(self, remainder: int) -> int:
        # h2's scan (count the open streams of one parity, drop the closed ones), without a
        # property call per stream
        count = 0
        to_delete = []
        for stream_id, stream in self.streams.items():
            state = stream.state_machine.state
            if STREAM_OPEN[state]:
                if stream_id % 2 == remainder:
                    count += 1
            elif state is _CLOSED:
                to_delete.append(stream_id)
        for stream_id in to_delete:
            stream = self.streams.pop(stream_id)
            self._closed_streams[stream_id] = stream.state_machine.stream_closed_by
        return count

    def _begin_new_stream(self, stream_id: int, allowed_ids: AllowedStreamIDs) -> H2Stream:
        if not self._quiet:
            return super()._begin_new_stream(stream_id, allowed_ids)
        # h2's, less its three debug log calls (one formats the keys of every stream)
        outbound = self._stream_id_is_outbound(stream_id)
        highest = self.highest_outbound_stream_id if outbound else self.highest_inbound_stream_id
        if stream_id <= highest:
            raise StreamIDTooLowError(stream_id, highest)
        if (stream_id % 2) != int(allowed_ids):
            msg = "Invalid stream ID for peer."
            raise ProtocolError(msg)
        s = H2Stream(
            stream_id,
            config=self.config,
            inbound_window_size=self.local_settings.initial_window_size,
            outbound_window_size=self.remote_settings.initial_window_size,
        )
        s.max_outbound_frame_size = self.max_outbound_frame_size
        self.streams[stream_id] = s
        if outbound:
            self.highest_outbound_stream_id = stream_id
        else:
            self.highest_inbound_stream_id = stream_id
        return s

    # sending ------------------------------------------------------------------------------
    def send_headers(
        self,
        stream_id: int,
        headers: Iterable[Any],
        end_stream: bool = False,
        priority_weight: int | None = None,
        priority_depends_on: int | None = None,
        priority_exclusive: bool | None = None,
    ) -> None:
        stream = self.streams.get(stream_id)
        if (
            stream is None
            or not self._fast_out
            or priority_weight is not None
            or priority_depends_on is not None
            or priority_exclusive is not None
            or type(headers) is not list
        ):
            super().send_headers(
                stream_id,
                headers,
                end_stream,
                priority_weight,
                priority_depends_on,
                priority_exclusive,
            )
            return
        # h2 re-encodes every field to bytes first; with bytes already, that is a copy
        method = None
        for name, value in headers:
            if type(name) is not bytes or type(value) is not bytes:
                super().send_headers(stream_id, headers, end_stream)
                return
            if method is None and name == b":method":
                method = value
        if self.state_machine.state is not _SERVER_OPEN:
            self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        # H2Stream.send_headers from here on, step by step
        sm = stream.state_machine
        if not sm.client and is_informational_response(headers):
            if end_stream:
                msg = "Cannot set END_STREAM on informational responses."
                raise ProtocolError(msg)
            sm.process_input(StreamInputs.SEND_INFORMATIONAL_HEADERS)
        else:
            state = sm.state
            if (state is _HALF_CLOSED_REMOTE or state is _OPEN) and (
                sm.client is False and not sm.headers_sent
            ):
                sm.headers_sent = True  # response_sent: the response, not trailers
            else:
                sm.process_input(StreamInputs.SEND_HEADERS)
        block = self.encoder.encode(headers)
        size = stream.max_outbound_frame_size or 0
        n = len(block)
        # h2's slicing, with its errors for an empty block (IndexError) and a size of 0
        blocks = [block] if 0 < n <= size else [block[i : i + size] for i in range(0, n, size)]
        first = blocks[0]
        flags = 0
        if end_stream:
            _send_end_stream(stream)
            flags = _END_STREAM
        if sm.trailers_sent and not end_stream:
            msg = "Trailers must have END_STREAM set."
            raise ProtocolError(msg)
        stream.request_method = method
        buf = self._data_to_send
        if len(blocks) == 1:
            buf += _frame_header(n, _HEADERS, flags | _END_HEADERS, stream_id)
            buf += first
            return
        buf += _frame_header(len(first), _HEADERS, flags, stream_id)
        buf += first
        last = len(blocks) - 1
        for i in range(1, len(blocks)):
            part = blocks[i]
            end = _END_HEADERS if i == last else 0
            buf += _frame_header(len(part), _CONTINUATION, end, stream_id)
            buf += part

    def send_data(
        self,
        stream_id: int,
        data: bytes | memoryview,
        end_stream: bool = False,
        pad_length: Any = None,
    ) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or pad_length is not None or not self._quiet:
            super().send_data(stream_id, data, end_stream, pad_length)
            return
        frame_size = len(data)
        if frame_size > 0:
            window = self.outbound_flow_control_window
            if stream.outbound_flow_control_window < window:
                window = stream.outbound_flow_control_window
            if frame_size > window:
                msg = f"Cannot send {frame_size} bytes, flow control window is {window}"
                raise FlowControlError(msg)
        if frame_size > self.max_outbound_frame_size:
            msg = (
                f"Cannot send frame size {frame_size}, "
                f"max frame size is {self.max_outbound_frame_size}"
            )
            raise FrameTooLargeError(msg)
        if self.state_machine.state is not _SERVER_OPEN:
            self.state_machine.process_input(ConnectionInputs.SEND_DATA)
        # H2Stream.send_data
        state = stream.state_machine.state
        if state is not _HALF_CLOSED_REMOTE and state is not _OPEN:
            stream.state_machine.process_input(StreamInputs.SEND_DATA)
        if isinstance(data, memoryview):
            data = data.tobytes()
        flags = 0
        if end_stream:
            _send_end_stream(stream)
            flags = _END_STREAM
        stream.outbound_flow_control_window -= frame_size
        buf = self._data_to_send
        buf += _frame_header(frame_size, _DATA, flags, stream_id)
        buf += data
        self.outbound_flow_control_window -= frame_size

    # receiving ----------------------------------------------------------------------------
    def receive_data(self, data: Any) -> list[Event]:
        if not self._fast_in:
            return super().receive_data(data)
        # h2's loop over its frame buffer, with one shortcut: a whole HEADERS frame that
        # needs nothing of hyperframe (END_HEADERS, no padding, no priority, not inside a
        # header block, within the frame size) goes to `_headers` as its block of bytes
        events: list[Event] = []
        buf = self.incoming_buffer
        buf.add_data(data)
        buf.max_frame_size = self.max_inbound_frame_size
        try:
            while True:
                raw = buf._data
                if len(raw) >= 9 and raw[3] == _HEADERS and not buf._headers_buffer:
                    length = (raw[0] << 16) | (raw[1] << 8) | raw[2]
                    sid = ((raw[5] << 24) | (raw[6] << 16) | (raw[7] << 8) | raw[8]) & 0x7FFFFFFF
                    if raw[4] & 0x2C == _END_HEADERS and sid and length <= buf.max_frame_size:
                        if len(raw) < length + 9:
                            break
                        end_stream = bool(raw[4] & _END_STREAM)
                        block = bytes(raw[9 : 9 + length])
                        del raw[: 9 + length]
                        events.extend(self._handled(self._headers, sid, block, end_stream))
                        continue
                frame = next(buf, None)
                if frame is None:
                    break
                events.extend(self._handled(self._frame_dispatch_table[frame.__class__], frame))
        except InvalidPaddingError as e:
            self._terminate_connection(ErrorCodes.PROTOCOL_ERROR)
            msg = "Received frame with invalid padding."
            raise ProtocolError(msg) from e
        except ProtocolError as e:
            self._terminate_connection(e.error_code)
            raise
        return events

    def _receive_frame(self, frame: Frame) -> list[Event]:
        if not self._quiet:
            return super()._receive_frame(frame)
        return self._handled(self._frame_dispatch_table[frame.__class__], frame)

    def _handled(self, handler: Callable[..., Any], *args: Any) -> list[Event]:
        # h2's `_receive_frame` around a frame's handler, less its
        # `logger.trace("Received frame: %s", repr(frame))`: the repr was built for every
        # frame, and the default logger drops it
        events: list[Event]
        try:
            frames, events = handler(*args)
        except StreamClosedError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[Event]]:
        if not self._fast_in or "PRIORITY" in frame.flags:
            return super()._receive_headers_frame(frame)
        return self._headers(frame.stream_id, frame.data, "END_STREAM" in frame.flags)

    def _headers(self, sid: int, block: bytes, end_stream: bool) -> tuple[list[Frame], list[Event]]:
        """h2's `_receive_headers_frame` for a frame without priority information."""
        stream = self.streams.get(sid)
        if stream is None:
            max_open_streams = self.local_settings.max_concurrent_streams
            value = self._open_streams(1)  # inbound: the client's odd ids
            if (value + 1) > max_open_streams:
                msg = f"Max inbound streams is {max_open_streams}, {value} open"
                raise TooManyStreamsError(msg)
        headers = _decode_headers(self.decoder, block)
        if self.state_machine.state is not _SERVER_OPEN:
            self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        if stream is None:
            stream = self._begin_new_stream(sid, AllowedStreamIDs.ODD)
        sm = stream.state_machine
        if (
            sm.state is not _IDLE
            or sm.headers_received
            or sm.trailers_received
            or is_informational_response(headers)
        ):
            return stream.receive_headers(headers, end_stream, self.config.header_encoding)
        # H2Stream.receive_headers for a request on a new stream (IDLE -> OPEN, then
        # HALF_CLOSED_REMOTE with END_STREAM), the events as h2 builds them
        sm.state = _OPEN
        sm.client = False
        sm.headers_received = True
        event = RequestReceived(stream_id=sid)
        events: list[Event] = [event]
        if end_stream:
            sm.state = _HALF_CLOSED_REMOTE
            ended = StreamEnded(stream_id=sid)
            event.stream_ended = ended
            events.append(ended)
        stream._initialize_content_length(headers)
        event.headers = list(headers)
        return [], events
