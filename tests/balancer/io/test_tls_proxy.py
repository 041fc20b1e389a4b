"""TLS through the real balancer process: termination, SNI, hot reload under load, mTLS,
re-encryption to backends, hostile input on the TLS port and the HTTP->HTTPS redirect.

Every balancer and backend here is a child process (`python -m balancer`, `python -m
backends`) on free loopback ports; all of them are killed at teardown.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ca.core import CertAuthority, init_ca
from harness import REPO, BackendProc, BalancerProc, LoadLoop, free_port, wait_until
from harness.http import IO_TIMEOUT

# ---------------------------------------------------------------- processes


# ---------------------------------------------------------------- certificates


@pytest.fixture
def ca(tmp_path: Path) -> CertAuthority:
    ca = init_ca(tmp_path / "ca")
    ca.issue("lb", dns=["localhost"], ips=["127.0.0.1"])
    return ca


def ca_file(ca: CertAuthority) -> str:
    return str(ca.directory / "ca.crt")


def client_ctx(ca: CertAuthority, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number


def tls_args(ca: CertAuthority, name: str = "lb") -> list[str]:
    return ["--tls-cert", str(ca.cert_path(name)), "--tls-key", str(ca.key_path(name))]


# ---------------------------------------------------------------- clients


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    version: str | None
    alpn: str | None
    serial: int


def https_get(
    port: int, path: str, ctx: ssl.SSLContext, sni: str = "localhost", timeout: float = IO_TIMEOUT
) -> Reply:
    """One request on a fresh verified TLS connection to 127.0.0.1, SNI `sni`."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        serial = x509.load_der_x509_certificate(der).serial_number
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        resp = http.client.HTTPResponse(tls)
        resp.begin()
        body = resp.read()
        return Reply(
            resp.status, resp.headers, body, tls.version(), tls.selected_alpn_protocol(), serial
        )


def plain_get(port: int, path: str) -> tuple[int, str | None]:
    """(status, X-Backend) of one plain HTTP request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.headers["X-Backend"]
    finally:
        conn.close()


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """(bytes read, whether the peer closed/reset within `timeout`)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except OSError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def tls_load(port: int, ctx: ssl.SSLContext, duration: float) -> LoadLoop[int]:
    """A new verified TLS connection per request until `duration` is over; records the
    serial of the certificate each 200 came with."""

    def one() -> tuple[int, int]:
        r = https_get(port, "/", ctx)
        return r.status, r.serial

    return LoadLoop(one, duration)


@pytest.fixture
def balancer(balancer: Callable[..., BalancerProc]) -> Callable[..., BalancerProc]:
    """The conftest's `balancer`, listening on a port of its choosing."""

    def start(*args: str, name: str = "lb") -> BalancerProc:
        return balancer("--listen", "127.0.0.1:0", *args, name=name)

    return start


# ---------------------------------------------------------------- tests


