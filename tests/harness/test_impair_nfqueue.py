"""The no-netem impairment (loadtest/nfq_impair.py, method "nfqueue") on the real kernel:
delay through an NFQUEUE holder, loss with iptables statistic, rate with tbf, clear() and
what a SIGKILLed owner leaves. LBT_IMPAIR_METHOD=nfqueue forces the fallback, so these run
the same on kernels with and without sch_netem. Bands are generous: no tight timing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.netns import NetNs, list_links, list_namespaces, sweep_stale
from harness.procs import REPO, python_env, wait_until
from loadtest.netem import Impairment, apply_local, clear_local, impaired
from loadtest.nfq_impair import CHAIN

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "iptables")),
        reason="needs root with ip, tc (iproute2) and iptables",
    ),
]
PORT = 7781
SINK = """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", PORT)); s.listen(64)
def drain(c):
    with c:
        while c.recv(65536): pass
while True:
    c, _ = s.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()
""".replace("PORT", str(PORT))


@pytest.fixture
def ns(monkeypatch: pytest.MonkeyPatch) -> Iterator[NetNs]:
    """A namespace with a TCP sink at inner_ip:PORT; the fallback forced."""
    monkeypatch.setenv("LBT_IMPAIR_METHOD", "nfqueue")
    with NetNs.create() as n:
        sink = subprocess.Popen(n.wrap([sys.executable, "-c", SINK]))
        try:
            assert wait_until(lambda: _connect_ms(n.inner_ip) is not None, 10.0)
            yield n
        finally:
            clear_local(n.host_if)
            sink.kill()
            sink.wait(5)


def _connect_ms(ip: str) -> float | None:
    try:
        t = time.monotonic()
        with socket.create_connection((ip, PORT), timeout=3):
            return (time.monotonic() - t) * 1000
    except OSError:
        return None


def median_connect_ms(ip: str, n: int = 7) -> float:
    times = [_connect_ms(ip) for _ in range(n)]
    ok = sorted(t for t in times if t is not None)
    assert ok, "no connection made"
    return ok[len(ok) // 2]


def send(ip: str, nbytes: int) -> tuple[float, int]:
    """Send nbytes to the sink; (seconds taken, TCP_INFO tcpi_total_retrans)."""
    chunk = b"x" * 65536
    with socket.create_connection((ip, PORT), timeout=30) as s:
        t = time.monotonic()
        sent = 0
        while sent < nbytes:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the sink closes after reading everything: all bytes arrived
        took = time.monotonic() - t
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    (total_retrans,) = struct.unpack_from("=I", info, 100)  # tcpi_total_retrans
    return took, total_retrans


def test_delay_grows_the_connect_time_and_clear_restores(ns: NetNs) -> None:
    base = median_connect_ms(ns.inner_ip)
    info = apply_local(ns.host_if, Impairment(delay_ms=50, jitter_ms=5))
    assert info["method"] == "nfqueue" and info["netns"] == ns.name
    assert impaired(ns.host_if)
    delayed = median_connect_ms(ns.inner_ip)
    assert delayed - base > 30, (base, delayed)  # the SYN waits ~50 ms in the holder
    assert clear_local(ns.host_if)
    assert not impaired(ns.host_if)
    assert median_connect_ms(ns.inner_ip) < delayed - 30
    assert not clear_local(ns.host_if)  # idempotent: nothing left


def test_loss_shows_retransmits(ns: NetNs) -> None:
    _, retrans_before = send(ns.inner_ip, 1 << 20)
    apply_local(ns.host_if, Impairment(loss_pct=20))
    rules = subprocess.run(
        ns.wrap(["iptables", "-S", CHAIN]), capture_output=True, text=True, timeout=10
    ).stdout
    assert "statistic" in rules and "0.2" in rules
    _, retrans = send(ns.inner_ip, 1 << 20)
    assert retrans > retrans_before  # 20 % of the data segments dropped: resent
    assert clear_local(ns.host_if)


def test_tbf_lowers_throughput(ns: NetNs) -> None:
    took_free, _ = send(ns.inner_ip, 400_000)
    apply_local(ns.host_if, Impairment(rate_kbit=2000))  # 250 kB/s: 400 kB take ~1.6 s
    assert (
        "tbf"
        in subprocess.run(
            ["tc", "qdisc", "show", "dev", ns.host_if], capture_output=True, text=True, timeout=10
        ).stdout
    )
    took, _ = send(ns.inner_ip, 400_000)
    assert took > 0.5 and took > 5 * took_free, (took_free, took)
    assert clear_local(ns.host_if)
    assert not impaired(ns.host_if)


OWNER = """
import os, sys, time
os.environ["LBT_IMPAIR_METHOD"] = "nfqueue"
from harness.netns import NetNs
from loadtest.netem import Impairment, apply_local
ns = NetNs.create()
info = apply_local(ns.host_if, Impairment(delay_ms=50, loss_pct=1, rate_kbit=5000))
print(ns.name, ns.host_if, info["holder_pid"], flush=True)
time.sleep(60)
"""


def test_sigkilled_owner_leaves_nothing_after_the_next_sweep() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], cwd=REPO, env=python_env(), stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert owner.stdout is not None
        name, host_if, holder = owner.stdout.readline().split()
        assert os.path.exists(f"/proc/{holder}")
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    # the holder dies with its owner (PR_SET_PDEATHSIG); the sweep takes the rest
    assert wait_until(lambda: not os.path.exists(f"/proc/{holder}"), 10.0)
    removed = sweep_stale()
    assert name in removed
    assert name not in list_namespaces() and host_if not in list_links()
    assert not list(Path(tempfile.gettempdir()).glob(f"lbt-impair-{owner.pid}"))  # its log
