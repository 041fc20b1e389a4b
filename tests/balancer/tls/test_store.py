"""balancer.tls: SNI selection, hot reload, mTLS and the client context, over real handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from balancer.tls.store import (
    CertStore,
    TLSConfigError,
    client_context,
    dns_matches,
    select_index,
    watch,
)
from ca.core import CertAuthority, init_ca

REPO = Path(__file__).resolve().parents[3]
IO_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 5.0


def _facts(sslobj: ssl.SSLObject | None) -> tuple[str, str]:
    """(TLS version, cipher) of the connection, as the response body reports them."""
    if sslobj is None:
        return "", ""
    cipher = sslobj.cipher()
    return sslobj.version() or "", cipher[0] if cipher else ""


# ---------------------------------------------------------------- helpers


class Served:
    """A tiny keep-alive HTTP/1.1 server terminating TLS with a CertStore's context."""

    def __init__(self) -> None:
        self.requests = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(20):  # bounded keep-alive
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
                self.requests += 1
                version, cipher = _facts(writer.get_extra_info("ssl_object"))
                peer = writer.get_extra_info("peercert")
                who = dict(x[0] for x in peer["subject"]).get("commonName", "-") if peer else "-"
                body = f"{version} {cipher} client={who}\n".encode()
                close = b"connection: close" in head.lower()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (len(body), b"Connection: close\r\n" if close else b"", body)
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[CertStore], Awaitable[Served]]]:
    servers: list[asyncio.Server] = []

    async def start(store: CertStore) -> Served:
        served = Served()
        server = await asyncio.start_server(
            served.handle,
            "127.0.0.1",
            0,
            ssl=store.context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        servers.append(server)
        served.port = server.sockets[0].getsockname()[1]
        return served

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @property
    def serial(self) -> int:
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number

    async def get(self) -> str:
        self.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(self.reader.readexactly(length), IO_TIMEOUT)
        return body.decode()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


async def connect(port: int, ctx: ssl.SSLContext, hostname: str) -> Conn:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=hostname),
        IO_TIMEOUT,
    )
    return Conn(reader, writer)


async def fetch(port: int, ctx: ssl.SSLContext, hostname: str) -> tuple[int, str]:
    """One request on a fresh connection: (peer certificate serial, response body)."""
    conn = await connect(port, ctx, hostname)
    try:
        return conn.serial, await conn.get()
    finally:
        await conn.close()


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.fixture
def ca(tmp_path: Path) -> CertAuthority:
    return init_ca(tmp_path / "ca")


@pytest.fixture
def ca_ctx(ca: CertAuthority) -> ssl.SSLContext:
    return client_context(ca.directory / "ca.crt")


# ---------------------------------------------------------------- pure matching


def test_dns_matches_wildcard_is_one_label() -> None:
    assert dns_matches("*.apps.test", "a.apps.test")
    assert dns_matches("*.apps.test", "A.Apps.Test.")
    assert not dns_matches("*.apps.test", "a.b.apps.test")
    assert not dns_matches("*.apps.test", "apps.test")
    assert dns_matches("web.test", "WEB.test")
    assert not dns_matches("web.test", "xweb.test")


def test_select_index_prefers_exact_then_wildcard_then_default() -> None:
    lo = ipaddress.ip_address("127.0.0.2")
    names = [
        (("default.test",), frozenset()),
        (("*.apps.test",), frozenset({lo})),
        (("x.apps.test",), frozenset()),
    ]
    assert select_index(names, None) == 0
    assert select_index(names, "") == 0
    assert select_index(names, "unknown.test") == 0
    assert select_index(names, "y.apps.test") == 1
    assert select_index(names, "x.apps.test") == 2  # exact beats the earlier wildcard
    assert select_index(names, "127.0.0.2") == 1
    assert select_index(names, "127.0.0.9") == 0


# ---------------------------------------------------------------- SNI


