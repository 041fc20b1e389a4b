"""SIGTERM to a balancer process in the middle of a large response it relays to a slow reader,
on a busy machine: every byte still arrives.

`Balancer.stop()` waits for in-flight exchanges, then closes the client connections. A close
only starts a graceful close: bytes the client has not taken yet wait in the client
transport's write buffer (the balancer stops reading the backend while that buffer is above its
high-water mark, so at the end of a large response to a slow reader it is never empty), and
they leave only while the event loop still runs. The client keeps the kernel buffers small (a
small receive buffer and MSS: the balancer's send buffer is sized from the MSS and congestion
window) and reads slowly, so the last bytes of the response are in that transport buffer when
the exchange ends.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator

import pytest

from harness import BackendProc, BalancerProc, cpu_load
from harness.http import IO_TIMEOUT, slow_download_across

BODY = 1024 * 1024  # far more than the kernel buffers of the client connection hold
RCVBUF = 8 * 1024
READ = 16 * 1024
TRIALS = 3


@pytest.fixture(name="cpu_load")
def cpu_load_fixture() -> Iterator[int]:
    with cpu_load() as busy:
        yield busy


def download_across_sigterm(lb: BalancerProc, n: int) -> tuple[bytes, int]:
    """Through the balancer; SIGTERM it once the response head has arrived (the exchange is
    then relaying the body). Returns (head, body bytes received)."""
    return slow_download_across("127.0.0.1", lb.port, n, lambda: lb.signal(signal.SIGTERM))


@pytest.mark.usefixtures("cpu_load")
def test_sigterm_mid_response_delivers_every_byte_to_a_slow_reader_under_cpu_load(
    backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    a = backend("a")
    for trial in range(TRIALS):
        lb = balancer(
            "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{a.port}", name=f"lb{trial}"
        )
        head, received = download_across_sigterm(lb, BODY)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert f"content-length: {BODY}".encode() in head.lower(), head
        assert lb.wait(2 * IO_TIMEOUT) == 0
        assert received == BODY, f"trial {trial}: {BODY - received} bytes short"


def test_a_response_cut_by_the_grace_ends_in_a_reset_not_a_clean_close(
    backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    # A client that stops reading keeps the exchange in flight past the grace. What it then
    # holds must not look complete: with a close-delimited body a clean FIN would.
    a = backend("a")
    args = ["--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{a.port}"]
    lb = balancer(*args, "--timeout-shutdown-grace", "1")
    n = 64 * 1024 * 1024  # far more than every buffer on the way holds
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.settimeout(2 * IO_TIMEOUT)
        sock.connect(("127.0.0.1", lb.port))
        sock.sendall(f"GET /bytes?n={n} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        data = sock.recv(READ)
        assert data.startswith(b"HTTP/1.1 200"), data
        lb.signal(signal.SIGTERM)
        assert lb.wait(2 * IO_TIMEOUT) == 0  # the grace is over: it has exited
        received = len(data)
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(1024 * 1024):
                received += len(chunk)
    assert received < n
    assert "shutdown grace over" not in lb.output()  # it was aborted, not left to flush
