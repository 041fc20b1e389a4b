"""Impairment without sch_netem (method "nfqueue"): what `loadtest.netem` uses when the
kernel has no netem qdisc. Built from what such kernels do have:

- delay (± jitter): in the backend's namespace, iptables sends the packets arriving on
  its veth to NFQUEUE (`--queue-bypass`: they flow undelayed if no holder is bound) and
  `loadtest.nfq_holder`, a child process inside the namespace, accepts each one later;
- loss: `iptables -m statistic --mode random --probability p -j DROP` there;
- rate: `tc qdisc replace ... tbf` on the host end of the veth.

So the impaired direction is host -> backend (requests, connection set-up), the same as
netem on the host end's egress. All rules live in one chain (LBT_IMPAIR) of the namespace
and go with it; the holder dies with its owner; `clear()` removes all of it, idempotently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.netns import PREFIX, NetNsError, require_tools, run
from harness.procs import Child

CHAIN = "LBT_IMPAIR"
QUEUE = 0  # queues are per network namespace: one holder per namespace
HOLDER_READY_S = 5.0
HOLDER_STOP_S = 3.0
HOLDER_MAX_LEN = 10_000
HOLDER_MAX_S = 6 * 3600.0  # bounded even if nobody clears it
TBF_LATENCY_MS = 200
_HOST_VETH = re.compile(r"^lv(\d+)h(\d+)$")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """Where the rules go: namespace `netns`, chain `hook` with `match` (e.g. -i veth),
    and the device (in `tc_netns`, None for the host) that gets the tbf qdisc."""

    netns: str
    hook: str
    match: tuple[str, ...]
    tc_dev: str
    tc_netns: str | None


def target_for(dev: str, netns: str | None) -> Target:
    """The host end of a `harness.netns` veth (lvPIDhN): packets into namespace
    lbt-PID-N through lvPIDpN. A device inside namespace `netns`: packets it sends."""
    if netns is not None:
        return Target(netns, "OUTPUT", ("-o", dev), dev, netns)
    m = _HOST_VETH.match(dev)
    if m is None:
        raise NetNsError(
            f"no netem here, and {dev} is not a harness.netns veth: nothing to impair with"
        )
    pid, n = m.groups()
    return Target(f"{PREFIX}-{pid}-{n}", "INPUT", ("-i", f"lv{pid}p{n}"), dev, None)


def rule_argvs(t: Target, *, loss_pct: float, delay: bool) -> list[list[str]]:
    """The iptables commands (after the chain is made and flushed) for one impairment."""
    ipt = ["ip", "netns", "exec", t.netns, "iptables", "-w", "5"]
    out = []
    if loss_pct:
        p = f"{loss_pct / 100:.6f}"
        out.append([*ipt, "-A", CHAIN, "-m", "statistic", "--mode", "random",
                    "--probability", p, "-j", "DROP"])  # fmt: skip
    if delay:
        out.append([*ipt, "-A", CHAIN, "-j", "NFQUEUE", "--queue-num", str(QUEUE),
                    "--queue-bypass"])  # fmt: skip
    out.append([*ipt, "-I", t.hook, "1", *t.match, "-j", CHAIN])
    return out


def tbf_argv(t: Target, rate_kbit: int) -> list[str]:
    """tbf: `rate`, a burst of 1/50 s of traffic (at least 2 full frames), and packets
    that would wait over TBF_LATENCY_MS dropped."""
    burst = max(3200, rate_kbit * 1000 // 8 // 50)
    argv = ["tc", "qdisc", "replace", "dev", t.tc_dev, "root", "tbf", "rate",
            f"{rate_kbit}kbit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]  # fmt: skip
    return argv if t.tc_netns is None else ["ip", "netns", "exec", t.tc_netns, *argv]


def holder_args(delay_ms: float, jitter_ms: float, owner: int) -> list[str]:
    """`python` arguments of one bounded holder (owner 0: in a helper container)."""
    return ["-m", "loadtest.nfq_holder", "--queue", str(QUEUE), "--delay-ms", f"{delay_ms:g}",
            "--jitter-ms", f"{jitter_ms:g}", "--max-len", str(HOLDER_MAX_LEN),
            "--max-seconds", f"{HOLDER_MAX_S:g}", "--owner", str(owner)]  # fmt: skip


def holder_argv(t: Target, delay_ms: float, jitter_ms: float, owner: int) -> list[str]:
    return [
        "ip",
        "netns",
        "exec",
        t.netns,
        sys.executable,
        *holder_args(delay_ms, jitter_ms, owner),
    ]


_holders: dict[str, Child] = {}  # namespace -> its running holder


def _log_path(netns: str) -> Path:
    return Path(tempfile.gettempdir()) / f"lbt-impair-{os.getpid()}" / f"{netns}.log"


def _start_holder(t: Target, delay_ms: float, jitter_ms: float) -> Child:
    """The holder as a harness child (own session, dies with us), ready once bound."""
    holder = Child(
        f"nfq_holder[{t.netns}]",
        holder_argv(t, delay_ms, jitter_ms, os.getpid()),
        _log_path(t.netns),
    ).start()
    if not holder.wait_output("ready", HOLDER_READY_S):
        why = holder.last_words()
        _stop(holder)
        raise NetNsError(f"nfqueue holder in {t.netns}: {why}")
    return holder


def _stop(holder: Child) -> None:
    holder.stop(grace=HOLDER_STOP_S)
    with contextlib.suppress(OSError):
        holder.log.unlink()
        holder.log.parent.rmdir()  # the last of this process's holders


def apply(
    dev: str,
    *,
    delay_ms: float,
    jitter_ms: float,
    loss_pct: float,
    rate_kbit: int,
    netns: str | None = None,
) -> dict[str, object]:
    """Replace any impairment of `dev` by this one; returns what is in use."""
    require_tools("ip", "iptables", "tc")
    t = target_for(dev, netns)
    clear(dev, netns=netns)
    t0 = time.monotonic()
    try:
        if delay_ms:
            _holders[t.netns] = _start_holder(t, delay_ms, jitter_ms)
        ipt = ["ip", "netns", "exec", t.netns, "iptables", "-w", "5"]
        run([*ipt, "-N", CHAIN])
        for argv in rule_argvs(t, loss_pct=loss_pct, delay=bool(delay_ms)):
            run(argv)
        if rate_kbit:
            run(tbf_argv(t, rate_kbit))
    except BaseException:
        clear(dev, netns=netns)
        raise
    info: dict[str, object] = {
        "method": "nfqueue",
        "netns": t.netns,
        "rules": f"iptables {t.hook} {' '.join(t.match)} -j {CHAIN}",
    }
    if delay_ms:
        info["holder_pid"] = _holders[t.netns].pid
    if rate_kbit:
        info["tbf"] = t.tc_dev
    log.info("impairment on %s via nfqueue (%.2f s to set up): %s", dev,
             time.monotonic() - t0, info)  # fmt: skip
    return info


def clear(dev: str, *, netns: str | None = None) -> bool:
    """Remove the holder, the rules and the tbf qdisc of `dev`; False if none was there."""
    t = target_for(dev, netns)
    found = False
    holder = _holders.pop(t.netns, None)
    if holder is not None:
        found = True
        _stop(holder)
    ipt = ["ip", "netns", "exec", t.netns, "iptables", "-w", "5"]
    for _ in range(10):  # one jump per apply; bounded in case of strays
        if run([*ipt, "-D", t.hook, *t.match, "-j", CHAIN], check=False).returncode != 0:
            break
        found = True
    if run([*ipt, "-F", CHAIN], check=False).returncode == 0:
        run([*ipt, "-X", CHAIN], check=False)
    if "tbf" in _qdisc(t):
        found = True
        tc = ["tc", "qdisc", "del", "dev", t.tc_dev, "root"]
        run(tc if t.tc_netns is None else ["ip", "netns", "exec", t.tc_netns, *tc], check=False)
    return found


def _qdisc(t: Target) -> str:
    tc = ["tc", "qdisc", "show", "dev", t.tc_dev]
    argv = tc if t.tc_netns is None else ["ip", "netns", "exec", t.tc_netns, *tc]
    return run(argv, check=False).stdout


def active(dev: str, *, netns: str | None = None) -> bool:
    """True while a holder runs, a rule jumps to the chain, or tbf sits on the device."""
    try:
        t = target_for(dev, netns)
    except NetNsError:
        return False
    holder = _holders.get(t.netns)
    if holder is not None and holder.alive:
        return True
    ipt = ["ip", "netns", "exec", t.netns, "iptables", "-w", "5", "-S", t.hook]
    return CHAIN in run(ipt, check=False).stdout or "tbf" in _qdisc(t)


# compose: the same from helper containers in a backend container's network namespace ----
COMPOSE_LABEL = "org.lb-testbed.impair"
DOCKER_TIMEOUT_S = 60.0


def helper_argv(
    container: str, entry: str, args: Sequence[str], *, image: str, holder: bool = False
) -> list[str]:
    """`docker run` of a helper (root, NET_ADMIN) in `container`'s network namespace; the
    holder runs detached, named after the backend container, until `docker rm -f`."""
    head = ["docker", "run", "--rm"]
    if holder:
        head += ["-d", "--name", holder_name(container)]
    return [*head, "--network", f"container:{container}", "--cap-add", "NET_ADMIN",
            "--user", "0", "--label", f"{COMPOSE_LABEL}={container}",
            "--entrypoint", entry, image, *args]  # fmt: skip


def holder_name(container: str) -> str:
    return f"lbt-impair-{container[:12]}"


def compose_rule_args(dev: str, *, loss_pct: float, delay: bool) -> list[list[str]]:
    """iptables arguments (after -N): the egress of `dev`, the backend's responses, as
    netem on the container's eth0 would impair."""
    t = Target("-", "OUTPUT", ("-o", dev), dev, None)
    return [argv[5:] for argv in rule_argvs(t, loss_pct=loss_pct, delay=delay)]