async def test_sni_selects_certificate_per_name(
    ca: CertAuthority, ca_ctx: ssl.SSLContext, serve: Callable[[CertStore], Awaitable[Served]]
) -> None:
    a_crt, a_key = ca.issue("a", dns=["a.test"], ips=["127.0.0.1"])
    b_crt, b_key = ca.issue("b", dns=["b.test", "*.b.test"])
    store = CertStore([(a_crt, a_key), (b_crt, b_key)])
    served = await serve(store)

    assert (await fetch(served.port, ca_ctx, "a.test"))[0] == serial_of(a_crt)
    assert (await fetch(served.port, ca_ctx, "b.test"))[0] == serial_of(b_crt)
    assert (await fetch(served.port, ca_ctx, "www.b.test"))[0] == serial_of(b_crt)
    # Python sends no SNI for an IP literal: the default (first) certificate answers.
    assert (await fetch(served.port, ca_ctx, "127.0.0.1"))[0] == serial_of(a_crt)
    # Unknown name: default cert, which the client then rightly refuses.
    with pytest.raises(ssl.SSLCertVerificationError):
        await fetch(served.port, ca_ctx, "c.test")


async def test_negotiates_tls13_alpn_and_reports_facts(
    ca: CertAuthority, ca_ctx: ssl.SSLContext, serve: Callable[[CertStore], Awaitable[Served]]
) -> None:
    store = CertStore([ca.issue("web", dns=["web.test"])])
    served = await serve(store)
    conn = await connect(served.port, ca_ctx, "web.test")
    try:
        body = await conn.get()
        sslobj = conn.writer.get_extra_info("ssl_object")
        assert sslobj.selected_alpn_protocol() == "http/1.1"
        version, cipher = _facts(sslobj)
    finally:
        await conn.close()
    assert version == "TLSv1.3"
    assert cipher.startswith("TLS_")
    assert body.startswith(f"TLSv1.3 {cipher} ")


async def test_tls12_uses_only_ecdhe_aead(
    ca: CertAuthority, serve: Callable[[CertStore], Awaitable[Served]]
) -> None:
    store = CertStore([ca.issue("web", dns=["web.test"])])
    served = await serve(store)
    ctx = client_context(ca.directory / "ca.crt")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    _, body = await fetch(served.port, ctx, "web.test")
    version, cipher = body.split()[:2]
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)


# ---------------------------------------------------------------- hot reload


