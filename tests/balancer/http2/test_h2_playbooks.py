"""HTTP/2 streams with no sockets and a fake clock: scheduling per stream, head translation,
flow control both ways, failures that end one stream only, retries, deadlines, GOAWAY."""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from h2book import Peer, goaway_code, ok
from playbook import Playbook, request_line

from balancer.http1.client import rescue_in_flight

REFUSED_STREAM, ENHANCE_YOUR_CALM = ErrorCodes.REFUSED_STREAM, ErrorCodes.ENHANCE_YOUR_CALM


def test_the_streams_of_one_connection_are_spread_over_the_backends() -> None:
    pb = Playbook(backends=3)
    peer = Peer(pb)
    sids = [peer.request(b"/%d" % i) for i in range(3)]
    assert len(pb.opens) == 3
    conns = [pb.connect() for _ in range(3)]
    assert {c.backend.id for c in conns} == {b.id for b in pb.cluster.backends.values()}
    for i, c in enumerate(conns):
        assert request_line(c.written()) == b"GET /%d HTTP/1.1" % i
        pb.feed(c, ok(b"r%d" % i))
    peer.receive()
    for i, sid in enumerate(sids):
        r = peer.responses[sid]
        assert (r.status, r.body, r.ended) == (200, b"r%d" % i, True)
    entries = pb.access_log()
    assert [e["protocol"] for e in entries] == ["HTTP/2"] * 3
    assert pb.ctx.stats.h2_streams_total == 3 and pb.ctx.stats.h2_streams_open == 0


def test_the_request_head_is_translated_to_http1() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    peer.request(
        extra=[
            (b"cookie", b"a=1"),
            (b"accept", b"*/*"),
            (b"cookie", b"b=2"),
            (b"te", b"trailers"),
        ]
    )
    head = pb.connect().written().lower()
    assert b"\r\nhost: x\r\n" in head  # :authority becomes Host
    assert b"\r\ncookie: a=1; b=2\r\n" in head  # crumbs joined (RFC 9113 8.2.3)
    assert b"\r\nte:" not in head and b":authority" not in head
    assert b"transfer-encoding" not in head  # no body: no framing header


def test_hop_by_hop_response_fields_never_reach_the_http2_client() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    sid = peer.request()
    conn = pb.connect()
    pb.feed(
        conn,
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
    )
    peer.receive()
    r = peer.responses[sid]
    assert r.body == b"abc" and r.ended  # de-chunked, END_STREAM after the last chunk
    assert r.headers[b"x-kept"] == b"yes"
    for name in (b"connection", b"keep-alive", b"transfer-encoding", b"x-secret"):
        assert name not in r.headers


def test_head_204_and_304_end_the_stream_with_the_headers() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    head = peer.request(method=b"HEAD")
    conn = pb.connect()
    pb.feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    for status in (204, 304):
        sid = peer.request()
        pb.feed(conn, b"HTTP/1.1 %d X\r\n\r\n" % status)
        peer.receive()
        r = peer.responses[sid]
        assert (r.status, r.body, r.ended) == (status, b"", True)
    r = peer.responses[head]
    assert (r.status, r.body, r.ended) == (200, b"", True)
    assert r.headers[b"content-length"] == b"100"


def test_an_early_hint_is_passed_as_an_informational_response() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    sid = peer.request()
    conn = pb.connect()
    pb.feed(conn, b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + ok())
    peer.receive()
    r = peer.responses[sid]
    assert r.interim == [103] and r.status == 200 and r.body == b"hi"


