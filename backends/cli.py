"""Command line for ``python -m backends``: parse arguments, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from aiohttp import web

from backends.app import MAX_DELAY_MS, PROXIED_KEY, PROXIED_MAX, make_app, validate_name
from balancer.io.proxied import ProxiedServer, listening_socket

DEFAULT_KEEPALIVE_S = 75.0
DEFAULT_SHUTDOWN_S = 8.0  # below docker stop's 10 s grace, so we exit before SIGKILL
FLUSH_POLL_S = 0.01
log = logging.getLogger("backends")
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'


def _port(raw: str) -> int:
    if not (raw.isascii() and raw.isdecimal()) or not 0 <= int(raw) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {raw!r} (want 0-65535)")
    return int(raw)


def _delay(raw: str) -> int:
    if not (raw.isascii() and raw.isdecimal()) or not 0 <= int(raw) <= MAX_DELAY_MS:
        raise argparse.ArgumentTypeError(f"invalid delay {raw!r} (want 0-{MAX_DELAY_MS})")
    return int(raw)


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"invalid duration {raw!r} (want seconds, 0 < s <= 86400)")
    return value


def _name(raw: str) -> str:
    try:
        return validate_name(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid name {raw!r}: {exc}") from None


class _OneLineParser(argparse.ArgumentParser):
    """Bad input gives one line on stderr (not the usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m backends",
        description="Demo HTTP backend for the lb-testbed balancer. Every response carries "
        "'X-Backend: NAME'. Endpoints: / /echo /delay?ms=N /bytes?n=N[&chunked=1] "
        "/status/CODE /healthz /admin/health /upload /ws.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=_port, required=True, help="port to bind (0 = any free)")
    parser.add_argument("--name", type=_name, required=True, help="value of the X-Backend header")
    parser.add_argument(
        "--delay-ms",
        type=_delay,
        default=0,
        metavar="MS",
        help="delay added to every response (slow backend)",
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    parser.add_argument(
        "--keepalive-timeout",
        type=_seconds,
        default=DEFAULT_KEEPALIVE_S,
        metavar="S",
        help="idle keep-alive timeout in seconds (default %(default)s); keep it longer than "
        "the balancer's upstream idle timeout so the backend never closes a connection the "
        "balancer is about to reuse",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=DEFAULT_SHUTDOWN_S,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds to let in-flight requests finish and reach the client "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--access-log", action="store_true", help="log one line per request to stderr"
    )
    parser.add_argument(
        "--accept-proxy",
        type=_cidrs,
        metavar="CIDR[,CIDR]",
        help="read a PROXY v1/v2 header from these sources; /echo reports the client it names",
    )
    return parser


def _cidrs(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        nets = tuple(
            ipaddress.ip_network(c.strip(), strict=False) for c in raw.split(",") if c.strip()
        )
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CIDR[,CIDR], got {raw!r}") from None
    if not nets:
        raise argparse.ArgumentTypeError(f"expected CIDR[,CIDR], got {raw!r}")
    return nets


def make_server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class OneLineFormatter(logging.Formatter):
    """Log records as single lines: a malformed request must not print a traceback."""

    def formatException(self, ei: Any) -> str:
        exc = ei[1]
        text = " ".join(str(exc).split())[:300]
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


def configure_logging(name: str, access_log: bool) -> logging.Logger | None:
    """Warnings and errors (aiohttp's included) go to stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(f"{name} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    if not access_log:
        return None
    log = logging.getLogger("backends.access")
    log.setLevel(logging.INFO)
    log.propagate = False
    access = logging.StreamHandler(sys.stderr)
    access.setFormatter(logging.Formatter(f"{name} %(message)s"))
    log.addHandler(access)
    return log


async def serve(
    args: argparse.Namespace,
    ssl_context: ssl.SSLContext | None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully.

    A graceful stop has three steps: stop listening, let in-flight handlers finish (aiohttp's
    ``runner.cleanup()``, bounded by ``--shutdown-timeout``), then keep the event loop running
    until every connection has really closed. The last step is ours: aiohttp ends each
    connection with ``transport.close()``, which only *starts* a graceful close. The transport
    may still hold up to ~80 KB of the response in its user-space write buffer (the handler's
    last ``write()`` does not wait for it to drain), and those bytes are only sent while the
    loop runs. Returning straight after ``cleanup()`` closed the loop and exited the process
    with them unsent: the client saw a clean EOF, a few dozen KB short.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    access_log = configure_logging(args.name, args.access_log)
    app = make_app(args.name, args.delay_ms)
    closing: list[asyncio.BaseTransport] = []

    async def remember_connections(_app: web.Application) -> None:
        # on_shutdown runs after the listener closed and before aiohttp closes connections:
        # this is every connection that can still have bytes to deliver.
        for handler in runner.server.connections if runner.server is not None else ():
            if handler.transport is not None:
                closing.append(handler.transport)

    app.on_shutdown.append(remember_connections)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        keepalive_timeout=args.keepalive_timeout,
        shutdown_timeout=args.shutdown_timeout,
        access_log=access_log,
        access_log_format=ACCESS_LOG_FORMAT,
    )
    await runner.setup()
    proxied_server: ProxiedServer | None = None
    try:
        if getattr(args, "accept_proxy", None):
            proxied_server = _proxied_site(runner, app, args, ssl_context)
            host, port = proxied_server.sockets[0].getsockname()[:2]
        else:
            site = web.TCPSite(runner, args.host, args.port, ssl_context=ssl_context)
            await site.start()
            host, port = runner.addresses[0][:2]
        scheme = "https" if ssl_context else "http"
        shown = f"[{host}]" if ":" in host else host
        if on_ready is not None:
            on_ready(f"{scheme}://{shown}:{port}")
        await stop.wait()
    finally:
        deadline = loop.time() + args.shutdown_timeout
        if proxied_server is not None:
            proxied_server.close()
        await runner.cleanup()
        await wait_closed(closing, deadline)


def _proxied_site(
    runner: web.AppRunner,
    app: web.Application,
    args: argparse.Namespace,
    ssl_context: ssl.SSLContext | None,
) -> ProxiedServer:
    """Listen with the balancer's PROXY-header reader in front of aiohttp: each connection's
    header is taken off before aiohttp (and TLS) sees a byte."""
    server = runner.server
    assert server is not None
    proxied = app[PROXIED_KEY]

    def factory(client: str | None, peer: tuple[str, int]) -> asyncio.Protocol:
        proxied.pop(peer, None)
        proxied[peer] = client  # None: no header (an untrusted source), the peer stands
        while len(proxied) > PROXIED_MAX:
            del proxied[next(iter(proxied))]
        return server()

    return ProxiedServer(
        listening_socket(args.host, args.port), factory, args.accept_proxy, ssl_context, 5.0
    )


def _closed(transport: asyncio.BaseTransport) -> bool:
    # A transport's socket reports fileno() -1 once the transport has really closed (asyncio
    # and uvloop alike; for TLS it is the underlying TCP socket). is_closing() is not enough:
    # it turns true when close() is called, while the write buffer may still be flushing.
    sock = transport.get_extra_info("socket")
    return sock is None or sock.fileno() == -1


async def wait_closed(transports: Sequence[asyncio.BaseTransport], deadline: float) -> None:
    """Run the loop until every transport has closed (flushed its write buffer), or until
    ``deadline`` (loop time); log what is still unsent then, since the exit will drop it."""
    loop = asyncio.get_running_loop()
    pending = [t for t in transports if not _closed(t)]
    while pending and loop.time() < deadline:
        await asyncio.sleep(FLUSH_POLL_S)
        pending = [t for t in pending if not _closed(t)]
    if pending:
        unsent = sum(
            t.get_write_buffer_size() for t in pending if isinstance(t, asyncio.WriteTransport)
        )
        log.warning(
            "shutdown timeout: %d connection(s) still open, %d byte(s) unsent",
            len(pending),
            unsent,
        )


def _announce(url: str, name: str) -> None:
    # One stdout line; spawn_backend_process reads it to learn the port when --port 0.
    print(f"backend {name} listening on {url}", flush=True)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep it optional
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key must be given together")
    ssl_context = None
    if args.tls_cert is not None:
        try:
            ssl_context = make_server_ssl_context(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"backends: error: cannot load TLS certificate/key: {exc}", file=sys.stderr)
            return 2
    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(serve(args, ssl_context, lambda url: _announce(url, args.name)))
    except OSError as exc:
        print(f"backends: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - SIGINT before the handler was installed
        pass
    return 0
