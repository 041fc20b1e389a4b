"""harness/netns.py and loadtest/netem.py on the real kernel: namespace, veth and netem
qdisc set up and removed, also after the owning process was SIGKILLed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from harness.netns import NetNs, list_links, list_namespaces, sweep_stale
from harness.procs import REPO, python_env
from loadtest.netem import (
    Impairment,
    NetemUnavailable,
    apply_argv,
    apply_local,
    clear_local,
    compose_argv,
    impaired,
    shown,
)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="needs root with ip and tc (iproute2)",
)


def test_impairment_args() -> None:
    assert Impairment(delay_ms=200, jitter_ms=20).netem_args() == ["delay", "200ms", "20ms"]
    assert Impairment(loss_pct=1.5, rate_kbit=512).netem_args() == [
        "loss",
        "1.5%",
        "rate",
        "512kbit",
    ]
    for bad in ({}, {"jitter_ms": 5}, {"loss_pct": 101}, {"delay_ms": -1}):
        with pytest.raises(ValueError):
            Impairment(**bad)


def test_compose_helper_joins_the_backend_namespace_with_net_admin() -> None:
    argv = compose_argv("abc123", apply_argv("eth0", Impairment(delay_ms=100)))
    assert argv[:3] == ["docker", "run", "--rm"]
    assert "container:abc123" in argv and "NET_ADMIN" in argv
    # the helper's entrypoint is tc; the backend container itself gains no capability
    assert argv[argv.index("--entrypoint") + 1] == "tc"
    assert argv[-8:] == ["qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "100ms"]


@pytest.mark.netns
@needs_root
def test_namespace_veth_and_netem_life_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LBT_IMPAIR_METHOD", "netem")  # the fallback: test_impair_nfqueue.py
    with NetNs.create() as ns:
        assert ns.name in list_namespaces()
        assert ns.host_if in list_links()
        # the namespace is reachable through the veth
        ping = ["ping", "-c", "1", "-W", "2", ns.inner_ip]
        if shutil.which("ping"):
            assert subprocess.run(ping, capture_output=True, timeout=10).returncode == 0
        # the command runs inside: it sees the inner veth, not the host's
        out = subprocess.run(
            ns.wrap(["ip", "-o", "link"]), capture_output=True, text=True, timeout=10
        ).stdout
        assert ns.inner_if in out and ns.host_if not in out
        try:
            apply_local(ns.host_if, Impairment(delay_ms=50, jitter_ms=5))
        except NetemUnavailable as exc:
            ns.delete()
            pytest.skip(f"namespace checked; qdisc part skipped: {exc}")
        assert "delay 50ms" in shown(ns.host_if)
        apply_local(ns.host_if, Impairment(delay_ms=80))  # replaces, does not stack
        assert "delay 80ms" in shown(ns.host_if)
        assert clear_local(ns.host_if)
        assert not impaired(ns.host_if)
        assert not clear_local(ns.host_if)  # nothing left to clear
    assert ns.name not in list_namespaces()
    assert ns.host_if not in list_links()


_OWNER = """
import sys, time
from harness.netns import NetNs
from loadtest.netem import Impairment, NetemUnavailable, apply_local
ns = NetNs.create()
try:
    qdisc = apply_local(ns.host_if, Impairment(delay_ms=100))["method"]  # netem or nfqueue
except NetemUnavailable:
    qdisc = "none"
print(ns.name, ns.host_if, qdisc, flush=True)
time.sleep(60)
"""


@pytest.mark.netns
@needs_root
def test_sweep_removes_what_a_killed_owner_left() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER],
        cwd=REPO,
        env=python_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        name, host_if, qdisc = owner.stdout.readline().split()
        assert name in list_namespaces()
        assert impaired(host_if) == (qdisc != "none")
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    assert name in list_namespaces()  # a SIGKILLed owner cleans nothing itself
    removed = sweep_stale()
    assert name in removed
    assert name not in list_namespaces()
    assert host_if not in list_links()


@pytest.mark.netns
@needs_root
def test_sweep_keeps_a_live_owners_namespace() -> None:
    with NetNs.create() as ns:
        assert ns.name not in sweep_stale()
        assert ns.name in list_namespaces()
