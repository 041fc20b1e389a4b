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
from collections.abc import Iterator

import pytest

from harness import BackendProc, Harness, cpu_load
from harness.http import slow_download_across

BODY = 1024 * 1024  # far more than the kernel buffers of the connection hold
TRIALS = 3


@pytest.fixture(name="cpu_load")
def cpu_load_fixture() -> Iterator[int]:
    with cpu_load() as busy:
        yield busy


def download_across_sigterm(proc: BackendProc, n: int) -> int:
    """SIGTERM the backend once the head has arrived (its handler is then writing the body);
    how many body bytes arrive."""
    head, received = slow_download_across(
        proc.host, proc.port, n, lambda: proc.signal(signal.SIGTERM)
    )
    assert head.startswith(b"HTTP/1.1 200"), head
    assert f"content-length: {n}".encode() in head.lower(), head
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
