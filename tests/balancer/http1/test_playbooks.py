"""The HTTP/1.1 exchange with no sockets and a fake clock: retries, pipelining, failures
mid-body, every deadline, the pool's limits and the retry budget."""

from __future__ import annotations

from playbook import Playbook, request_line, statuses

GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


def test_a_request_goes_to_a_backend_and_its_response_back() -> None:
    pb = Playbook()
    c = pb.client()
    pb.feed(c, GET)
    assert len(pb.opens) == 1 and c.written() == b""
    conn = pb.connect()
    assert request_line(conn.written()) == b"GET /a HTTP/1.1"
    assert b"\r\nx-forwarded-for: 127.0.0.9\r\n" in conn.written().lower()
    pb.feed(conn, OK)
    assert statuses(c.written()) == [200] and c.written().endswith(b"\r\n\r\nhi")
    assert c.ended() is None  # keep-alive
    assert pb.pool.counts(conn.backend.id) == (1, 1)  # back in the pool, idle
    (entry,) = pb.access_log()
    assert entry["status"] == 200 and entry["backend"] == conn.backend.id
    assert entry["retries"] == 0


def test_the_next_request_reuses_the_idle_connection() -> None:
    pb = Playbook(backends=1)
    c = pb.client()
    pb.feed(c, GET)
    conn = pb.connect()
    pb.feed(conn, OK)
    pb.feed(c, GET)
    assert pb.opens == []  # no new connect
    assert conn.written().count(b"GET /a") == 2


def test_a_refused_connect_is_retried_on_a_different_backend() -> None:
    pb = Playbook()
    c = pb.client()
    pb.feed(c, GET)
    first = pb.refuse()
    assert len(pb.opens) == 1 and pb.opens[0][0] is not first
    conn = pb.connect()
    pb.feed(conn, OK)
    assert statuses(c.written()) == [200]
    (entry,) = pb.access_log()
    assert entry["retries"] == 1 and entry["backend"] != first.id
    assert first.errors_connect == 1 and first.retries == 1


def test_no_backend_left_to_retry_on_is_a_502() -> None:
    pb = Playbook()
    c = pb.client()
    pb.feed(c, GET)
    pb.refuse()
    pb.refuse()
    assert statuses(c.written()) == [502] and b"no backend could answer" in c.written()
    assert c.ended() is None  # the request was read whole: the connection stays usable


def test_attempts_bound_the_retries() -> None:
    pb = Playbook(backends=3, retries={"attempts": 2})
    c = pb.client()
    pb.feed(c, GET)
    pb.refuse()
    pb.refuse()
    assert pb.opens == [] and statuses(c.written()) == [502]


def test_an_exhausted_retry_budget_stops_retries() -> None:
    pb = Playbook(retries={"budget_ratio": 0.0, "budget_min_per_second": 0.0})
    c = pb.client()
    pb.feed(c, GET)
    pb.refuse()
    assert pb.opens == [] and statuses(c.written()) == [502]


def test_a_reset_after_a_get_was_sent_is_retried() -> None:
    pb = Playbook()
    c = pb.client()
    pb.feed(c, GET)
    first = pb.connect()
    first.calls.append(("close", None))  # the backend resets it: the loop reports it lost
    pb.settle()
    second = pb.connect()
    assert second.backend is not first.backend
    pb.feed(second, OK)
    assert statuses(c.written()) == [200]


