"""Open-loop, fixed-rate HTTP load: GET a URL R times per second for D seconds.

Request i is *scheduled* at start + i/R whatever happened to earlier ones (open loop), so
a stalled balancer shows up as latency and errors instead of silently lowering the rate.
Every request's outcome is recorded; the run is bounded in count (R*D) and in time
(D + per-request timeout + a small grace).
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp

BACKEND_HEADER = "X-Backend"


@dataclass(frozen=True)
class Outcome:
    t_send: float  # clock() when the request was started
    latency: float | None  # seconds until the body was read; None when it never completed
    status: int | None
    error: str | None  # short error class/message when there is no status
    backend: str | None  # X-Backend of the response
    # the request's connection: "reused" (pooled), "new" (opened for it), "failed" (its
    # connect or TLS handshake failed), "waiting" (none yet: queued for a pool slot), or
    # None when unknown (outcomes built by hand)
    conn: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def client_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying client context: trusts our CA (or the system store when None)."""
    return ssl.create_default_context(cafile=ca_file)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:160] if text else type(exc).__name__


def connection_tracer() -> aiohttp.TraceConfig:
    """Records in each request's trace context which connection it got (see Outcome.conn)."""

    def setter(value: str) -> Callable[..., Any]:
        async def on_event(session: Any, ctx: SimpleNamespace, params: Any) -> None:
            if isinstance(ctx.trace_request_ctx, dict):
                ctx.trace_request_ctx["conn"] = value

        return on_event

    trace = aiohttp.TraceConfig()
    trace.on_connection_queued_start.append(setter("waiting"))
    trace.on_connection_create_start.append(setter("failed"))  # until create_end says "new"
    trace.on_connection_create_end.append(setter("new"))
    trace.on_connection_reuseconn.append(setter("reused"))
    return trace


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    clock: Callable[[], float],
    headers: dict[str, str],
) -> Outcome:
    t0 = clock()
    ctx: dict[str, str] = {"conn": "waiting"}
    try:
        async with session.get(url, headers=headers, trace_request_ctx=ctx) as resp:
            await resp.read()
            backend = resp.headers.get(BACKEND_HEADER)
            return Outcome(t0, clock() - t0, resp.status, None, backend, ctx["conn"])
    except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as exc:
        return Outcome(t0, None, None, _error_text(exc), None, ctx["conn"])


async def run_traffic(
    url: str,
    rate: float,
    duration: float,
    *,
    ca_file: str | None = None,
    keepalive: bool = True,
    timeout: float = 2.0,
    connections: int = 256,
    clock: Callable[[], float] = time.monotonic,
    on_outcome: Callable[[Outcome], None] | None = None,
    headers: dict[str, str] | None = None,
) -> list[Outcome]:
    """Send int(rate*duration) GETs to `url`, evenly spaced; return outcomes by send time."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be > 0")
    if timeout <= 0 or connections < 1:
        raise ValueError("timeout must be > 0 and connections >= 1")
    total = int(rate * duration)
    ssl_ctx = client_ssl_context(ca_file) if url.startswith("https://") else None
    connector = aiohttp.TCPConnector(
        limit=connections,
        limit_per_host=connections,
        force_close=not keepalive,  # new TCP (and TLS) connection per request
        ssl=ssl_ctx if ssl_ctx is not None else True,
    )
    outcomes: list[Outcome] = []
    pending: set[asyncio.Task[Outcome]] = set()

    def done(task: asyncio.Task[Outcome]) -> None:
        pending.discard(task)
        if task.cancelled():
            return
        outcome = task.result()
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    # total= covers waiting for a pooled connection slot too: an overloaded target
    # therefore shows up as timeouts, never as an unbounded queue here
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(
        connector=connector, timeout=client_timeout, trace_configs=[connection_tracer()]
    ) as session:
        start = clock()
        sent_at: dict[asyncio.Task[Outcome], float] = {}
        for i in range(total):
            delay = start + i / rate - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.get_running_loop().create_task(
                _one(session, url, clock, dict(headers or {}))
            )
            sent_at[task] = clock()
            pending.add(task)
            task.add_done_callback(done)
        if pending:
            # each request is bounded by `timeout`; the grace only covers scheduling slack
            await asyncio.wait(set(pending), timeout=timeout + 1.0)
        for task in list(pending):
            if task.done():  # finished; its callback has not run yet
                continue
            task.cancel()
            outcomes.append(Outcome(sent_at[task], None, None, "cancelled", None, None))
        await asyncio.gather(*sent_at, return_exceptions=True)
    outcomes.sort(key=lambda o: o.t_send)
    return outcomes
