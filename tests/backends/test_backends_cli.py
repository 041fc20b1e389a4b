"""``python -m backends`` as a real process: arguments, startup errors, signals."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from backends import BACKEND_HEADER
from backends.cli import main
from harness import BackendProc, Harness, StartError

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backends", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def get(proc: BackendProc, path: str) -> tuple[int, str | None, bytes]:
    conn = http.client.HTTPConnection(proc.host, proc.port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.getheader(BACKEND_HEADER), r.read()
    finally:
        conn.close()


@pytest.fixture
def proc(harness: Harness) -> BackendProc:
    return harness.backend("cli1")


def test_help_mentions_keepalive() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "--keepalive-timeout" in result.stdout
    assert "75" in result.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "required"),
        (("--port", "80"), "--name"),
        (("--port", "70000", "--name", "a"), "--port"),
        (("--port", "http", "--name", "a"), "--port"),
        (("--port", "-1", "--name", "a"), "--port"),
        (("--port", "\u0668\u0660", "--name", "a"), "--port"),
        (("--port", "0", "--name", "a b"), "--name"),
        (("--port", "0", "--name", ""), "--name"),
        (("--port", "0", "--name", "a", "--delay-ms", "-5"), "--delay-ms"),
        (("--port", "0", "--name", "a", "--delay-ms", "99999999"), "--delay-ms"),
        (("--port", "0", "--name", "a", "--keepalive-timeout", "0"), "--keepalive-timeout"),
        (("--port", "0", "--name", "a", "--keepalive-timeout", "nan"), "--keepalive-timeout"),
        (("--port", "0", "--name", "a", "--tls-cert", "x.pem"), "--tls-key"),
        (("--port", "0", "--name", "a", "--bogus"), "--bogus"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    args: tuple[str, ...], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process for speed; test_bad_arguments_subprocess covers the real entry point.
    with pytest.raises(SystemExit) as exc_info:
        main(list(args))
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m backends: error:")
    assert needle in lines[0]


@pytest.mark.parametrize("args", [("--port", "99999", "--name", "a"), ("--name", "a")])
def test_bad_arguments_subprocess(args: tuple[str, ...]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--port" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_tls_files_exit_2(tmp_path: Path) -> None:
    missing = run_cli("--port", "0", "--name", "a", "--tls-cert", str(tmp_path / "no.pem"))
    assert missing.returncode == 2
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for cert in (tmp_path / "no.pem", garbage):
        result = run_cli(
            "--port", "0", "--name", "a", "--tls-cert", str(cert), "--tls-key", str(garbage)
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "TLS" in lines[0]


def test_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli("--port", str(port), "--name", "a")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0]


def test_serves_and_reports_its_port(proc: BackendProc) -> None:
    assert proc.port > 0
    assert proc.url == f"http://127.0.0.1:{proc.port}"
    assert get(proc, "/") == (200, "cli1", b"hello from cli1\n")
    assert get(proc, "/nope")[:2] == (404, "cli1")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_0(proc: BackendProc, sig: signal.Signals) -> None:
    assert get(proc, "/healthz")[0] == 200
    proc.signal(sig)
    assert proc.wait(timeout=15) == 0


def test_sigterm_lets_an_in_flight_response_finish(proc: BackendProc) -> None:
    n = 20 * 1024 * 1024
    conn = http.client.HTTPConnection(proc.host, proc.port, timeout=10)
    try:
        conn.request("GET", f"/bytes?n={n}")
        r = conn.getresponse()
        # Reading the first bytes proves the handler is running before the signal.
        received = len(r.read(65536))
        proc.signal(signal.SIGTERM)
        while chunk := r.read(1024 * 1024):
            received += len(chunk)
    finally:
        conn.close()
    assert received == n
    assert proc.wait(timeout=15) == 0


def test_delay_flag_and_access_log(harness: Harness) -> None:
    p = harness.backend("slowpoke", delay_ms=20, extra_args=["--access-log"])
    assert get(p, "/status/418") == (418, "slowpoke", b"status 418\n")
    p.signal(signal.SIGTERM)
    assert p.wait(timeout=15) == 0
    lines = p.output().splitlines()
    assert any("slowpoke" in line and "/status/418" in line and " 418 " in line for line in lines)


def test_start_reports_startup_failure(harness: Harness, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    with pytest.raises(StartError, match="cannot load TLS") as err:
        harness.backend(
            "broken", tls_cert=tmp_path / "no.pem", tls_key=tmp_path / "no.pem", ca_file=ca_file
        )
    assert "exited before it was ready" in str(err.value)


def test_malformed_request_logs_one_line(harness: Harness) -> None:
    p = harness.backend("strict")
    with socket.create_connection((p.host, p.port), timeout=10) as sock:
        sock.sendall(b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 400") or reply.startswith(b"HTTP/1.1 400")
    assert get(p, "/healthz")[0] == 200
    p.signal(signal.SIGTERM)
    assert p.wait(timeout=15) == 0
    text = p.output()
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if "ERROR" in line]
    assert len(lines) == 1
    assert lines[0].startswith("strict ERROR aiohttp.server:")


def test_keepalive_timeout_closes_idle_connections(harness: Harness) -> None:
    p = harness.backend("idle", keepalive_timeout=0.3)
    with socket.create_connection((p.host, p.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        # Keep reading: the response, then EOF once the idle timeout closes the connection
        # (the 10 s socket timeout bounds the wait).
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert data.endswith(b"hello from idle\n")
