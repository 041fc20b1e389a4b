"""`python -m ca issue --key-type`: each key type issues a certificate of that key, which a
verifying TLS client accepts; renew keeps the type; a bad type is one line, exit 2."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca.core import KEY_TYPES, init_ca, key_type_of

CLI = Callable[..., "subprocess.CompletedProcess[str]"]


def handshake(ca_dir: Path, name: str) -> tuple[str, int]:
    """One in-memory TLS handshake against NAME's certificate, verified against the CA:
    (TLS version, the server certificate's key size in bits)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(ca_dir / f"{name}.crt", ca_dir / f"{name}.key")
    client = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s = server.wrap_bio(bios[0], bios[1], server_side=True)
    c = client.wrap_bio(bios[2], bios[3], server_hostname="localhost")
    for _ in range(10):  # bounded: a TLS 1.3 handshake is two flights
        done = 0
        for obj in (c, s):
            try:
                obj.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
        if done == 2:
            break
    der = c.getpeercert(binary_form=True)
    assert der is not None
    public = x509.load_der_x509_certificate(der).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return c.version() or "", public.key_size


@pytest.mark.parametrize(
    ("key_type", "bits"),
    [("ec256", 256), ("ec384", 384), ("rsa2048", 2048), ("rsa3072", 3072), ("rsa4096", 4096)],
)
def test_each_key_type_issues_a_certificate_a_client_verifies(
    tmp_path: Path, run_ca: CLI, key_type: str, bits: int
) -> None:
    ca_dir = tmp_path / "ca"
    assert run_ca("init", "--dir", ca_dir).returncode == 0
    res = run_ca("issue", "--dir", ca_dir, "--name", "lb", "--dns", "localhost", "--key-type",
                 key_type)  # fmt: skip
    assert res.returncode == 0, res.stderr
    cert = x509.load_pem_x509_certificate((ca_dir / "lb.crt").read_bytes())
    assert key_type_of(cert) == key_type
    assert handshake(ca_dir, "lb") == ("TLSv1.3", bits)
    show = run_ca("show", "--dir", ca_dir, "lb")
    assert f"key:        {key_type}" in show.stdout


def test_default_is_ec256_and_renew_keeps_the_type(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    ca.issue("a", dns=["localhost"])
    assert ca.describe("a").key_type == "ec256"
    ca.issue("b", dns=["localhost"], key_type="rsa2048")
    old = ca.describe("b")
    ca.renew("b")
    new = ca.describe("b")
    assert new.key_type == "rsa2048" and new.serial != old.serial and new.verified


def test_an_unknown_key_type_is_one_line(tmp_path: Path, run_ca: CLI) -> None:
    ca_dir = tmp_path / "ca"
    run_ca("init", "--dir", ca_dir)
    res = run_ca("issue", "--dir", ca_dir, "--name", "lb", "--key-type", "dsa1024")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "invalid choice: 'dsa1024'" in res.stderr
    assert sorted(KEY_TYPES) == sorted(("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"))
