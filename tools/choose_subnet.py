#!/usr/bin/env python3
"""Choose the compose network's addresses before `make up`, so it cannot trip on a subnet
another Docker network already holds ("Pool overlaps with other one on this address space").

Prints shell assignments for LB_SUBNET, LB_IP_RANGE, LB_VIP, LB_IP_A, LB_IP_B and
LB_IP_ENTRY:
- the project's own network already exists: its subnet, as it is;
- LB_SUBNET set by the user: that one, or a one-line error naming the network that holds it;
- otherwise the first free /24 of 172.28.0.0/16, then 10.213.0.0/16, with the VIP at .100,
  the balancers at .11 and .12, the entry relay at .13 (the pair accepts PROXY headers
  from it only), and Docker's dynamic range in the upper half (.128/25).

Addresses the user set (LB_VIP, LB_IP_A, LB_IP_B, LB_IP_ENTRY, LB_IP_RANGE) are kept as given.
Stdlib and the docker CLI only: `make up` runs before any venv exists.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator

Net = ipaddress.IPv4Network
CANDIDATES = ("172.28.0.0/16", "10.213.0.0/16")


def docker_networks() -> dict[str, list[Net]]:
    """Name -> IPv4 subnets of every Docker network."""
    ids = subprocess.run(
        ["docker", "network", "ls", "-q"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    if not ids:
        return {}
    out = subprocess.run(
        ["docker", "network", "inspect", *ids],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    nets: dict[str, list[Net]] = {}
    for n in json.loads(out):
        subnets = []
        for cfg in (n.get("IPAM") or {}).get("Config") or []:
            try:
                net = ipaddress.ip_network(cfg.get("Subnet", ""), strict=False)
            except ValueError:
                continue
            if isinstance(net, Net):
                subnets.append(net)
        nets[n["Name"]] = subnets
    return nets


def holder(subnet: Net, nets: dict[str, list[Net]]) -> tuple[str, Net] | None:
    for name, subnets in sorted(nets.items()):
        for net in subnets:
            if net.overlaps(subnet):
                return name, net
    return None


def candidates() -> Iterator[Net]:
    for block in CANDIDATES:
        yield from ipaddress.IPv4Network(block).subnets(new_prefix=24)


def addresses(subnet: Net, env: dict[str, str]) -> dict[str, str]:
    if subnet.prefixlen > 24:
        raise ValueError(f"LB_SUBNET {subnet} is too small: use a /24 or larger")
    base = subnet.network_address
    upper = list(subnet.subnets(prefixlen_diff=1))[1]
    derived = {
        "LB_SUBNET": str(subnet),
        "LB_IP_RANGE": str(upper) if subnet.prefixlen == 24 else f"{base + 128}/25",
        "LB_VIP": str(base + 100),
        "LB_IP_A": str(base + 11),
        "LB_IP_B": str(base + 12),
        "LB_IP_ENTRY": str(base + 13),
    }
    return {k: env.get(k) or v for k, v in derived.items()}


def choose(env: dict[str, str], nets: dict[str, list[Net]]) -> dict[str, str]:
    own = f"{env.get('COMPOSE_PROJECT_NAME') or 'lbtestbed'}_lbnet"
    wanted = env.get("LB_SUBNET")
    if nets.get(own):
        current = nets[own][0]
        if wanted and ipaddress.ip_network(wanted, strict=False) != current:
            raise ValueError(
                f"network {own} exists with {current}, not LB_SUBNET={wanted}: "
                "run `make down` first to change it"
            )
        return addresses(current, env)
    others = {k: v for k, v in nets.items() if k != own}
    if wanted:
        try:
            subnet = ipaddress.ip_network(wanted, strict=False)
        except ValueError:
            raise ValueError(
                f"LB_SUBNET={wanted!r} is not an IPv4 network like 172.29.0.0/24"
            ) from None
        if not isinstance(subnet, Net):
            raise ValueError(f"LB_SUBNET={wanted!r} is not an IPv4 network like 172.29.0.0/24")
        clash = holder(subnet, others)
        if clash:
            free = next((c for c in candidates() if holder(c, others) is None), None)
            hint = f", e.g. `make up LB_SUBNET={free}`" if free else ""
            raise ValueError(
                f"LB_SUBNET {subnet} overlaps Docker network {clash[0]!r} ({clash[1]}); "
                f"choose another{hint} (the VIP and balancer addresses follow it), "
                "or leave LB_SUBNET unset to pick a free one"
            )
        return addresses(subnet, env)
    for c in candidates():
        if holder(c, others) is None:
            return addresses(c, env)
    raise ValueError("no free /24 in 172.28.0.0/16 or 10.213.0.0/16: set LB_SUBNET")


def main() -> int:
    try:
        chosen = choose(dict(os.environ), docker_networks())
    except ValueError as exc:
        print(f"make up: {exc}", file=sys.stderr)
        return 2
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"make up: cannot list Docker networks ({exc})", file=sys.stderr)
        return 2
    for key, value in chosen.items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
