"""The straightforward aiohttp streaming reverse proxy a user would otherwise write.

It is the "what you'd get without a purpose-built balancer" baseline: correct and
reasonable (shared ClientSession with a bounded connection pool, streamed bodies,
uvloop when available), with no special tuning.

    python -m bench.naive_proxy --listen 127.0.0.1:8080 \
        --backend 127.0.0.1:9001 --backend 127.0.0.1:9002 [--tls-cert F --tls-key F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence

import aiohttp
from aiohttp import web

# Hop-by-hop headers (RFC 9110 7.6.1) are per-connection and must not be forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
CONNECTOR_LIMIT = 256


def forwardable(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers, including any named in Connection."""
    items = list(pairs)
    named = {
        token.strip().lower()
        for k, v in items
        if k.lower() == "connection"
        for token in v.split(",")
    }
    return [(k, v) for k, v in items if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def make_handler(
    backends: Sequence[str],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    rotation: Iterator[str] = itertools.cycle(backends)

    async def handle(request: web.Request) -> web.StreamResponse:
        session = request.app[SESSION_KEY]
        headers = forwardable(request.headers.items())
        headers.append(("X-Forwarded-For", request.remote or ""))
        body = request.content.iter_chunked(65536) if request.body_exists else None
        try:
            upstream = await session.request(
                request.method,
                f"http://{next(rotation)}{request.rel_url}",
                headers=headers,
                data=body,
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        except (TimeoutError, aiohttp.ClientError):
            return web.Response(status=502, text="bad gateway\n")
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in forwardable(upstream.headers.items()):
                response.headers.add(k, v)
            await response.prepare(request)
            # A backend failing mid-body propagates and aborts the client connection.
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    return handle


def build_app(backends: Sequence[str]) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", make_handler(backends))

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=CONNECTOR_LIMIT, limit_per_host=0)
        async with aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
        ) as session:
            app[SESSION_KEY] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    return app


async def serve(host: str, port: int, backends: Sequence[str], tls: ssl.SSLContext | None) -> None:
    runner = web.AppRunner(build_app(backends), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=tls, backlog=1024).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_proxy", description=__doc__)
    parser.add_argument("--listen", type=_hostport, required=True, metavar="HOST:PORT")
    parser.add_argument(
        "--backend", type=_hostport, action="append", required=True, metavar="HOST:PORT"
    )
    parser.add_argument("--tls-cert", metavar="FILE")
    parser.add_argument("--tls-key", metavar="FILE")
    args = parser.parse_args(argv)

    tls: ssl.SSLContext | None = None
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"naive_proxy: cannot load TLS cert/key: {exc}", file=sys.stderr)
            return 2
        tls.set_alpn_protocols(["http/1.1"])

    backends = [f"{h}:{p}" for h, p in args.backend]
    host, port = args.listen
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(host, port, backends, tls))
    except OSError as exc:
        print(f"naive_proxy: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