async def test_reload_new_handshakes_get_new_cert_old_connections_untouched(
    ca: CertAuthority, ca_ctx: ssl.SSLContext, serve: Callable[[CertStore], Awaitable[Served]]
) -> None:
    crt, key = ca.issue("web", dns=["web.test"], ips=["127.0.0.1"])
    old_serial = serial_of(crt)
    store = CertStore([(crt, key)])
    served = await serve(store)

    established = await connect(served.port, ca_ctx, "web.test")
    try:
        assert established.serial == old_serial
        assert store.maybe_reload() is None  # nothing changed yet

        ca.renew("web")
        new_serial = serial_of(crt)
        assert new_serial != old_serial
        assert store.maybe_reload() is True
        assert store.cert_info()[0]["serial"] == f"{new_serial:x}"

        assert (await fetch(served.port, ca_ctx, "web.test"))[0] == new_serial
        assert (await fetch(served.port, ca_ctx, "127.0.0.1"))[0] == new_serial  # no SNI
        # The connection set up before the swap keeps working with its certificate.
        assert (await established.get()).startswith("TLSv1.3")
        assert established.serial == old_serial
    finally:
        await established.close()
    assert store.maybe_reload() is None


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def test_broken_replacement_is_refused_and_old_cert_kept(
    ca: CertAuthority,
    ca_ctx: ssl.SSLContext,
    serve: Callable[[CertStore], Awaitable[Served]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    crt, key = ca.issue("web", dns=["web.test"])
    other_crt, other_key = ca.issue("other", dns=["other.test"])
    good_serial = serial_of(crt)
    good_crt, good_key = crt.read_bytes(), key.read_bytes()
    store = CertStore([(crt, key)])
    served = await serve(store)

    broken: list[tuple[Path, bytes]] = [
        (crt, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"),
        (crt, b"hello"),
        (key, other_key.read_bytes()),  # key of another certificate: mismatch
        (key, b""),
    ]
    for path, data in broken:
        _replace(path, data)
        with caplog.at_level(logging.ERROR, logger="balancer.tls"):
            caplog.clear()
            assert store.maybe_reload() is False
        assert store.last_error
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
        assert store.maybe_reload() is None  # not retried (or re-logged) until a change
        assert (await fetch(served.port, ca_ctx, "web.test"))[0] == good_serial
        _replace(crt, good_crt)
        _replace(key, good_key)
        assert store.maybe_reload() is True
        assert store.last_error is None

    crt.unlink()
    assert store.maybe_reload() is False
    assert "web.crt" in (store.last_error or "")
    assert (await fetch(served.port, ca_ctx, "web.test"))[0] == good_serial
    assert other_crt.exists()


async def test_watch_task_picks_up_renewal(
    ca: CertAuthority, ca_ctx: ssl.SSLContext, serve: Callable[[CertStore], Awaitable[Served]]
) -> None:
    crt, key = ca.issue("web", dns=["web.test"])
    store = CertStore([(crt, key)])
    served = await serve(store)
    task = asyncio.create_task(watch(store, interval=0.01))
    try:
        ca.renew("web")
        for _ in range(500):  # bounded: at most ~5 s
            if store.reloads:
                break
            await asyncio.sleep(0.01)
        assert store.reloads == 1
        assert (await fetch(served.port, ca_ctx, "web.test"))[0] == serial_of(crt)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_bad_initial_files_raise_clear_errors(ca: CertAuthority, tmp_path: Path) -> None:
    crt, key = ca.issue("web", dns=["web.test"])
    other_crt, other_key = ca.issue("other", dns=["other.test"])
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    cases = [
        ([(tmp_path / "missing.crt", key)], "missing.crt"),
        ([(junk, key)], "not a PEM certificate"),
        ([(crt, other_key)], "key does not match"),
        ([(crt, junk)], "junk.pem"),
        ([], "at least one"),
    ]
    for pairs, message in cases:
        with pytest.raises(TLSConfigError, match=message):
            CertStore(pairs)
    with pytest.raises(TLSConfigError, match="below TLSv1_2"):
        CertStore([(crt, key)], min_version=ssl.TLSVersion.TLSv1_1)
    with pytest.raises(TLSConfigError, match="client CA"):
        CertStore([(crt, key)], client_ca=junk)
    assert other_crt.exists()


def test_client_only_certificate_is_refused_at_start_and_on_reload(
    ca: CertAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    crt, key = ca.issue("web", dns=["web.test"])
    client_crt, client_key = ca.issue("alice", dns=["alice.test"], client=True)
    with pytest.raises(TLSConfigError, match=r"alice\.crt: extended key usage .* server auth"):
        CertStore([(client_crt, client_key)])
    store = CertStore([(crt, key)])
    good_serial = store.cert_info()[0]["serial"]
    _replace(crt, client_crt.read_bytes())
    _replace(key, client_key.read_bytes())
    with caplog.at_level(logging.ERROR, logger="balancer.tls"):
        assert store.maybe_reload() is False
    assert "does not allow server auth" in (store.last_error or "")
    assert "\n" not in (store.last_error or "")
    assert store.cert_info()[0]["serial"] == good_serial  # still serving the old one


def test_balancer_refuses_a_client_certificate_in_one_line(ca: CertAuthority) -> None:
    client_crt, client_key = ca.issue("alice", dns=["alice.test"], client=True)
    argv = [sys.executable, "-m", "balancer", "--listen", "127.0.0.1:0"]
    argv += ["--backend", "127.0.0.1:9", "--tls-cert", str(client_crt)]
    argv += ["--tls-key", str(client_key)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "cannot start" in lines[0] and "does not allow server auth" in lines[0]


def test_cert_info_lists_names_serial_expiry(ca: CertAuthority) -> None:
    a = ca.issue("a", dns=["a.test"], ips=["127.0.0.1"])
    b = ca.issue("b", dns=["b.test"], lifetime=timedelta(hours=-1))  # already expired
    info = CertStore([a, b]).cert_info()
    assert [i["names"] for i in info] == [["a.test", "127.0.0.1"], ["b.test"]]
    assert [i["default"] for i in info] == [True, False]
    assert info[0]["serial"] == f"{serial_of(a[0]):x}"
    assert [i["expired"] for i in info] == [False, True]
    assert info[0]["not_after"].endswith("+00:00")
    leaf = x509.load_pem_x509_certificate(Path(a[0]).read_bytes())
    assert info[0]["issuer"] == leaf.issuer.rfc4514_string() and "O=" in info[0]["issuer"]
    assert info[0]["sha256"] == leaf.fingerprint(hashes.SHA256()).hex(":").upper()
    assert info[0]["sha256"] != info[1]["sha256"]


# ---------------------------------------------------------------- mTLS


async def test_mtls_requires_a_client_cert_from_our_ca(
    ca: CertAuthority, serve: Callable[[CertStore], Awaitable[Served]]
) -> None:
    cafile = ca.directory / "ca.crt"
    server = ca.issue("web", dns=["web.test"])
    store = CertStore([server], client_ca=cafile)
    served = await serve(store)

    # No client certificate: TLS 1.3 reports the refusal on the first read.
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await fetch(served.port, client_context(cafile), "web.test")

    # A client certificate from another CA.
    stranger = trustme.CA().issue_cert("mallory")
    pem = stranger.private_key_and_cert_chain_pem
    with pem.tempfile() as both:
        ctx = client_context(cafile, both)
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await fetch(served.port, ctx, "web.test")

    # Our CA, but a server-only certificate (EKU serverAuth) used as a client cert.
    other_server = ca.issue("other", dns=["other.test"])
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await fetch(served.port, client_context(cafile, *other_server), "web.test")
    assert served.requests == 0

    alice_crt, alice_key = ca.issue("alice", client=True)
    _, body = await fetch(served.port, client_context(cafile, alice_crt, alice_key), "web.test")
    assert body.rstrip().endswith("client=alice")
    assert served.requests == 1


async def test_mtls_client_ca_rotation_on_reload(
    tmp_path: Path, serve: Callable[[CertStore], Awaitable[Served]]
) -> None:
    old_ca, new_ca = init_ca(tmp_path / "old"), init_ca(tmp_path / "new")
    client_ca = tmp_path / "clients.crt"
    client_ca.write_bytes(old_ca.cert_pem())
    server = old_ca.issue("web", dns=["web.test"])
    store = CertStore([server], client_ca=client_ca)
    served = await serve(store)
    server_ca = old_ca.directory / "ca.crt"
    old_client = client_context(server_ca, *old_ca.issue("alice", client=True))
    new_client = client_context(server_ca, *new_ca.issue("bob", client=True))

    assert (await fetch(served.port, old_client, "web.test"))[1].endswith("client=alice\n")
    _replace(client_ca, new_ca.cert_pem())
    assert store.maybe_reload() is True
    assert (await fetch(served.port, new_client, "web.test"))[1].endswith("client=bob\n")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await fetch(served.port, old_client, "web.test")


# ---------------------------------------------------------------- client context


async def test_client_context_verifies_chain_and_hostname(
    ca: CertAuthority, serve: Callable[[CertStore], Awaitable[Served]], tmp_path: Path
) -> None:
    served = await serve(CertStore([ca.issue("web", dns=["web.test"])]))
    ctx = client_context(ca.directory / "ca.crt")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert (await fetch(served.port, ctx, "web.test"))[1].startswith("TLSv1.3")

    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await fetch(served.port, ctx, "other.test")

    foreign = tmp_path / "foreign.crt"
    trustme.CA().cert_pem.write_to_path(str(foreign))
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        await fetch(served.port, client_context(foreign), "web.test")

    with pytest.raises(TLSConfigError, match="CA file"):
        client_context(tmp_path / "nope.crt")
    with pytest.raises(TLSConfigError, match="without its certificate"):
        client_context(ca.directory / "ca.crt", key=ca.directory / "web.key")


# ---------------------------------------------------------------- uvloop


def test_sni_and_reload_work_under_uvloop(ca: CertAuthority, ca_ctx: ssl.SSLContext) -> None:
    """The listener may run on uvloop, whose SSL layer drives the sni_callback itself."""
    uvloop = pytest.importorskip("uvloop")
    a_crt, a_key = ca.issue("a", dns=["a.test"])
    b_crt, b_key = ca.issue("b", dns=["b.test"])
    store = CertStore([(a_crt, a_key), (b_crt, b_key)])

    async def scenario() -> None:
        served = Served()
        server = await asyncio.start_server(
            served.handle, "127.0.0.1", 0, ssl=store.context, ssl_handshake_timeout=5.0
        )
        served.port = server.sockets[0].getsockname()[1]
        try:
            assert (await fetch(served.port, ca_ctx, "b.test"))[0] == serial_of(b_crt)
            old = serial_of(a_crt)
            assert (await fetch(served.port, ca_ctx, "a.test"))[0] == old
            ca.renew("a")
            assert store.maybe_reload() is True
            new, body = await fetch(served.port, ca_ctx, "a.test")
            assert new == serial_of(a_crt) != old
            assert body.startswith("TLSv1.3")
        finally:
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert "uvloop" in type(runner.get_loop()).__module__
        runner.run(scenario())