def apply_compose(
    container: str,
    *,
    delay_ms: float,
    jitter_ms: float,
    loss_pct: float,
    rate_kbit: int,
    image: str,
    dev: str = "eth0",
) -> dict[str, object]:
    """The nfqueue method in a compose backend's namespace (the image needs iptables)."""
    clear_compose(container, image=image, dev=dev)

    def helper(entry: str, *args: str) -> None:
        run(helper_argv(container, entry, args, image=image), timeout=DOCKER_TIMEOUT_S)

    try:
        if delay_ms:
            args = holder_args(delay_ms, jitter_ms, 0)
            argv = helper_argv(container, "python", args, image=image, holder=True)
            run(argv, timeout=DOCKER_TIMEOUT_S)
            logs = ["docker", "logs", holder_name(container)]
            deadline = time.monotonic() + HOLDER_READY_S
            while "ready" not in run(logs, check=False).stdout:
                if time.monotonic() > deadline:
                    raise NetNsError(f"nfqueue holder for {container}: not ready")
                time.sleep(0.2)
        helper("iptables", "-w", "5", "-N", CHAIN)
        for args in compose_rule_args(dev, loss_pct=loss_pct, delay=bool(delay_ms)):
            helper("iptables", *args)
        if rate_kbit:
            helper("tc", *tbf_argv(Target("-", "", (), dev, None), rate_kbit)[1:])
    except BaseException:
        clear_compose(container, image=image, dev=dev)
        raise
    return {"method": "nfqueue", "container": container, "rules": f"OUTPUT -o {dev}"}


def clear_compose(container: str, *, image: str, dev: str = "eth0") -> bool:
    """Stop the holder container, remove the rules and the tbf qdisc; idempotent."""

    def helper(entry: str, *args: str) -> bool:
        argv = helper_argv(container, entry, args, image=image)
        return run(argv, check=False, timeout=DOCKER_TIMEOUT_S).returncode == 0

    found = run(["docker", "rm", "-f", holder_name(container)], check=False).returncode == 0
    for _ in range(10):
        if not helper("iptables", "-w", "5", "-D", "OUTPUT", "-o", dev, "-j", CHAIN):
            break
        found = True
    if helper("iptables", "-w", "5", "-F", CHAIN):
        helper("iptables", "-w", "5", "-X", CHAIN)
    found = helper("tc", "qdisc", "del", "dev", dev, "root") or found
    return found
