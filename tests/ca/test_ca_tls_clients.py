"""Real clients (curl, openssl s_client) against a CertStore-terminated server, CA-issued certs."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
import trustme

from balancer.tls.store import CertStore
from ca.core import CertAuthority

CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")
need_curl = pytest.mark.skipif(CURL is None, reason="curl binary not installed (apt install curl)")
need_openssl = pytest.mark.skipif(
    OPENSSL is None, reason="openssl binary not installed (apt install openssl)"
)
REQUEST = b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n"

Serve = Callable[[CertStore], Awaitable[int]]
CLI = Callable[..., "subprocess.CompletedProcess[str]"]


async def run(*argv: str | Path, stdin: bytes = b"") -> tuple[int, str]:
    """Run a client binary with a hard timeout; returns (exit code, stdout+stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.fixture
def web(ca_dir: Path, run_ca: CLI) -> CertStore:
    res = run_ca(
        "issue", "--dir", ca_dir, "--name", "web", "--dns", "web.test", "--ip", "127.0.0.1"
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return CertStore([(ca_dir / "web.crt", ca_dir / "web.key")])


def curl(ca_dir: Path, port: int, host: str = "web.test", *extra: str) -> list[str]:
    assert CURL is not None
    return [
        CURL, "-sS", "-v", "--max-time", "10", "--cacert", str(ca_dir / "ca.crt"),
        "--resolve", f"{host}:{port}:127.0.0.1", *extra, f"https://{host}:{port}/",
    ]  # fmt: skip


def s_client(ca_dir: Path, port: int, *extra: str) -> list[str]:
    assert OPENSSL is not None
    return [
        OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "web.test",
        "-CAfile", str(ca_dir / "ca.crt"), "-verify_return_error", "-verify_hostname",
        "web.test", "-ign_eof", *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------- curl


@need_curl
async def test_curl_verifies_chain_san_tls13_and_alpn(
    ca_dir: Path, web: CertStore, tls_server: Serve
) -> None:
    port = await tls_server(web)
    code, out = await run(*curl(ca_dir, port))
    assert code == 0, out
    assert "SSL certificate verify ok" in out
    assert "SSL connection using TLSv1.3" in out
    assert "ALPN: server accepted http/1.1" in out  # curl offered h2 too
    assert out.rstrip().splitlines()[-1].startswith("TLSv1.3 TLS_")

    # The IP SAN matches too.
    code, out = await run(*curl(ca_dir, port, "127.0.0.1"))
    assert code == 0, out


@need_curl
async def test_curl_refuses_wrong_name_and_untrusted_ca(
    ca_dir: Path, web: CertStore, tls_server: Serve, tmp_path: Path
) -> None:
    port = await tls_server(web)
    code, out = await run(*curl(ca_dir, port, "other.test"))
    assert code == 60, out  # CURLE_PEER_FAILED_VERIFICATION
    assert "no alternative certificate subject name matches" in out

    foreign = tmp_path / "foreign.crt"
    trustme.CA().cert_pem.write_to_path(str(foreign))
    code, out = await run(*curl(ca_dir, port, "web.test", "--cacert", str(foreign)))
    assert code == 60, out
    assert "unable to get local issuer certificate" in out


@need_curl
async def test_curl_rejects_expired_certificate(ca_dir: Path, tls_server: Serve) -> None:
    crt, key = CertAuthority.load(ca_dir).issue(
        "old", dns=["web.test"], lifetime=timedelta(hours=-1)
    )
    port = await tls_server(CertStore([(crt, key)]))
    code, out = await run(*curl(ca_dir, port))
    assert code == 60, out
    assert "certificate has expired" in out


# ---------------------------------------------------------------- openssl s_client


@need_openssl
async def test_s_client_tls13_verified_with_alpn(
    ca_dir: Path, web: CertStore, tls_server: Serve
) -> None:
    port = await tls_server(web)
    code, out = await run(*s_client(ca_dir, port, "-alpn", "h2,http/1.1"), stdin=REQUEST)
    assert code == 0, out
    assert "Verify return code: 0 (ok)" in out
    assert "New, TLSv1.3, Cipher is TLS_" in out
    assert "ALPN protocol: http/1.1" in out
    assert "HTTP/1.1 200 OK" in out


@need_openssl
async def test_s_client_tls12_gets_ecdhe_aead(
    ca_dir: Path, web: CertStore, tls_server: Serve
) -> None:
    port = await tls_server(web)
    code, out = await run(*s_client(ca_dir, port, "-tls1_2"), stdin=REQUEST)
    assert code == 0, out
    assert "New, TLSv1.2, Cipher is ECDHE-ECDSA-" in out
    assert "GCM" in out or "CHACHA20" in out


@need_openssl
async def test_s_client_tls11_refused(ca_dir: Path, web: CertStore, tls_server: Serve) -> None:
    port = await tls_server(web)
    # Deliberately weak client: SECLEVEL=0 so that it really offers TLS 1.1 and any refusal
    # comes from the server, not from the local OpenSSL policy.
    code, out = await run(
        *s_client(ca_dir, port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"), stdin=REQUEST
    )
    assert code != 0, out
    assert "New, (NONE), Cipher is (NONE)" in out
    assert "no peer certificate available" in out
    assert "HTTP/1.1 200 OK" not in out


@need_openssl
async def test_s_client_refuses_untrusted_ca_and_expired(
    ca_dir: Path, web: CertStore, tls_server: Serve, tmp_path: Path
) -> None:
    port = await tls_server(web)
    foreign = tmp_path / "foreign.crt"
    trustme.CA().cert_pem.write_to_path(str(foreign))
    argv = s_client(ca_dir, port)
    argv[argv.index("-CAfile") + 1] = str(foreign)
    code, out = await run(*argv, stdin=REQUEST)
    assert code != 0, out
    assert "verify error:num=20:unable to get local issuer certificate" in out
    assert "HTTP/1.1 200 OK" not in out

    crt, key = CertAuthority.load(ca_dir).issue(
        "old", dns=["web.test"], lifetime=timedelta(hours=-1)
    )
    port = await tls_server(CertStore([(crt, key)]))
    code, out = await run(*s_client(ca_dir, port), stdin=REQUEST)
    assert code != 0, out
    assert "verify error:num=10:certificate has expired" in out


@need_openssl
async def test_s_client_session_resumption(
    ca_dir: Path, web: CertStore, tls_server: Serve, tmp_path: Path
) -> None:
    port = await tls_server(web)
    session = tmp_path / "session.pem"
    code, out = await run(*s_client(ca_dir, port, "-sess_out", str(session)), stdin=REQUEST)
    assert code == 0, out
    assert "New, TLSv1.3" in out
    assert session.stat().st_size > 0

    code, out = await run(*s_client(ca_dir, port, "-sess_in", str(session)), stdin=REQUEST)
    assert code == 0, out
    assert "Reused, TLSv1.3" in out
    assert "HTTP/1.1 200 OK" in out


@need_openssl
async def test_s_client_resumption_survives_reload(
    ca_dir: Path,
    web: CertStore,
    tls_server: Serve,
    tmp_path: Path,
    run_ca: CLI,
) -> None:
    """Tickets are sealed with the front context's keys, which a reload does not replace."""
    port = await tls_server(web)
    session = tmp_path / "session.pem"
    code, out = await run(*s_client(ca_dir, port, "-sess_out", str(session)), stdin=REQUEST)
    assert code == 0, out
    assert run_ca("renew", "--dir", ca_dir, "web").returncode == 0
    assert web.maybe_reload() is True
    code, out = await run(*s_client(ca_dir, port, "-sess_in", str(session)), stdin=REQUEST)
    assert code == 0, out
    assert "Reused, TLSv1.3" in out