def test_a_malformed_stream_is_reset_and_the_others_carry_on() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb, validate=False)
    good = peer.request()
    bad = peer.request(
        headers=[(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x")]
    )
    assert peer.responses[bad].reset == 1  # PROTOCOL_ERROR, no :path
    pb.feed(pb.connect(), ok())
    peer.receive()
    assert peer.responses[good].status == 200 and peer.goaway is None


def test_a_request_refused_with_a_status_is_answered_on_its_stream() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    sid = peer.request(
        method=b"CONNECT", headers=[(b":method", b"CONNECT"), (b":authority", b"x:1")]
    )
    r = peer.responses[sid]
    assert r.status == 405 and b"CONNECT is not supported" in r.body and r.ended
    assert pb.opens == []


def test_a_backend_dying_mid_response_resets_only_its_stream() -> None:
    pb = Playbook(backends=2)
    peer = Peer(pb)
    a = peer.request(b"/a")
    b = peer.request(b"/b")
    ca, cb = pb.connect(), pb.connect()
    pb.feed(ca, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    ca.calls.append(("close", None))
    pb.settle()
    peer.receive()
    assert peer.responses[a].reset == 2 and not peer.responses[a].ended  # INTERNAL_ERROR
    pb.feed(cb, ok(b"whole"))
    peer.receive()
    assert peer.responses[b].body == b"whole" and peer.responses[b].ended
    assert peer.goaway is None and peer.side.ended() is None
    assert ca.backend.errors_response == 1


def test_a_refused_connect_is_retried_on_another_backend() -> None:
    pb = Playbook(backends=2)
    peer = Peer(pb)
    sid = peer.request()
    first = pb.refuse()
    conn = pb.connect()
    assert conn.backend is not first
    pb.feed(conn, ok())
    peer.receive()
    assert peer.responses[sid].status == 200
    (entry,) = pb.access_log()
    assert entry["retries"] == 1 and entry["protocol"] == "HTTP/2"


def test_no_backend_answering_in_time_is_a_504_on_the_stream() -> None:
    pb = Playbook(backends=1, timeouts={"backend_response": 2.0})
    peer = Peer(pb)
    sid = peer.request()
    pb.connect()
    pb.advance(3.0)
    peer.receive()
    r = peer.responses[sid]
    assert r.status == 504 and r.ended and peer.goaway is None


def test_a_request_body_without_length_goes_upstream_chunked_with_its_trailers() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    sid = peer.request(b"/up", method=b"POST", end=False)
    conn = pb.connect()
    assert b"transfer-encoding: chunked" in conn.written().lower()
    peer.body(sid, b"abc")
    peer.h2.send_headers(sid, [(b"x-sum", b"1")], end_stream=True)
    peer.send()
    assert conn.written().endswith(b"3\r\nabc\r\n0\r\nx-sum: 1\r\n\r\n")


def test_a_large_download_is_never_held_whole_the_backend_is_paused() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb, auto_ack=False)  # the client reads nothing: its window stays shut
    sid = peer.request()
    conn = pb.connect()
    size = 4 << 20
    pb.feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    chunk = b"x" * 65536
    for _ in range(8):
        pb.feed(conn, chunk)
    peer.receive()
    assert "pause" in conn.ops()  # the backend connection stopped being read
    held = peer.side.streams[sid].out_size
    assert held <= 8 * 65536 - 65535 and held > 0  # at most what came after the window shut
    assert len(peer.responses[sid].body) == 65535  # the client's initial window
    # the client opens its window: bytes flow again and the backend is read again
    peer.h2.acknowledge_received_data(65535, sid)
    peer.h2.increment_flow_control_window(1 << 20, sid)
    peer.h2.increment_flow_control_window(1 << 20)
    peer.send()
    assert conn.ops()[-1] == "resume"


def test_an_upload_faster_than_the_backend_stops_opening_the_window() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    sid = peer.request(b"/up", method=b"POST", end=False, extra=[(b"content-length", b"300000")])
    conn = pb.connect()
    conn.pause_writing()  # the backend's socket buffer is full
    before = peer.h2.local_flow_control_window(sid)
    for _ in range(14):  # more than half the window: enough for h2 to send WINDOW_UPDATE
        peer.body(sid, b"x" * 15000)
    assert peer.h2.local_flow_control_window(sid) == before - 210000  # none was sent
    conn.resume_writing()
    pb.settle()
    peer.receive()
    assert peer.h2.local_flow_control_window(sid) == before  # acknowledged once taken


def test_a_client_reset_frees_the_backend_connection() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    sid = peer.request()
    conn = pb.connect()
    peer.reset(sid)
    assert conn.ended() == "close"  # mid-exchange: the pool closes it, never reuses it
    assert pb.ctx.stats.h2_streams_open == 0 and conn.backend.in_flight == 0


def test_draining_sends_goaway_with_the_last_stream_and_lets_it_finish() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    sid = peer.request()
    conn = pb.connect()
    pb.ctx.draining = True
    pb.advance(0.25)
    peer.receive()
    assert goaway_code(peer) == 0 and peer.goaway is not None
    assert peer.goaway.last_stream_id == sid
    assert peer.side.ended() is None  # the open stream finishes first
    pb.feed(conn, ok())
    assert peer.side.ended() == "close"


def test_a_stream_whose_window_stays_shut_is_cancelled() -> None:
    pb = Playbook(backends=1, timeouts={"client_body": 5.0})
    peer = Peer(pb, auto_ack=False)
    sid = peer.request()
    conn = pb.connect()
    pb.feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"z" * 100000)
    pb.advance(3.0)
    assert peer.responses[sid].reset is None
    pb.advance(3.0)
    peer.receive()
    assert peer.responses[sid].reset == 8  # CANCEL
    assert conn.ended() == "close" and pb.ctx.stats.h2_streams_open == 0


def test_authority_wins_over_a_host_field() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb, validate=False)  # h2's client refuses to send a mismatch
    peer.request(extra=[(b"host", b"other")])
    head = pb.connect().written().lower()
    assert b"\r\nhost: x\r\n" in head and b"other" not in head


