"""A graceful stop (SIGTERM) of ``python -m backends`` delivers every byte of a response in
flight to a slow reader, on a busy machine.

The bytes at risk are those still in the server's user-space write buffer when aiohttp closes
the connection: its handler's last ``write()`` does not wait for them to reach the kernel. They
are there when the kernel's buffers for the connection are full as the handler writes its last
chunk, so the client keeps those buffers small: a small receive buffer and a small MSS (the
server's send buffer is sized from the MSS and congestion window), and it reads slowly. Before
the fix the process then exited with the tail unsent: a clean EOF, 40-120 KB short, in every
trial. CPU load (a busy loop per core) makes the process slow to get back
to its loop, as on a busy CI machine.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator

import pytest

from harness import BackendProc, Harness, cpu_load

BODY = 1024 * 1024  # far more than the kernel buffers of the connection hold
MSS = 536  # the smallest an IPv4 peer must accept; keeps the server's send buffer small
RCVBUF = 8 * 1024
READ = 16 * 1024
PAUSE_S = 0.01  # the slow reader: at most READ bytes every PAUSE_S
IO_TIMEOUT_S = 10.0
TRIALS = 3


@pytest.fixture(name="cpu_load")
def cpu_load_fixture() -> Iterator[int]:
    with cpu_load() as busy:
        yield busy


def download_across_sigterm(proc: BackendProc, n: int) -> int:
    """GET /bytes?n=N, SIGTERM the backend once the head has arrived (its handler is then
    writing the body), read the body slowly until EOF; return how many body bytes arrived."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, MSS)
        sock.settimeout(IO_TIMEOUT_S)
        sock.connect((proc.host, proc.port))
        sock.sendall(f"GET /bytes?n={n} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(READ)
            assert chunk, f"connection closed before the response head: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert f"content-length: {n}".encode() in head.lower(), head
        received = len(body)
        proc.signal(signal.SIGTERM)
        while chunk := sock.recv(READ):
            received += len(chunk)
            time.sleep(PAUSE_S)
    return received


@pytest.mark.usefixtures("cpu_load")
def test_sigterm_delivers_the_whole_response_to_a_slow_reader_under_cpu_load(
    harness: Harness,
) -> None:
    for trial in range(TRIALS):
        proc = harness.backend(f"stop{trial}")
        received = download_across_sigterm(proc, BODY)
        assert proc.wait(timeout=15) == 0
        assert received == BODY, f"trial {trial}: {BODY - received} bytes short"
