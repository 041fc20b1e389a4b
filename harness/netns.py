"""Network namespaces for local impairment drills: a namespace joined to the host by a
veth pair, so `tc netem` on the veth delays (or drops) one backend's traffic and nothing
else on loopback.

    with NetNs.create() as ns:               # lbt-PID-N, veth lvPIDhN <-> lvPIDpN
        argv = ns.wrap([sys.executable, "-m", "backends", "--host", ns.inner_ip, ...])
        ...                                   # the balancer reaches ns.inner_ip:PORT
    # the namespace and both veth ends are gone

Names carry the owner's pid; `sweep_stale()` removes what a dead owner (SIGKILLed test,
crashed soak) left behind. Needs root and `ip` (iproute2); without them `NetNsError` says
so in one line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from harness.procs import StartError

PREFIX = "lbt"
_NS = re.compile(rf"^{PREFIX}-(\d+)-(\d+)$")
_VETH = re.compile(r"^lv(\d+)h(\d+)$")
SUBNET = ipaddress.IPv4Network("10.231.0.0/16")  # carved into /30s, one per namespace
CMD_TIMEOUT_S = 10.0
_counter = 0


class NetNsError(StartError):
    """A namespace could not be made or removed; the message is one line."""


def require_tools(*tools: str) -> None:
    """Raise NetNsError unless running as root with every tool on PATH."""
    if os.geteuid() != 0:
        raise NetNsError("network namespaces need root (run as root, or skip the netns drills)")
    for tool in tools:
        if shutil.which(tool) is None:
            raise NetNsError(f"`{tool}` not found: install iproute2")


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run one `ip`/`tc` command (bounded); NetNsError with its stderr's last line."""
    try:
        res = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise NetNsError(f"`{' '.join(argv)}` took over {timeout:.0f} s") from None
    except FileNotFoundError:
        raise NetNsError(f"`{argv[0]}` not found: install iproute2") from None
    if check and res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise NetNsError(f"`{' '.join(argv)}` failed: {lines[-1] if lines else res.returncode}")
    return res


def pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def list_namespaces() -> list[str]:
    res = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def list_links() -> list[str]:
    res = run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in res.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def _used_subnets() -> set[ipaddress.IPv4Network]:
    res = run(["ip", "-4", "-o", "addr", "show"], check=False)
    used = set()
    for m in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+/\d+)", res.stdout):
        used.add(ipaddress.IPv4Interface(m.group(1)).network)
    return used


def _pick_subnet(seed: int) -> ipaddress.IPv4Network:
    subnets = list(SUBNET.subnets(new_prefix=30))
    used = _used_subnets()
    for k in range(len(subnets)):
        net = subnets[(seed + k) % len(subnets)]
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetNsError(f"no free /30 left in {SUBNET}")


@dataclass
class NetNs:
    """One namespace `name` with veth `host_if` (host side, `host_ip`) <-> `inner_if`
    (inside, `inner_ip`). `delete()` is idempotent."""

    name: str
    host_if: str
    inner_if: str
    host_ip: str
    inner_ip: str
    owner: int = field(default_factory=os.getpid)
    alive: bool = True

    @classmethod
    def create(cls) -> NetNs:
        """Make a fresh namespace and veth pair, addressed and up; sweeps stale ones first."""
        global _counter
        require_tools("ip")
        sweep_stale()
        pid = os.getpid()
        _counter += 1
        n = _counter
        net = _pick_subnet(pid * 8 + n)
        host_ip, inner_ip = (str(h) for h in list(net.hosts())[:2])
        ns = cls(f"{PREFIX}-{pid}-{n}", f"lv{pid}h{n}", f"lv{pid}p{n}", host_ip, inner_ip, pid)
        if len(ns.host_if) > 15:
            raise NetNsError(f"interface name {ns.host_if} is too long")
        try:
            run(["ip", "netns", "add", ns.name])
            run(["ip", "link", "add", ns.host_if, "type", "veth", "peer", "name", ns.inner_if])
            run(["ip", "link", "set", ns.inner_if, "netns", ns.name])
            run(["ip", "addr", "add", f"{host_ip}/30", "dev", ns.host_if])
            run(["ip", "link", "set", ns.host_if, "up"])
            inside = ["ip", "netns", "exec", ns.name, "ip"]
            run([*inside, "addr", "add", f"{inner_ip}/30", "dev", ns.inner_if])
            run([*inside, "link", "set", ns.inner_if, "up"])
            run([*inside, "link", "set", "lo", "up"])
        except BaseException:
            ns.delete()
            raise
        return ns

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace (`ip netns exec` execs: the pid is the child's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def delete(self) -> None:
        """Remove the namespace (its veth end goes with it) and the host veth end."""
        delete_namespace(self.name, self.host_if)
        self.alive = False

    def exists(self) -> bool:
        return self.name in list_namespaces() or self.host_if in list_links()

    def __enter__(self) -> NetNs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()


def delete_namespace(name: str, host_if: str | None = None) -> None:
    """Delete namespace `name` and veth `host_if` if they exist (errors ignored)."""
    if name in list_namespaces():
        run(["ip", "netns", "del", name], check=False)
    if host_if and host_if in list_links():
        run(["ip", "link", "del", host_if], check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces and host veths whose owner pid is dead; returns what it removed."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return []
    removed = []
    for name in list_namespaces():
        m = _NS.match(name)
        if m and not pid_alive(int(m.group(1))):
            run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    for link in list_links():
        m = _VETH.match(link)
        if m and not pid_alive(int(m.group(1))):
            with contextlib.suppress(NetNsError):
                run(["ip", "link", "del", link], check=False)
            removed.append(link)
    # logs of the nfqueue delay holders (loadtest/nfq_impair.py) of a dead owner
    for logs in Path(tempfile.gettempdir()).glob("lbt-impair-*"):
        pid = logs.name.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(logs, ignore_errors=True)
            removed.append(logs.name)
    return removed