def test_a_backend_declared_down_has_every_waiting_stream_moved_off_it() -> None:
    pb = Playbook(backends=2)
    peer = Peer(pb)
    sids = [peer.request(b"/%d" % i) for i in range(3)]
    conns = [pb.connect() for _ in range(3)]
    down = conns[0].backend
    on_down = [c for c in conns if c.backend is down]
    assert len(on_down) == 2  # round robin: streams 1 and 3 on one backend, one connection
    assert rescue_in_flight(pb.ctx, down) == 2
    moved = [pb.connect(), pb.connect()]
    assert all(c.backend is not down for c in moved)
    for c in [*moved, *(c for c in conns if c.backend is not down)]:
        pb.feed(c, ok())
    peer.receive()
    assert [peer.responses[s].status for s in sids] == [200, 200, 200]


def test_an_idle_connection_gets_goaway_and_is_closed() -> None:
    pb = Playbook(backends=1, timeouts={"idle_keepalive": 10.0})
    peer = Peer(pb)
    sid = peer.request()
    pb.feed(pb.connect(), ok())
    peer.receive()
    assert peer.responses[sid].ended
    pb.advance(5.0)
    assert peer.side.ended() is None  # idle, but not for long enough
    pb.advance(6.0)
    peer.receive()
    assert goaway_code(peer) == 0 and peer.side.ended() == "close"


def test_a_stream_h2_holds_closed_ends_alone_and_the_batch_still_flushes() -> None:
    pb = Playbook(backends=2)
    peer = Peer(pb)
    a, b = peer.request(b"/a"), peer.request(b"/b")
    ca, cb = pb.connect(), pb.connect()
    peer.side.conn.reset_stream(a, 0)  # h2 closes it behind the stream's back
    pb.feed(ca, ok(b"lost"))  # framing it now raises inside h2: caught, the stream ends
    pb.feed(cb, ok(b"kept"))
    peer.receive()
    assert peer.responses[b].body == b"kept" and peer.responses[b].ended
    assert peer.responses[a].body == b"" and a not in peer.side.streams
    assert peer.goaway is None and peer.side.ended() is None


CHUNKED_WITH_TRAILERS = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
    b"3\r\nabc\r\n0\r\nX-Checksum: 42 \r\nServer-Timing: db;dur=5\r\n\r\n"
)


