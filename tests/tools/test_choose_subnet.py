"""`make up` chooses the compose network's subnet so that it never overlaps another network."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import choose_subnet  # noqa: E402

N = ipaddress.IPv4Network


def test_the_default_subnet_when_it_is_free() -> None:
    got = choose_subnet.choose({}, {"bridge": [N("172.17.0.0/16")]})
    assert got == {
        "LB_SUBNET": "172.28.0.0/24",
        "LB_IP_RANGE": "172.28.0.128/25",
        "LB_VIP": "172.28.0.100",
        "LB_IP_A": "172.28.0.11",
        "LB_IP_B": "172.28.0.12",
        "LB_IP_ENTRY": "172.28.0.13",
    }


def test_a_taken_default_moves_to_the_next_free_24_with_its_addresses() -> None:
    nets = {"other": [N("172.28.0.0/16")], "more": [N("10.213.0.0/24")]}
    got = choose_subnet.choose({}, nets)
    assert got["LB_SUBNET"] == "10.213.1.0/24"
    assert got["LB_VIP"] == "10.213.1.100" and got["LB_IP_A"] == "10.213.1.11"


def test_a_user_subnet_that_clashes_is_refused_naming_the_network() -> None:
    with pytest.raises(ValueError) as err:
        choose_subnet.choose({"LB_SUBNET": "172.28.0.0/24"}, {"someone": [N("172.28.0.0/16")]})
    msg = str(err.value)
    assert "'someone'" in msg and "172.28.0.0/16" in msg and "LB_SUBNET=10.213.0.0/24" in msg
    assert "\n" not in msg


def test_the_projects_own_network_keeps_its_subnet() -> None:
    nets = {"lbtestbed_lbnet": [N("172.28.5.0/24")], "x": [N("172.28.0.0/24")]}
    assert choose_subnet.choose({}, nets)["LB_SUBNET"] == "172.28.5.0/24"


def test_addresses_the_user_set_are_kept() -> None:
    got = choose_subnet.choose({"LB_SUBNET": "172.29.0.0/24", "LB_VIP": "172.29.0.200"}, {})
    assert got["LB_VIP"] == "172.29.0.200" and got["LB_IP_A"] == "172.29.0.11"


@pytest.mark.parametrize("bad", ["foo", "172.29.0.0/26", "fd00::/64"])
def test_a_bad_subnet_is_a_one_line_error(bad: str) -> None:
    with pytest.raises(ValueError, match="LB_SUBNET"):
        choose_subnet.choose({"LB_SUBNET": bad}, {})


def _docker() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.docker
def test_against_the_engine_a_clashing_network_is_named_and_avoided() -> None:
    if not _docker():
        pytest.skip("no Docker engine")
    name = f"lbtestbed-clash-{uuid.uuid4().hex[:8]}"
    taken = choose_subnet.choose(
        {"COMPOSE_PROJECT_NAME": "lbtestbed-none"}, choose_subnet.docker_networks()
    )
    subnet = taken["LB_SUBNET"]
    subprocess.run(
        ["docker", "network", "create", "--subnet", subnet, name],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        tool = [sys.executable, str(ROOT / "tools" / "choose_subnet.py")]
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "COMPOSE_PROJECT_NAME": "lbtestbed-none"}
        refused = subprocess.run(
            tool, env={**env, "LB_SUBNET": subnet}, capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 2
        assert name in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        chosen = subprocess.run(tool, env=env, capture_output=True, text=True, timeout=60)
        assert chosen.returncode == 0
        picked = dict(line.split("=", 1) for line in chosen.stdout.split())
        assert not N(picked["LB_SUBNET"]).overlaps(N(subnet))
    finally:
        subprocess.run(["docker", "network", "rm", name], capture_output=True, timeout=60)
