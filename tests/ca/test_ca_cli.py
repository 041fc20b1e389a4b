"""`python -m ca` end to end (subprocess) plus a few library-level checks."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca.core import CAError, CertAuthority, init_ca

CLI = Callable[..., "subprocess.CompletedProcess[str]"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def fingerprint(path: Path) -> str:
    return load(path).fingerprint(hashes.SHA256()).hex(":").upper()


def field(out: str, name: str) -> str:
    for line in out.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name!r} line in:\n{out}")


def assert_clean_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 2, res
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


# ---------------------------------------------------------------- init


def test_init_creates_private_ca(tmp_path: Path, run_ca: CLI) -> None:
    d = tmp_path / "new" / "ca"
    res = run_ca("init", "--dir", d)
    assert res.returncode == 0, res.stderr
    assert "created new CA" in res.stdout
    assert mode(d) == 0o700
    assert mode(d / "ca.key") == 0o600
    cert = load(d / "ca.crt")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert fingerprint(d / "ca.crt") in res.stdout
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "ca.key"]


def test_init_again_reuses_the_same_ca(ca_dir: Path, run_ca: CLI) -> None:
    before = snapshot(ca_dir)
    res = run_ca("init", "--dir", ca_dir)
    assert res.returncode == 0, res.stderr
    assert "reusing existing CA" in res.stdout
    assert fingerprint(ca_dir / "ca.crt") in res.stdout
    assert snapshot(ca_dir) == before


def test_library_init_ca_reuses(tmp_path: Path) -> None:
    first = init_ca(tmp_path / "ca")
    second = init_ca(tmp_path / "ca")
    assert first.created and not second.created
    assert first.cert == second.cert


# ---------------------------------------------------------------- issue / show


def test_issue_server_certificate(ca_dir: Path, run_ca: CLI) -> None:
    res = run_ca(
        "issue", "--dir", ca_dir, "--name", "web", "--dns", "web.test", "--dns", "*.apps.test",
        "--ip", "127.0.0.1",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    crt, key = ca_dir / "web.crt", ca_dir / "web.key"
    assert mode(key) == 0o600
    cert = load(crt)
    assert sans(cert) == ["web.test", "*.apps.test", "127.0.0.1"]
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=89) < lifetime <= timedelta(days=90)
    cert.verify_directly_issued_by(load(ca_dir / "ca.crt"))

    show = run_ca("show", "--dir", ca_dir, "web")
    assert show.returncode == 0, show.stderr
    assert field(show.stdout, "kind") == "server"
    assert field(show.stdout, "SANs") == "DNS:web.test, DNS:*.apps.test, IP:127.0.0.1"
    assert field(show.stdout, "serial") == f"{cert.serial_number:x}"
    assert field(show.stdout, "sha256") == fingerprint(crt)
    assert field(show.stdout, "verifies") == "yes"
    assert "CN=web" in field(show.stdout, "subject")
    assert "EXPIRED" not in show.stdout
    assert field(show.stdout, "not after") == cert.not_valid_after_utc.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def test_issue_defaults_san_to_name_and_short_lifetimes(ca_dir: Path, run_ca: CLI) -> None:
    assert run_ca("issue", "--dir", ca_dir, "--name", "api.test", "--hours", "1").returncode == 0
    cert = load(ca_dir / "api.test.crt")
    assert sans(cert) == ["api.test"]
    left = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=55) < left <= timedelta(hours=1)

    assert run_ca("issue", "--dir", ca_dir, "--name", "drill", "--minutes", "10").returncode == 0
    left = load(ca_dir / "drill.crt").not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=5) < left <= timedelta(minutes=10)


def test_issue_client_certificate(ca_dir: Path, run_ca: CLI) -> None:
    res = run_ca("issue", "--dir", ca_dir, "--name", "alice", "--client")
    assert res.returncode == 0, res.stderr
    cert = load(ca_dir / "alice.crt")
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    show = run_ca("show", "--dir", ca_dir, "alice")
    assert field(show.stdout, "kind") == "client"
    assert field(show.stdout, "verifies") == "yes"


def test_show_without_name_lists_ca_and_issued(ca_dir: Path, run_ca: CLI) -> None:
    for name in ("web", "alice"):
        assert run_ca("issue", "--dir", ca_dir, "--name", name).returncode == 0
    res = run_ca("show", "--dir", ca_dir)
    assert res.returncode == 0, res.stderr
    assert field(res.stdout, "kind") == "ca"
    assert field(res.stdout, "sha256") == fingerprint(ca_dir / "ca.crt")
    assert field(res.stdout, "issued") == "2"
    listing = [line.split() for line in res.stdout.splitlines() if line.startswith("  ")]
    assert [row[0] for row in listing] == ["alice", "web"]
    assert all(row[2] == "expires" for row in listing)


def test_expired_certificate_is_flagged(ca_dir: Path, run_ca: CLI) -> None:
    ca = CertAuthority.load(ca_dir)
    ca.issue("old", dns=["old.test"], lifetime=timedelta(hours=-1))
    res = run_ca("show", "--dir", ca_dir, "old")
    assert res.returncode == 0, res.stderr
    assert field(res.stdout, "not after").endswith("EXPIRED")
    assert field(res.stdout, "verifies").startswith("no: ")
    assert "not valid at validation time" in field(res.stdout, "verifies")
    listing = run_ca("show", "--dir", ca_dir)
    assert any(
        line.split()[0] == "old" and "EXPIRED" in line for line in listing.stdout.splitlines()
    )


def test_cert_from_another_ca_does_not_verify(ca_dir: Path, run_ca: CLI) -> None:
    stranger = trustme.CA().issue_cert("web.test")
    stranger.cert_chain_pems[0].write_to_path(str(ca_dir / "web.crt"))
    stranger.private_key_pem.write_to_path(str(ca_dir / "web.key"))
    res = run_ca("show", "--dir", ca_dir, "web")
    assert res.returncode == 0, res.stderr
    assert field(res.stdout, "verifies").startswith("no: ")


def test_export_prints_ca_pem(ca_dir: Path, run_ca: CLI) -> None:
    res = run_ca("export", "--dir", ca_dir)
    assert res.returncode == 0, res.stderr
    assert res.stdout == (ca_dir / "ca.crt").read_text()
    assert "PRIVATE" not in res.stdout


# ---------------------------------------------------------------- renew


@pytest.mark.parametrize("client", [False, True])
def test_renew_changes_serial_keeps_names_and_kind(ca_dir: Path, client: bool, run_ca: CLI) -> None:
    args = ["--ip", "127.0.0.1", "--dns", "web.test"] + (["--client"] if client else [])
    assert run_ca("issue", "--dir", ca_dir, "--name", "web", *args).returncode == 0
    old, old_key = load(ca_dir / "web.crt"), (ca_dir / "web.key").read_bytes()

    res = run_ca("renew", "--dir", ca_dir, "web", "--hours", "2")
    assert res.returncode == 0, res.stderr
    new = load(ca_dir / "web.crt")
    assert new.serial_number != old.serial_number
    assert f"{new.serial_number:x}" in res.stdout
    assert sans(new) == sans(old) == ["web.test", "127.0.0.1"]
    assert eku(new) == eku(old)
    assert (ca_dir / "web.key").read_bytes() != old_key
    assert mode(ca_dir / "web.key") == 0o600
    assert new.not_valid_after_utc - datetime.now(UTC) <= timedelta(hours=2)
    assert field(run_ca("show", "--dir", ca_dir, "web").stdout, "verifies") == "yes"


# ---------------------------------------------------------------- bad input


def _corrupt_ca_crt(d: Path) -> None:
    (d / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n")


def _mismatched_ca_key(d: Path) -> None:
    trustme.CA().private_key_pem.write_to_path(str(d / "ca.key"))


def _mismatched_leaf_key(d: Path) -> None:
    CertAuthority.load(d).issue("web")
    CertAuthority.load(d).issue("other")
    (d / "web.key").write_bytes((d / "other.key").read_bytes())


def _existing_leaf(d: Path) -> None:
    CertAuthority.load(d).issue("web")


def _half_ca(d: Path) -> None:
    (d / "ca.key").unlink()


def _no_setup(d: Path) -> None:
    pass


BAD_INPUT = [
    # (setup, argv after the program, text expected in the error line)
    (_no_setup, ["show", "--dir", "{missing}"], "does not exist"),
    (_no_setup, ["issue", "--dir", "{missing}", "--name", "web"], "does not exist"),
    (_no_setup, ["export", "--dir", "{missing}"], "does not exist"),
    (_no_setup, ["renew", "--dir", "{missing}", "web"], "does not exist"),
    (_corrupt_ca_crt, ["issue", "--dir", "{d}", "--name", "web"], "not a PEM certificate"),
    (_corrupt_ca_crt, ["init", "--dir", "{d}"], "not a PEM certificate"),
    (_mismatched_ca_key, ["init", "--dir", "{d}"], "does not match"),
    (_mismatched_ca_key, ["show", "--dir", "{d}"], "does not match"),
    (_half_ca, ["init", "--dir", "{d}"], "refusing to replace"),
    (_mismatched_leaf_key, ["show", "--dir", "{d}", "web"], "does not match"),
    (_no_setup, ["show", "--dir", "{d}", "nobody"], "no certificate named"),
    (_no_setup, ["renew", "--dir", "{d}", "nobody"], "no certificate named"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web", "--ip", "10.0.0.300"], "bad IP"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web", "--ip", "web.test"], "bad IP"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web", "--dns", "bad_name!"], "bad DNS"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web", "--dns", "10.1.1.1"], "--ip"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "../evil"], "bad name"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", ".."], "bad name"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "ca"], "bad name"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "CA"], "bad name"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "a/b"], "bad name"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web_1"], "not a DNS name"),
    (_no_setup, ["show", "--dir", "{d}", "../ca"], "bad name"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web", "--days", "-1"], "at least 1"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web", "--days", "0"], "at least 1"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web", "--hours", "0"], "at least 1"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web", "--hours", "-3"], "at least 1"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web", "--minutes", "0"], "at least 1"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web", "--days", "40000"], "out of range"),
    (_existing_leaf, ["renew", "--dir", "{d}", "web", "--minutes", "0"], "at least 1"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "web", "--days", "x"], "whole number"),
    (_no_setup, ["issue", "--dir", "{d}", "--name", "w", "--days", "1", "--hours", "1"], "not"),
    (_no_setup, ["issue", "--dir", "{d}"], "--name"),
    (_no_setup, ["frobnicate"], "invalid choice"),
    (_no_setup, [], "required"),
    (_existing_leaf, ["issue", "--dir", "{d}", "--name", "web"], "already exists"),
    (_no_setup, ["init", "--dir", "{d}/ca.crt"], "not a directory"),
]


@pytest.mark.parametrize(("setup", "argv", "needle"), BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    ca_dir: Path,
    tmp_path: Path,
    setup: object,
    argv: list[str],
    needle: str,
    run_ca: CLI,
) -> None:
    assert callable(setup)
    setup(ca_dir)
    before = snapshot(ca_dir)
    args = [a.format(d=ca_dir, missing=tmp_path / "missing") for a in argv]
    assert_clean_error(run_ca(*args), needle)
    assert snapshot(ca_dir) == before  # nothing replaced, no temp files left
    assert not (tmp_path / "missing").exists()


def test_failed_write_leaves_no_partial_files(
    ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority = CertAuthority.load(ca_dir)
    before = snapshot(ca_dir)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ca.core.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        authority.issue("web")
    assert snapshot(ca_dir) == before


def test_library_rejects_bad_names_and_keeps_ca(tmp_path: Path) -> None:
    authority = init_ca(tmp_path / "ca")
    with pytest.raises(CAError, match="bad name"):
        authority.issue("ca")
    with pytest.raises(CAError, match="bad IP"):
        authority.issue("web", ips=["300.1.1.1"])
    crt, key = authority.issue("web", ips=["::1"])
    assert sans(load(crt)) == ["::1"]
    assert os.stat(key).st_mode & 0o077 == 0


def test_issue_help_says_the_name_is_the_dns_name_by_default(run_ca: CLI) -> None:
    res = run_ca("issue", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "With no --dns and no --ip, NAME itself becomes the certificate's DNS name" in text