def test_https_listener_tls13_alpn_forwarded_proto_and_facts(
    ca: CertAuthority, backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    b = backend("a")
    lb = balancer("--backend", f"127.0.0.1:{b.port}", "--tls-facts", *tls_args(ca))
    ctx = client_ctx(ca)
    r = https_get(lb.port, "/", ctx)
    assert r.status == 200
    assert r.headers["X-Backend"] == "a"
    assert r.version == "TLSv1.3"
    assert r.alpn == "http/1.1"
    assert r.serial == serial_of(ca.cert_path("lb"))
    assert r.headers["Strict-Transport-Security"]

    echo = json.loads(https_get(lb.port, "/echo", ctx).body)
    seen = {k.lower(): v for k, v in echo["headers"]}
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-tls-version"] == "TLSv1.3"
    assert seen["x-forwarded-tls-cipher"].startswith("TLS_")


def test_sni_picks_the_certificate_per_name(
    ca: CertAuthority, backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    ca.issue("site-a", dns=["a.test"])
    ca.issue("site-b", dns=["b.test"])
    b = backend("a")
    lb = balancer(
        "--backend", f"127.0.0.1:{b.port}", *tls_args(ca, "site-a"), *tls_args(ca, "site-b")
    )
    ctx = client_ctx(ca)
    ra = https_get(lb.port, "/", ctx, sni="a.test")
    rb = https_get(lb.port, "/", ctx, sni="b.test")
    assert (ra.status, rb.status) == (200, 200)
    assert ra.serial == serial_of(ca.cert_path("site-a"))
    assert rb.serial == serial_of(ca.cert_path("site-b"))
    # an unknown name gets the default (first) certificate, which then fails verification
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(lb.port, "/", ctx, sni="c.test")


def _replace_file(dst: Path, data: bytes) -> None:
    tmp = dst.with_name(dst.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, dst)


def test_hot_reload_under_load_then_broken_replacement_is_refused(
    ca: CertAuthority,
    tmp_path: Path,
    backend: Callable[..., BackendProc],
    balancer: Callable[..., BalancerProc],
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "lb.crt", live / "lb.key"
    cert.write_bytes(ca.cert_path("lb").read_bytes())
    key.write_bytes(ca.key_path("lb").read_bytes())
    ca.issue("lb-v2", dns=["localhost"], ips=["127.0.0.1"])
    old, new = serial_of(cert), serial_of(ca.cert_path("lb-v2"))
    b = backend("a")
    lb = balancer(
        "--backend", f"127.0.0.1:{b.port}", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    ctx = client_ctx(ca)

    with tls_load(lb.port, ctx, duration=4.0) as load:
        time.sleep(0.5)
        # key first, then the cert after more than one watcher poll (1 s): the watcher sees
        # a key that does not match the certificate, refuses it and keeps the old pair
        _replace_file(key, ca.key_path("lb-v2").read_bytes())
        assert lb.wait_output("key does not match certificate", 5.0), lb.output()
        _replace_file(cert, ca.cert_path("lb-v2").read_bytes())
        assert lb.wait_output("TLS certificates reloaded", 5.0), lb.output()
        load.wait()
    assert load.failures == []
    assert load.ok > 20
    assert load.changes() == [old, new]  # never a third thing, never back
    assert https_get(lb.port, "/", ctx).serial == new

    # garbage where the certificate was: refused, logged, the current one keeps serving
    _replace_file(cert, b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    assert lb.wait_output("lb.crt: not a PEM certificate", 10.0), lb.output()
    with tls_load(lb.port, ctx, duration=1.0) as after:
        after.wait()
    assert after.failures == []
    assert after.changes() == [new]


def test_mtls_accepts_only_our_client_certificates(
    ca: CertAuthority,
    tmp_path: Path,
    backend: Callable[..., BackendProc],
    balancer: Callable[..., BalancerProc],
) -> None:
    ours = ca.issue("alice", dns=["alice.test"], client=True)
    other_ca = init_ca(tmp_path / "other-ca")
    theirs = other_ca.issue("mallory", dns=["mallory.test"], client=True)
    b = backend("a")
    lb = balancer("--backend", f"127.0.0.1:{b.port}", *tls_args(ca), "--tls-client-ca", ca_file(ca))

    # a server certificate of our CA (EKU serverAuth only) does not authenticate a client
    server_only = ca.issue("web", dns=["web.test"])
    for cert in (None, theirs, server_only):
        # TLS 1.3: the server checks the client certificate after the client's handshake
        # finished, so the refusal may surface on the first read instead
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            https_get(lb.port, "/", client_ctx(ca, cert))
    r = https_get(lb.port, "/", client_ctx(ca, ours))
    assert r.status == 200
    assert r.headers["X-Backend"] == "a"


def test_reencryption_verifies_backends_against_our_ca(
    ca: CertAuthority,
    tmp_path: Path,
    backend: Callable[..., BackendProc],
    balancer: Callable[..., BalancerProc],
) -> None:
    ca.issue("backend", ips=["127.0.0.1"])
    other_ca = init_ca(tmp_path / "other-ca")
    other_ca.issue("impostor", ips=["127.0.0.1"])
    good = [
        backend(
            n,
            tls_cert=ca.cert_path("backend"),
            tls_key=ca.key_path("backend"),
            ca_file=ca_file(ca),
        )
        for n in ("a", "b")
    ]
    bad = backend(
        "evil",
        tls_cert=other_ca.cert_path("impostor"),
        tls_key=other_ca.key_path("impostor"),
        ca_file=other_ca.directory / "ca.crt",
    )
    ctx = client_ctx(ca)
    lb = balancer(
        *(a for g in good for a in ("--backend", f"127.0.0.1:{g.port}")),
        "--backend-ca",
        ca_file(ca),
        *tls_args(ca),
    )
    names = {https_get(lb.port, "/", ctx).headers["X-Backend"] for _ in range(4)}
    assert names == {"a", "b"}
    echo = json.loads(https_get(lb.port, "/echo", ctx).body)
    assert echo["scheme"] == "https"  # the backend saw TLS

    # only the impostor, no checks and no retries: its certificate fails verification -> 502
    lone = balancer(
        "--backend",
        f"127.0.0.1:{bad.port}",
        "--backend-ca",
        ca_file(ca),
        "--no-checks",
        "--attempts",
        "1",
        name="lone",
    )
    assert plain_get(lone.port, "/")[0] == 502

    # with checks: the impostor is marked down (TLS failure), the good one keeps serving
    mixed = balancer(
        "--backend",
        f"127.0.0.1:{good[0].port}",
        "--backend",
        f"127.0.0.1:{bad.port}",
        "--backend-ca",
        ca_file(ca),
        "--admin",
        "127.0.0.1:0",
        name="mixed",
    )

    def evil_state() -> dict[str, Any]:
        return next(x for x in mixed.state()["backends"] if x["address"] == f"127.0.0.1:{bad.port}")

    assert wait_until(lambda: evil_state()["state"] == "down", 10.0), evil_state()
    assert "tls" in evil_state()["last_check"]["detail"].lower()
    statuses = [plain_get(mixed.port, "/") for _ in range(6)]
    assert statuses == [(200, "a")] * 6


def test_bad_input_on_the_tls_port_is_closed_while_others_are_served(
    ca: CertAuthority, backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    b = backend("a")
    lb = balancer("--backend", f"127.0.0.1:{b.port}", *tls_args(ca))
    ctx = client_ctx(ca)
    addr = ("127.0.0.1", lb.port)
    # one connects and never says a word, one stops half-way through its ClientHello: both
    # must be dropped by the handshake timeout (5 s)
    silent = socket.create_connection(addr, timeout=IO_TIMEOUT)
    half = socket.create_connection(addr, timeout=IO_TIMEOUT)
    try:
        half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        with socket.create_connection(addr, timeout=IO_TIMEOUT) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data, closed = read_until_closed(plain, 10.0)
            assert closed
            assert b"HTTP/1.1" not in data
        with socket.create_connection(addr, timeout=IO_TIMEOUT) as garbage:
            # a handshake record header announcing a ClientHello, then noise
            garbage.sendall(b"\x16\x03\x01\x00\x40\x01\x00\x00\x3c" + os.urandom(60))
            data, closed = read_until_closed(garbage, 10.0)
            assert closed
            assert b"HTTP/1.1" not in data
        # the stalled clients do not hold anyone up
        r = https_get(lb.port, "/", ctx)
        assert (r.status, r.headers["X-Backend"]) == (200, "a")
        for stalled in (silent, half):
            data, closed = read_until_closed(stalled, 15.0)
            assert closed and data == b""
    finally:
        silent.close()
        half.close()
    assert https_get(lb.port, "/", ctx).status == 200


def test_redirect_http_sends_308_to_https_same_path_and_query(
    ca: CertAuthority, backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    b = backend("a")
    plain = free_port()
    lb = balancer(
        "--backend", f"127.0.0.1:{b.port}", *tls_args(ca), "--redirect-http", f"127.0.0.1:{plain}"
    )
    conn = http.client.HTTPConnection("127.0.0.1", plain, timeout=IO_TIMEOUT)
    try:
        conn.request("GET", "/some/path?x=1&y=%20z", headers={"Host": f"localhost:{plain}"})
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 308
    location = resp.headers["Location"]
    assert location == f"https://localhost:{lb.port}/some/path?x=1&y=%20z"
    # and the target really is served over verified TLS
    echo = json.loads(https_get(lb.port, "/echo?x=1", client_ctx(ca)).body)
    assert (echo["path"], echo["query"]) == ("/echo", "x=1")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("garbage-cert", "not a PEM certificate"),
        ("wrong-key", "key does not match certificate"),
        ("missing-client-ca", "No such file or directory"),
        ("garbage-backend-ca", "CA file"),
    ],
)
def test_unusable_tls_files_at_start_are_a_one_line_error(
    ca: CertAuthority, tmp_path: Path, case: str, expected: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    cert, key = str(ca.cert_path("lb")), str(ca.key_path("lb"))
    args = {
        "garbage-cert": ["--tls-cert", str(garbage), "--tls-key", key],
        "wrong-key": ["--tls-cert", cert, "--tls-key", str(ca.directory / "ca.key")],
        "missing-client-ca": [*tls_args(ca), "--tls-client-ca", str(tmp_path / "nope.crt")],
        "garbage-backend-ca": ["--backend-ca", str(garbage)],
    }[case]
    base = [sys.executable, "-m", "balancer", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"]
    res = subprocess.run(
        [*base, *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("balancer: cannot start:"), res.stderr
    assert expected in lines[0]
