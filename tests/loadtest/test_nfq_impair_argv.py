"""loadtest/nfq_impair.py's commands, without running them: where the rules go, the
NFQUEUE bypass, the loss probability, tbf, and the compose helpers' privileges."""

from __future__ import annotations

import pytest

from harness.netns import NetNsError
from loadtest import nfq_impair as nq


def test_host_veth_maps_to_its_namespace_and_inner_veth() -> None:
    t = nq.target_for("lv123h4", None)
    assert (t.netns, t.hook, t.match, t.tc_dev, t.tc_netns) == (
        "lbt-123-4",
        "INPUT",
        ("-i", "lv123p4"),
        "lv123h4",
        None,
    )
    assert nq.target_for("eth1", "other").match == ("-o", "eth1")
    with pytest.raises(NetNsError, match=r"not a harness\.netns veth"):
        nq.target_for("eth0", None)


def test_rules_drop_then_queue_with_bypass_then_jump() -> None:
    t = nq.target_for("lv1h1", None)
    argvs = nq.rule_argvs(t, loss_pct=20, delay=True)
    assert all(a[:4] == ["ip", "netns", "exec", "lbt-1-1"] for a in argvs)
    loss, queue, jump = (a[4:] for a in argvs)
    assert loss[-5:] == ["random", "--probability", "0.200000", "-j", "DROP"]
    assert queue[-5:] == ["-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"]
    assert jump[-6:] == ["INPUT", "1", "-i", "lv1p1", "-j", nq.CHAIN]
    assert len(nq.rule_argvs(t, loss_pct=0, delay=False)) == 1  # the jump only


def test_tbf_burst_and_holder_bounds() -> None:
    t = nq.target_for("lv1h1", None)
    argv = nq.tbf_argv(t, 2000)
    assert argv[:7] == ["tc", "qdisc", "replace", "dev", "lv1h1", "root", "tbf"]
    assert argv[argv.index("burst") + 1] == "5000"  # 1/50 s of 2 Mbit/s
    assert nq.tbf_argv(t, 64)[argv.index("burst") + 1] == "3200"  # at least 2 frames
    h = nq.holder_argv(t, 50, 5, owner=42)
    assert h[:4] == ["ip", "netns", "exec", "lbt-1-1"]
    assert h[h.index("--owner") + 1] == "42" and "--max-len" in h and "--max-seconds" in h


def test_compose_helper_is_root_with_net_admin_in_the_backend_namespace() -> None:
    argv = nq.helper_argv("abc", "iptables", ["-S"], image="img")
    assert "container:abc" in argv and "NET_ADMIN" in argv
    assert argv[argv.index("--user") + 1] == "0"
    assert argv[-3:] == ["iptables", "img", "-S"]
    held = nq.helper_argv("abcdef0123456789", "python", ["-m", "x"], image="img", holder=True)
    assert held[held.index("--name") + 1] == "lbt-impair-abcdef012345" and "-d" in held
    rules = nq.compose_rule_args("eth0", loss_pct=0, delay=True)
    assert rules[-1] == ["-w", "5", "-I", "OUTPUT", "1", "-o", "eth0", "-j", nq.CHAIN]
