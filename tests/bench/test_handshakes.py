"""bench.handshakes without running a load: the certificates it serves, and its table."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509

from bench.handshakes import format_table, parse_args, table, tls_for
from bench.report import Row
from ca.core import key_type_of


def test_tls_files_per_key_type_share_one_ca(tmp_path: Path) -> None:
    ec = tls_for(tmp_path, "ec384")
    rsa = tls_for(tmp_path, "rsa2048")
    assert ec.ca_file == rsa.ca_file
    for files, kind in ((ec, "ec384"), (rsa, "rsa2048")):
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        assert key_type_of(cert) == kind
        # HAProxy's form: the key, then the chain
        assert files.combined.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(files.combined)  # key and chain in one file load as a pair
        ssl.create_default_context(cadata=files.ca_pem)  # the CA the clients verify against


def _row(proxy: str, mode: str, rps: float, cpu: float) -> Row:
    return Row(proxy=proxy, mode=mode, rps=rps, cpu_us_per_req=cpu)


def test_the_table_puts_full_resumed_and_keepalive_side_by_side() -> None:
    rows = {
        "ec256": [
            _row("balancer", "https-handshakes", 900, 700.0),
            _row("balancer", "https-resumptions", 2000, 300.0),
            _row("balancer", "https-keepalive", 9000, 70.0),
            Row.failed("haproxy", "https-handshakes", "haproxy did not start"),
        ],
    }
    lines = table(rows)
    assert [(ln["key_type"], ln["proxy"]) for ln in lines] == [
        ("ec256", "balancer"),
        ("ec256", "haproxy"),
    ]
    bal = lines[0]
    assert bal["https-handshakes"] == {"rate": 900, "cpu_us": 700.0, "error": None}
    assert bal["full_over_request"] == 10.0
    hap = lines[1]
    assert hap["https-handshakes"]["error"] == "haproxy did not start"
    assert hap["https-keepalive"] == {"rate": None, "cpu_us": None, "error": None}
    text = format_table(lines)
    assert text.splitlines()[0].split()[:4] == ["key", "proxy", "full", "hs/s"]
    assert "700.0" in text and "10.0" in text


def test_unknown_key_type_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--key-types", "ec256,dsa"])
    assert exc.value.code == 2
    assert "unknown key type dsa" in capsys.readouterr().err
    assert parse_args([]).key_types == ["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"]
