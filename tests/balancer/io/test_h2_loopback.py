"""HTTP/2 through a real balancer process: curl and nghttp over TLS (verified against our
CA) and h2c, one connection's streams spread over the backends, uploads and downloads
bigger than any buffer, the access log's protocol, the preface with HTTP/2 off."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Harness, LocalStack, wait_until
from harness.h2 import H2Conn, Reply

CURL = shutil.which("curl")
NGHTTP = shutil.which("nghttp")


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    work = tmp_path_factory.mktemp("h2tls")
    with Harness(work) as h:
        yield h.stack(
            tls=True,
            pki_dir=work / "pki",
            balancer_args=("--access-log", str(work / "access.log")),
        )


@pytest.fixture(scope="module")
def plain_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with Harness(tmp_path_factory.mktemp("h2c")) as h:
        yield h.stack()


def curl(*args: str) -> tuple[str, str]:
    assert CURL is not None
    res = subprocess.run(
        [CURL, "-sS", "--max-time", "10", "-w", "\n%{http_version} %{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )
    body, _, last = res.stdout.rpartition("\n")
    return body, last


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_gets_http2_over_tls_with_the_ca_verified(tls_stack: LocalStack) -> None:
    assert tls_stack.ca_file is not None
    body, last = curl("--http2", "--cacert", tls_stack.ca_file, tls_stack.service_url + "/")
    assert last == "2 200" and body.startswith("hello from b")
    _, last = curl("--http1.1", "--cacert", tls_stack.ca_file, tls_stack.service_url + "/")
    assert last == "1.1 200"  # ALPN h2,http/1.1: the client chooses


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_gets_h2c_with_prior_knowledge_beside_http1(plain_stack: LocalStack) -> None:
    url = plain_stack.service_url + "/"
    assert curl("--http2-prior-knowledge", url)[1] == "2 200"
    assert curl("--http1.1", url)[1] == "1.1 200"  # the same port
    assert curl("--http2", url)[1] == "1.1 200"  # Upgrade: h2c is served as HTTP/1.1


@pytest.mark.skipif(NGHTTP is None, reason="nghttp (nghttp2-client) is not installed")
def test_nghttp_verifies_our_certificate_and_gets_http2(tls_stack: LocalStack) -> None:
    assert NGHTTP is not None and tls_stack.ca_file is not None
    env = {**os.environ, "SSL_CERT_FILE": tls_stack.ca_file}
    res = subprocess.run(
        [NGHTTP, "-v", "-n", f"https://localhost:{tls_stack.service_port}/"],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert ":status: 200" in out and "verification failed" not in out.lower()


def test_round_robin_spreads_one_connections_streams_over_every_backend(
    tls_stack: LocalStack,
) -> None:
    assert tls_stack.ca_file is not None
    with H2Conn(tls_stack.host, tls_stack.service_port, ca_file=tls_stack.ca_file) as c:
        replies = c.get(["/"] * 30)
    assert all(r.status == 200 and r.ended for r in replies)
    shares = Counter(r.backend for r in replies)
    assert set(shares) == {"b1", "b2", "b3"} and all(n == 10 for n in shares.values())


def test_a_big_download_and_upload_pass_whole_through_one_stream(tls_stack: LocalStack) -> None:
    assert tls_stack.ca_file is not None
    n = 20 << 20
    with H2Conn(tls_stack.host, tls_stack.service_port, ca_file=tls_stack.ca_file) as c:
        (down,) = c.get([f"/bytes?n={n}"], timeout=30)
        assert down.status == 200 and len(down.body) == n
        assert down.body == (bytes(range(256)) * (n // 256))
        body = os.urandom(1 << 20) * 8
        sid = c.send("/upload", method="POST", body=body)
        (up,) = c.wait([sid], timeout=30)
    assert up.status == 200
    assert json.loads(up.body) == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_the_access_log_records_the_protocol(tls_stack: LocalStack, tmp_path: Path) -> None:
    assert tls_stack.ca_file is not None
    with H2Conn(tls_stack.host, tls_stack.service_port, ca_file=tls_stack.ca_file) as c:
        c.get(["/?marker=h2log"])
    log = Path(tls_stack.workdir).parent / "access.log"
    lines = [json.loads(x) for x in log.read_text().splitlines() if "marker=h2log" in x]
    assert lines and lines[-1]["protocol"] == "HTTP/2"


def test_with_http2_off_a_preface_gets_a_short_400(harness: Harness) -> None:
    stack = harness.stack(balancer_args=("--no-http2",))
    with socket.create_connection((stack.host, stack.service_port), timeout=5) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.endswith(b"\r\n\r\n400 Bad Request: HTTP/2 is not enabled on this listener\n")


def test_state_and_metrics_show_the_protocol_mix_and_streams(tls_stack: LocalStack) -> None:
    assert tls_stack.ca_file is not None
    lb = tls_stack.balancers[0]
    before = lb.state()["stats"]
    with H2Conn(tls_stack.host, tls_stack.service_port, ca_file=tls_stack.ca_file) as c:
        c.get(["/"] * 6)
        during = lb.state()
    curl("--http1.1", "--cacert", tls_stack.ca_file, tls_stack.service_url + "/")
    assert wait_until(lambda: lb.state()["stats"]["connections_open"] == 0, 5.0)
    stats = lb.state()["stats"]
    assert during["listener"]["protocols"] == ["HTTP/1.1", "HTTP/2"]
    assert during["stats"]["h2_connections_open"] == before["h2_connections_open"] + 1
    assert stats["h2_streams_total"] == before["h2_streams_total"] + 6
    assert stats["h2_connections_total"] == before["h2_connections_total"] + 1
    assert stats["connections_total"] == before["connections_total"] + 2  # one of each
    assert stats["h2_streams_open"] == 0 and stats["h2_connections_open"] == 0
    metrics = lb.admin("/metrics").body.decode()
    h2 = stats["h2_streams_total"]
    assert f'lb_protocol_requests_total{{listener="public",protocol="HTTP/2"}} {h2}.0' in metrics
    h1 = stats["requests_total"] - h2
    assert f'lb_protocol_requests_total{{listener="public",protocol="HTTP/1.1"}} {h1}.0' in metrics
    assert "lb_h2_streams_open 0.0" in metrics


@pytest.mark.skipif(NGHTTP is None, reason="nghttp (nghttp2-client) is not installed")
def test_a_graceful_stop_sends_goaway_and_lets_open_streams_finish(harness: Harness) -> None:
    stack = harness.stack(tls=True, pki_dir=harness.workdir / "pki", admin=False)
    assert NGHTTP is not None and stack.ca_file is not None
    env = {**os.environ, "SSL_CERT_FILE": stack.ca_file}
    url = f"https://localhost:{stack.service_port}/delay?ms=1500"
    with subprocess.Popen(
        [NGHTTP, "-v", url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as client:
        time.sleep(0.5)  # the request is at a backend (which takes 1.5 s)
        stack.balancers[0].signal(signal.SIGTERM)
        out, _ = client.communicate(timeout=15)
    assert client.returncode == 0, out
    goaway = out.index("recv GOAWAY frame")
    assert "last_stream_id=13, error_code=NO_ERROR" in out[goaway : goaway + 200], out
    assert goaway < out.index(":status: 200")  # GOAWAY first, then the open stream's answer
    assert "verification failed" not in out.lower()
    assert stack.balancers[0].wait(10.0) == 0


def test_a_preface_split_over_packets_is_still_http2(plain_stack: LocalStack) -> None:
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import ResponseReceived

    h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    h2.initiate_connection()
    h2.send_headers(
        1,
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x")],
        end_stream=True,
    )
    data = h2.data_to_send()
    with socket.create_connection((plain_stack.host, plain_stack.service_port), 5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in (data[:3], data[3:20], data[20:]):  # the preface is 24 bytes
            s.sendall(part)
            time.sleep(0.05)
        events: list[object] = []
        for _ in range(20):  # bounded: a few reads bring the answer
            chunk = s.recv(65536)
            if not chunk:
                break
            events += h2.receive_data(chunk)
            if any(isinstance(e, ResponseReceived) for e in events):
                break
    (resp,) = [e for e in events if isinstance(e, ResponseReceived)]
    assert dict(resp.headers)[b":status"] == b"200"


def test_http1_keep_alive_still_works_beside_h2c(plain_stack: LocalStack) -> None:
    # the first bytes decide the protocol; every later request on the connection is HTTP/1.1
    with socket.create_connection((plain_stack.host, plain_stack.service_port), 5) as s:
        f = s.makefile("rb")
        for _ in range(3):
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert f.readline().startswith(b"HTTP/1.1 200 ")
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert f.read(length).startswith(b"hello from b")


def test_http2_behind_a_proxy_header_keeps_the_real_client(harness: Harness) -> None:
    log = harness.workdir / "px-access.log"
    stack = harness.stack(
        tls=True,
        pki_dir=harness.workdir / "pki",
        # 127.0.0.2 is the trusted proxy; the readiness probe (127.0.0.1) sends no header
        balancer_args=("--accept-proxy", "127.0.0.2/32", "--access-log", str(log)),
    )
    assert stack.ca_file is not None
    header = b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 443\r\n"
    with H2Conn(
        stack.host,
        stack.service_port,
        ca_file=stack.ca_file,
        source="127.0.0.2",
        proxy_header=header,
    ) as c:
        replies = c.get(["/?marker=px"] * 3)
    assert [r.status for r in replies] == [200, 200, 200]
    lines = [json.loads(x) for x in log.read_text().splitlines() if "marker=px" in x]
    assert len(lines) == 3
    assert {(x["client"], x["protocol"]) for x in lines} == {("192.0.2.7", "HTTP/2")}


def _lab_clients(lb: object, closed: bool = False) -> list[dict[str, object]]:
    body = lb.admin("/api/connections?closed=1").body  # type: ignore[attr-defined]
    data = json.loads(body)
    rows = data["closed"] if closed else data["connections"]
    return [r for r in rows if r["side"] == "client"]


def test_http2_connections_are_in_the_network_lab_and_leave_it(
    tls_stack: LocalStack, plain_stack: LocalStack
) -> None:
    """By ALPN (TLS facts: alpn h2) and by prior knowledge (the sniffing protocol's record
    goes with the hand-over): listed while open, gone from the open list once closed."""
    assert tls_stack.ca_file is not None
    for stack, ca in ((tls_stack, tls_stack.ca_file), (plain_stack, None)):
        lb = stack.balancers[0]
        assert wait_until(lambda lb=lb: not _lab_clients(lb), 5.0)
        with H2Conn(stack.host, stack.service_port, ca_file=ca) as c:
            c.get(["/"])
            [row] = _lab_clients(lb)
            if ca is not None:
                assert row["tls"]["alpn"] == "h2"  # type: ignore[index]
        assert wait_until(lambda lb=lb: not _lab_clients(lb), 5.0)  # no record left behind
        assert _lab_clients(lb, closed=True)[0]["first_fin"] in ("peer", "reset")


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_http2_is_chosen_per_listener(harness: Harness) -> None:
    """Two HTTPS listeners, the second with http2=off: ALPN offers h2 on the first only."""
    stack = harness.stack(
        tls=True,
        pki_dir=harness.workdir / "pki",
        balancer_args=("--listener", "127.0.0.1:0,http2=off"),
    )
    assert stack.ca_file is not None
    rows = stack.balancers[0].state()["listener"]["all"]
    assert [r["protocols"] for r in rows] == [["HTTP/1.1", "HTTP/2"], ["HTTP/1.1"]]
    second = "https://localhost:" + rows[1]["bound"].rpartition(":")[2] + "/"
    _, first_version = curl("--http2", "--cacert", stack.ca_file, stack.service_url + "/")
    _, second_version = curl("--http2", "--cacert", stack.ca_file, second)
    assert first_version == "2 200" and second_version == "1.1 200"


async def test_a_backend_s_response_trailers_reach_the_http2_client(  # type: ignore[no-untyped-def]
    start_balancer, raw_backend
) -> None:
    """A real backend (raw asyncio, chunked with trailers), the in-process balancer (h2c),
    and an h2 client: the trailers arrive as a trailing HEADERS frame with END_STREAM."""
    reply = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
        b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\nGrpc-Message: fine\r\n\r\n"
    )
    backend = await raw_backend(lambda req, conn: reply)
    balancer = await start_balancer([backend])
    host, port = balancer.address

    def fetch() -> list[Reply]:
        with H2Conn(host, port) as c:  # h2c, prior knowledge
            return c.get(["/a", "/b"])

    replies = await asyncio.to_thread(fetch)  # the client blocks: the balancer's loop runs
    for r in replies:
        assert (r.status, r.body, r.ended, r.reset) == (200, b"hello", True, None)
        assert r.trailers == {"grpc-status": "0", "grpc-message": "fine"}
        assert "grpc-status" not in r.headers
