"""The VIP's gratuitous ARP frame, and add/remove over netlink in a namespace we create."""

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from balancer.pair.role import VirtualIP, gratuitous_arp


def test_gratuitous_arp_frame_announces_ip_at_mac() -> None:
    mac = bytes.fromhex("02420a0000aa")
    ip = bytes([172, 28, 0, 100])
    frame = gratuitous_arp("eth0", mac, ip)
    assert frame[:6] == b"\xff" * 6  # broadcast
    assert frame[6:12] == mac
    assert frame[12:14] == b"\x08\x06"  # ARP
    arp = frame[14:]
    assert arp[:8] == bytes.fromhex("0001080006040001")  # Ethernet/IPv4, request
    assert arp[8:14] == mac and arp[14:18] == ip  # sender
    assert arp[24:28] == ip  # target = sender: unsolicited
    assert len(frame) == 42


needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)


def _run_in(ns: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run Python code inside the namespace, as the balancer would run there."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.returncode == 0, out.stderr
    return out


def _addresses(ns: str, ifname: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "-4", "addr", "show", ifname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@needs_netns
def test_vip_add_and_remove_inside_a_namespace() -> None:
    ns = f"lbvip-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        code = (
            "import asyncio, uvloop\n"  # production runs on uvloop
            "from balancer.pair.role import VirtualIP\n"
            "async def main():\n"
            "    v = VirtualIP('10.77.0.100/24', 'dum0')\n"
            "    await v.add()\n"
            "    await asyncio.sleep(0.3)\n"  # the second announcement fires here
            "    print('added')\n"
            "uvloop.install()\n"
            "asyncio.run(main())\n"
        )
        # a veth pair: this kernel may lack the dummy module
        subprocess.run(
            ["ip", "netns", "exec", ns, "ip", "link", "add", "dum0", "type", "veth"]
            + ["peer", "name", "dum1"],
            check=True,
        )
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "dum0", "up"], check=True)
        _run_in(ns, code)
        assert "10.77.0.100/24" in _addresses(ns, "dum0")
        removed = code.replace("await v.add()", "await v.remove()")
        _run_in(ns, removed)
        assert "10.77.0.100" not in _addresses(ns, "dum0")
        # at startup a passive removes a VIP it does not hold: no error, no warning
        logged = "import logging; logging.basicConfig(level=logging.WARNING)\n" + removed
        again = _run_in(ns, logged)
        assert (again.stdout, again.stderr) == ("added\n", "")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_remove_on_a_missing_interface_warns(caplog: pytest.LogCaptureFixture) -> None:
    # remove() never raises (a passive calls it at startup), so a wrong interface name
    # must at least show in the log rather than pass in silence
    v = VirtualIP("10.77.0.100/24", "no-such-if0")
    with caplog.at_level(logging.WARNING, logger="balancer.pair"):
        asyncio.run(v.remove())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no-such-if0" in warnings[0], warnings


def test_netlink_message_matches_ip_addr_replace() -> None:
    import ipaddress
    import struct

    from balancer.pair.role import netlink_addr_message

    msg = netlink_addr_message("add", 7, ipaddress.ip_interface("172.28.0.100/24"))
    length, mtype, flags, _seq, _pid = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) == 16 + 8 + 2 * 8
    assert mtype == 20  # RTM_NEWADDR
    assert flags == 0x1 | 0x4 | 0x100 | 0x400  # request, ack, replace, create
    family, prefix, _, _, index = struct.unpack_from("=BBBBI", msg, 16)
    assert (family, prefix, index) == (2, 24, 7)
    # IFA_LOCAL and IFA_ADDRESS, both the VIP
    assert msg[24:32] == struct.pack("=HH", 8, 2) + bytes([172, 28, 0, 100])
    assert msg[32:40] == struct.pack("=HH", 8, 1) + bytes([172, 28, 0, 100])
    delete = netlink_addr_message("del", 7, ipaddress.ip_interface("172.28.0.100/24"))
    assert struct.unpack_from("=IHH", delete)[1:] == (21, 0x1 | 0x4)  # RTM_DELADDR