def test_a_chunked_response_s_trailers_end_the_stream_as_a_headers_frame() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    sid = peer.request()
    conn = pb.connect()
    # fields a trailer section must not carry on (RFC 9113 8.2.2, RFC 9110 6.5.1)
    pb.feed(conn, CHUNKED_WITH_TRAILERS[:-2] + b"Keep-Alive: 5\r\nContent-Type: x/y\r\n\r\n")
    peer.receive()
    r = peer.responses[sid]
    assert (r.status, r.body, r.ended) == (200, b"abc", True)
    # lowercase, trimmed, and without connection-specific or framing fields
    assert r.trailers == [(b"x-checksum", b"42"), (b"server-timing", b"db;dur=5")]
    assert r.trailers_ended  # END_STREAM rode on the trailers, not on the last DATA
    assert b"x-checksum" not in r.headers


def test_trailers_after_an_empty_body_and_without_any() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    first = peer.request()
    up = pb.connect()
    pb.feed(up, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Empty: 1\r\n\r\n")
    second = peer.request()
    pb.feed(up, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    peer.receive()
    r1, r2 = peer.responses[first], peer.responses[second]
    assert (r1.body, r1.trailers, r1.trailers_ended) == (b"", [(b"x-empty", b"1")], True)
    assert (r2.body, r2.trailers, r2.ended) == (b"ok", None, True)


def test_trailers_larger_than_the_header_limit_are_dropped_and_the_body_kept() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    sid = peer.request()
    conn = pb.connect()
    big = b"".join(b"X-T%d: %b\r\n" % (i, b"v" * 1000) for i in range(64))  # 64 KB > 32 KB
    pb.feed(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n")
    pb.feed(conn, big + b"\r\n")
    peer.receive()
    r = peer.responses[sid]
    assert (r.body, r.ended, r.trailers) == (b"ok", True, None)


def test_one_backend_connection_serves_http1_and_http2_each_with_its_trailer_rule() -> None:
    pb = Playbook(backends=1)
    h1 = pb.client()
    pb.feed(h1, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    up = pb.connect()
    pb.feed(up, CHUNKED_WITH_TRAILERS)
    # HTTP/1.1 as before: the trailers are dropped, the chunked body ends plainly
    assert h1.written().endswith(b"\r\n3\r\nabc\r\n0\r\n\r\n")
    peer = Peer(pb)
    sid = peer.request()
    assert not pb.opens  # the same pooled connection
    pb.feed(up, CHUNKED_WITH_TRAILERS)
    peer.receive()
    assert peer.responses[sid].trailers == [
        (b"x-checksum", b"42"),
        (b"server-timing", b"db;dur=5"),
    ]
    pb.feed(h1, b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    pb.feed(up, CHUNKED_WITH_TRAILERS)
    assert h1.written().count(b"\r\n0\r\n\r\n") == 2 and b"X-Checksum" not in h1.written()


def test_a_stream_past_the_limit_is_refused_alone_and_one_who_insists_is_cut_off() -> None:
    pb = Playbook(backends=1)
    peer = Peer(pb)
    # the peer ignores our SETTINGS_MAX_CONCURRENT_STREAMS (100), as a racing client would
    peer.h2.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 1000
    peer.h2.remote_settings.acknowledge()
    held = [peer.request(b"/%d" % i) for i in range(100)]  # no answers yet: all stay open
    extra = peer.request(b"/101")
    assert peer.responses[extra].reset == REFUSED_STREAM  # safe for the client to retry
    assert peer.goaway is None and pb.ctx.stats.h2_streams_open == 100
    conn = pb.connect()  # one answered: room for one more
    pb.feed(conn, ok())
    peer.receive()
    assert peer.responses[held[0]].ended
    again = peer.request(b"/again")
    assert peer.responses[again].reset is None and peer.goaway is None
    for i in range(100):  # 1 refused so far; the 101st refusal is one too many
        peer.request(b"/more%d" % i)
        if peer.goaway is not None:
            break
    assert goaway_code(peer) == ENHANCE_YOUR_CALM and i == 99
    assert all(peer.responses[s].reset == REFUSED_STREAM for s in peer.responses if s > again)
