"""Network-namespace plumbing for bench/failover.py: a private bridge and its hosts.

Everything lives inside namespaces named `<prefix>-*` that this module creates and deletes;
nothing is added to the root namespace, so no traffic can leave the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence

SUBNET = "10.213.0"
PREFIX_LEN = 24
HOSTS = {"a": 1, "b": 2, "c": 10, "s": 20}  # two balancer hosts, client, backend server
IFACE = "eth0"  # the name of every host's leg on the bridge


class NetnsError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and res.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res.stdout


class Topology:
    """Namespaces `<prefix>-br` (bridge br0) and one per host, each with `eth0` on br0."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ns = {name: f"{prefix}-{name}" for name in ("br", *HOSTS)}
        self.created: list[str] = []

    def addr(self, host: str) -> str:
        return f"{SUBNET}.{HOSTS[host]}"

    def create(self) -> None:
        for ns in self.ns.values():
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        br = self.ns["br"]
        ip("-n", br, "link", "add", "br0", "type", "bridge")
        ip("-n", br, "link", "set", "br0", "up")
        for host in HOSTS:
            leg = f"v{host}"
            ip("-n", br, "link", "add", leg, "type", "veth", "peer", "name", IFACE)
            ip("-n", br, "link", "set", IFACE, "netns", self.ns[host])
            ip("-n", br, "link", "set", leg, "master", "br0", "up")
            ns = self.ns[host]
            ip("-n", ns, "addr", "add", f"{self.addr(host)}/{PREFIX_LEN}", "dev", IFACE)
            ip("-n", ns, "link", "set", IFACE, "up")

    def exec(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def has_addr(self, host: str, addr: str) -> bool:
        out = ip("-n", self.ns[host], "-o", "addr", "show", "dev", IFACE, check=False)
        return f" {addr}/" in out

    def link(self, host: str, up: bool) -> None:
        ip("-n", self.ns[host], "link", "set", IFACE, "up" if up else "down")

    def reset_host(self, host: str, vip_cidr: str) -> None:
        """Link up, VIP gone: the state a measurement starts from."""
        self.link(host, True)
        ip("-n", self.ns[host], "addr", "del", vip_cidr, "dev", IFACE, check=False)

    def flush_neighbours(self, host: str) -> None:
        ip("-n", self.ns[host], "neigh", "flush", "all", check=False)

    def pids(self, ns: str) -> list[int]:
        out = ip("netns", "pids", ns, check=False)
        return [int(p) for p in out.split() if p.isdigit()]

    def destroy(self) -> None:
        """Kill what still runs in our namespaces (all started by us), then delete them."""
        for ns in reversed(self.created):
            for pid in self.pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(self.pids(ns) for ns in self.created):
            time.sleep(0.05)
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()