def test_a_reset_after_a_post_body_was_sent_is_not_retried() -> None:
    pb = Playbook()
    c = pb.client()
    pb.feed(c, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
    conn = pb.connect()
    pb.feed(c, b"abc")
    assert conn.written().endswith(b"abc")
    conn.calls.append(("close", None))
    pb.settle()
    assert pb.opens == []  # not replayable: the backend may have acted on it
    assert statuses(c.written()) == [502] and b"backend reset failure" in c.written()


def test_pipelined_requests_are_answered_in_order_behind_a_slow_first_backend() -> None:
    pb = Playbook()
    c = pb.client()
    pb.feed(c, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    slow = pb.connect()
    assert pb.opens == []  # one exchange at a time: /2 waits for /1
    assert b"GET /2" not in slow.written()
    pb.advance(5.0)  # slow, but inside the backend-response timeout
    assert c.written() == b""
    pb.feed(slow, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
    fast = pb.connect()  # round robin: /2 goes to the other backend
    assert request_line(fast.written()) == b"GET /2 HTTP/1.1"
    pb.feed(fast, b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\ntwo")
    out = c.written()
    assert statuses(out) == [200, 201] and out.index(b"one") < out.index(b"two")


def test_a_backend_dying_mid_body_aborts_the_client_connection() -> None:
    pb = Playbook()
    c = pb.client()
    pb.feed(c, GET)
    conn = pb.connect()
    pb.feed(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    assert statuses(c.written()) == [200]
    conn.calls.append(("close", None))
    pb.settle()
    assert c.ended() == "abort"  # a truncated body is never passed on as complete
    assert pb.opens == []  # and not retried: the response had started
    assert conn.backend.errors_response == 1


def test_a_body_delimited_by_close_is_rechunked_and_the_client_keeps_its_connection() -> None:
    pb = Playbook()
    c = pb.client()
    pb.feed(c, GET)
    conn = pb.connect()
    pb.feed(conn, b"HTTP/1.1 200 OK\r\n\r\nall of it")
    conn.calls.append(("close", None))  # the backend's close ends the body
    pb.settle()
    assert b"transfer-encoding: chunked" in c.written().lower()
    assert c.written().endswith(b"9\r\nall of it\r\n0\r\n\r\n") and c.ended() is None


# deadlines -----------------------------------------------------------------------------------
def test_a_slow_request_head_gets_408() -> None:
    pb = Playbook(timeouts={"client_header": 10.0})
    c = pb.client()
    pb.feed(c, b"GET /a HTTP/1.1\r\nHo")
    pb.advance(9.0)
    assert c.written() == b""
    pb.advance(1.5)
    assert statuses(c.written()) == [408] and c.ended() == "close"
    assert pb.ctx.stats.timeouts == 1


def test_a_stalled_request_body_gets_408_and_frees_the_backend_connection() -> None:
    pb = Playbook(timeouts={"client_body": 5.0})
    c = pb.client()
    pb.feed(c, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    conn = pb.connect()
    pb.advance(4.0)
    pb.feed(c, b"d")  # progress restarts the body timer
    pb.advance(4.0)
    assert c.written() == b""
    pb.advance(2.0)
    assert statuses(c.written()) == [408] and c.ended() == "close"
    assert conn.ended() == "close"  # half a request: the pool closes that connection
    assert conn.backend.in_flight == 0


def test_an_idle_keep_alive_connection_is_closed_quietly() -> None:
    pb = Playbook(timeouts={"idle_keepalive": 30.0})
    c = pb.client()
    pb.feed(c, GET)
    pb.feed(pb.connect(), OK)
    before = c.written()
    pb.advance(29.0)
    assert c.ended() is None
    pb.advance(2.0)
    assert c.ended() == "close" and c.written() == before  # no 408 between requests


def test_a_backend_that_does_not_answer_in_time_is_retried_then_504() -> None:
    pb = Playbook(timeouts={"backend_response": 2.0})
    c = pb.client()
    pb.feed(c, GET)
    first = pb.connect()
    pb.advance(2.5)
    assert first.ended() == "close"
    second = pb.connect()
    assert second.backend is not first.backend
    pb.advance(2.5)
    assert statuses(c.written()) == [504] and b"did not answer in time" in c.written()
    assert pb.access_log()[-1]["status"] == 504


def test_waiting_for_a_connection_slot_times_out_with_503() -> None:
    pb = Playbook(
        backends=1,
        limits={"backend_max_connections": 1, "queue_size": 4},
        timeouts={"queue": 2.0},
    )
    a, b = pb.client(), pb.client()
    pb.feed(a, GET)
    pb.connect()
    pb.feed(b, GET)
    assert pb.opens == [] and pb.pool.waiting == 1
    pb.advance(2.5)
    assert statuses(b.written()) == [503] and b"timed out waiting" in b.written()
    assert b"retry-after: 1" in b.written().lower()
    assert pb.pool.waiting == 0 and pb.backend(0).in_flight == 1  # only a's


def test_a_full_queue_refuses_at_once() -> None:
    pb = Playbook(backends=1, limits={"backend_max_connections": 1, "queue_size": 0})
    a, b = pb.client(), pb.client()
    pb.feed(a, GET)
    pb.connect()
    pb.feed(b, GET)
    assert statuses(b.written()) == [503] and b"backend queue full" in b.written()


def test_a_waiter_gets_the_connection_its_predecessor_frees() -> None:
    pb = Playbook(backends=1, limits={"backend_max_connections": 1})
    a, b = pb.client(), pb.client()
    pb.feed(a, GET)
    conn = pb.connect()
    pb.feed(b, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    pb.feed(conn, OK)
    assert b"GET /b" in conn.written() and pb.pool.waiting == 0
    pb.feed(conn, OK)
    assert statuses(b.written()) == [200]


def test_an_expired_waiter_frees_the_queue_of_the_listener_it_waited_on() -> None:
    # Regression: the sweeper decremented the first listener's count for an exchange that
    # was queued on another listener (on 594f11e: counts (-1, 1) afterwards).
    pb = Playbook(
        backends=1,
        limits={"backend_max_connections": 1, "queue_size": 1},
        timeouts={"queue": 1.0},
    )
    other = pb.listener()
    a = pb.client()
    pb.feed(a, GET)
    pb.connect()
    b = pb.client(other)
    pb.feed(b, GET)
    assert pb.pool.waiting == 1
    pb.now += 2.0
    from balancer.io.sweeper import sweep

    sweep(pb.now, [pb.ctx, other], pb.cluster, pb.pool)
    pb.settle()
    assert statuses(b.written()) == [503] and pb.pool.waiting == 0
    c = pb.client(other)  # the queue has room again for the second listener
    pb.feed(c, GET)
    assert pb.pool.waiting == 1 and c.written() == b""


def test_idle_backend_connections_expire() -> None:
    pb = Playbook(backends=1, timeouts={"backend_idle": 15.0})
    c = pb.client()
    pb.feed(c, GET)
    conn = pb.connect()
    pb.feed(conn, OK)
    pb.advance(10.0)
    assert conn.ended() is None
    pb.advance(6.0)
    assert conn.ended() == "close" and pb.pool.counts(conn.backend.id) == (0, 0)


def test_a_refusal_before_the_body_lingers_then_closes() -> None:
    pb = Playbook(limits={"max_request_body": 10})
    c = pb.client()
    pb.feed(c, b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123")
    assert statuses(c.written()) == [413]
    assert "eof" in c.ops() and c.ended() is None  # FIN, not close: a RST could wipe the 413
    pb.feed(c, b"more body the client had in flight")
    assert c.ended() is None
    pb.advance(3.0)
    assert c.ended() == "close"


def test_a_tunnel_relays_both_ways_and_closes_when_idle() -> None:
    pb = Playbook(timeouts={"tunnel_idle": 60.0})
    c = pb.client()
    pb.feed(c, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    conn = pb.connect()
    pb.feed(
        conn,
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    assert statuses(c.written()) == [101]
    pb.feed(c, b"ping")
    pb.feed(conn, b"pong")
    assert conn.written().endswith(b"ping") and c.written().endswith(b"pong")
    pb.advance(61.0)
    assert c.ended() == "close" and conn.ended() == "close"
    assert pb.pool.counts(conn.backend.id) == (0, 0)


def test_a_malformed_request_after_good_ones_is_answered_after_them() -> None:
    pb = Playbook()
    c = pb.client()
    pb.feed(c, GET + b"BAD\x00 / HTTP/1.1\r\n\r\n")
    pb.feed(pb.connect(), OK)
    assert statuses(c.written()) == [200, 400]
    assert b"malformed request" in c.written() and b"Pause" not in c.written()


def test_a_hung_backend_declared_down_hands_its_requests_to_another() -> None:
    from balancer.http1.client import rescue_in_flight

    pb = Playbook()
    c = pb.client()
    pb.feed(c, GET)
    hung = pb.connect()
    assert rescue_in_flight(pb.ctx, hung.backend) == 1
    pb.settle()
    assert hung.ended() == "close"
    other = pb.connect()
    assert other.backend is not hung.backend
    pb.feed(other, OK)
    assert statuses(c.written()) == [200]


def test_writes_of_one_batch_leave_as_one_write() -> None:
    pb = Playbook()
    c = pb.client()
    pb.feed(c, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    conn = pb.connect()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
    conn.data_received(b"body")
    assert c.calls == []  # nothing leaves inside the batch
    pb.settle()
    assert c.calls == [("write", c.written())] and c.written().endswith(b"body")
