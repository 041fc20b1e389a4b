"""HTTPS mode: the client verifies the backend against a throwaway trustme CA."""

from __future__ import annotations

import asyncio
import signal
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import trustme

from backends import BACKEND_HEADER
from backends.cli import make_server_ssl_context
from harness import Harness, run_backend


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pki(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(cert chain, key, CA cert) files for a backend on 127.0.0.1/localhost."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, ca_file = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    yield chain, key, ca_file


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_https_in_process(ca: trustme.CA, pki: tuple[Path, Path, Path]) -> None:
    chain, key, _ = pki
    server_ctx = make_server_ssl_context(str(chain), str(key))
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    async with (
        run_backend("tls1", ssl_context=server_ctx) as b,
        aiohttp.ClientSession() as s,
    ):
        assert b.url.startswith("https://127.0.0.1:")
        async with s.get(b.url + "/echo", ssl=client_context(ca)) as r:
            assert r.status == 200
            assert r.headers[BACKEND_HEADER] == "tls1"
            assert (await r.json())["scheme"] == "https"
        reader, writer = await asyncio.open_connection(b.host, b.port, ssl=client_context(ca))
        assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 10)).endswith(b"hello from tls1\n")
        writer.close()
        async with s.ws_connect(
            b.url.replace("https", "wss") + "/ws", ssl=client_context(ca)
        ) as ws:
            await ws.send_str("over tls")
            assert await ws.receive_str(timeout=5) == "over tls"


async def test_https_rejects_an_untrusting_client(pki: tuple[Path, Path, Path]) -> None:
    chain, key, _ = pki
    server_ctx = make_server_ssl_context(str(chain), str(key))
    other_ca = trustme.CA()
    async with (
        run_backend("tls2", ssl_context=server_ctx) as b,
        aiohttp.ClientSession() as s,
    ):
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await s.get(b.url + "/", ssl=client_context(other_ca))


async def test_https_refuses_tls_1_1(ca: trustme.CA, pki: tuple[Path, Path, Path]) -> None:
    chain, key, _ = pki
    server_ctx = make_server_ssl_context(str(chain), str(key))
    ctx = client_context(ca)
    # A client willing to speak only TLS 1.1 (SECLEVEL=0 lifts OpenSSL's own client-side
    # ban), so the refusal comes from the backend's TLS >= 1.2 floor.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    async with (
        run_backend("tls3", ssl_context=server_ctx) as b,
        aiohttp.ClientSession() as s,
    ):
        with pytest.raises(aiohttp.ClientConnectionError):
            await s.get(b.url + "/", ssl=ctx)


def test_https_subprocess(harness: Harness, ca: trustme.CA, pki: tuple[Path, Path, Path]) -> None:
    import http.client

    chain, key, ca_file = pki
    proc = harness.backend("tls-proc", tls_cert=chain, tls_key=key, ca_file=ca_file)
    assert proc.url == f"https://127.0.0.1:{proc.port}"
    conn = http.client.HTTPSConnection("127.0.0.1", proc.port, context=client_context(ca))
    conn.request("GET", "/")
    r = conn.getresponse()
    assert (r.status, r.getheader(BACKEND_HEADER), r.read()) == (
        200,
        "tls-proc",
        b"hello from tls-proc\n",
    )
    conn.close()
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
