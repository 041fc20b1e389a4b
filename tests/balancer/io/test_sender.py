"""Deferred writes through the asyncio driver: what a connection sends while the loop
handles one batch of events leaves in one write after the batch, in order, and a close
never loses it."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from balancer.config import BackendSpec, Config
from balancer.http1.exchange import ListenerContext, Pool, attach
from balancer.http1.pool import ConnectionPool
from balancer.io.backend import BackendProtocol
from balancer.io.client import ClientProtocol
from balancer.io.transport import loop_batch
from balancer.lb.cluster import Cluster


class FakeTransport:
    """Records what the connection does to its transport, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.calls.append(("write", data))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", None))

    def abort(self) -> None:
        self.closing = True
        self.calls.append(("abort", None))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.calls.append(("eof", None))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000)}.get(name, default)

    def pause_reading(self) -> None:
        self.calls.append(("pause", None))

    def resume_reading(self) -> None:
        self.calls.append(("resume", None))


def make_ctx() -> ListenerContext:
    loop = asyncio.get_running_loop()
    cfg = Config(listen="127.0.0.1:0", backends=(BackendSpec("127.0.0.1", 9),))
    cluster = Cluster(
        cfg.backends,
        cfg.algorithm,
        clock=loop.time,
        rng=random.Random(1),
        outlier=cfg.outlier,
        retries=cfg.retries,
    )
    pool: Pool = ConnectionPool(cfg.limits, cfg.timeouts, loop.time, lambda b, ex: None, attach)
    return ListenerContext(cfg, cluster, pool, clock=loop.time, batch=loop_batch(loop))


def client(ctx: ListenerContext) -> tuple[ClientProtocol, FakeTransport]:
    conn = ClientProtocol(ctx)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    return conn, t


async def next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_batch_leave_as_one_write_after_it() -> None:
    ctx = make_ctx()
    a, ta = client(ctx)
    b, tb = client(ctx)
    a._send(b"HTTP/1.1 200 OK\r\n\r\n")
    b._send(b"one")
    a._send(b"body")
    assert ta.calls == [] and tb.calls == []  # nothing leaves inside the batch
    assert ctx.batch.dirty == [a, b]
    await next_iteration()
    assert ta.calls == [("write", b"HTTP/1.1 200 OK\r\n\r\nbody")]
    assert tb.calls == [("write", b"one")]
    assert ctx.batch.dirty == [] and a.out is None
    b._send(b"two")  # a new batch schedules a new flush
    await next_iteration()
    assert tb.calls[-1] == ("write", b"two")


async def test_close_sends_what_waits_before_closing() -> None:
    ctx = make_ctx()
    conn, t = client(ctx)
    conn._send(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
    conn._close()
    assert t.calls == [("write", b"HTTP/1.1 503 Service Unavailable\r\n\r\n"), ("close", None)]
    await next_iteration()  # the scheduled flush finds nothing left and writes nothing
    assert len(t.calls) == 2


async def test_linger_sends_the_answer_before_the_fin() -> None:
    ctx = make_ctx()
    conn, t = client(ctx)
    conn._send(b"HTTP/1.1 413 Payload Too Large\r\n\r\n")
    conn._linger()
    assert [c[0] for c in t.calls] == ["write", "eof"]


async def test_abort_drops_what_waits() -> None:
    ctx = make_ctx()
    conn, t = client(ctx)
    conn._send(b"half a response")
    conn._abort()
    await next_iteration()
    assert t.calls == [("abort", None)]


async def test_backend_close_sends_a_tunnels_last_bytes_first() -> None:
    ctx = make_ctx()
    up = BackendProtocol(ctx, next(iter(ctx.cluster.backends.values())))
    t = FakeTransport()
    up.connection_made(t)  # type: ignore[arg-type]
    up._send(b"\x88\x02\x03\xe8")  # a WebSocket close frame
    up.close()
    assert t.calls == [("write", b"\x88\x02\x03\xe8"), ("close", None)]


async def test_the_driver_reports_peer_and_pauses_through_the_transport() -> None:
    ctx = make_ctx()
    conn, t = client(ctx)
    assert conn.client_ip == b"127.0.0.1" and ctx.stats.connections_open == 1
    conn._pause()
    conn._resume()
    assert t.calls == [("pause", None), ("resume", None)]
