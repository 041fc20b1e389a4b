"""The VIP: its ARP frame and netlink message, remove() errors, add/remove in a namespace."""

import asyncio
import errno
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from balancer.pair.vip import IPInterface, VirtualIP, gratuitous_arp


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


def _run_in(ns: str, code: str) -> str:
    """Run Python code inside the namespace, as the balancer would run there; its stderr."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.returncode == 0, out.stderr
    return out.stderr


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
            "from balancer.pair.vip import VirtualIP\n"
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
        _run_in(ns, code.replace("await v.add()", "await v.remove()"))
        assert "10.77.0.100" not in _addresses(ns, "dum0")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


class FakeLink:
    """An interface's address set behind the netlink call, answering as the kernel does."""

    def __init__(self, *addresses: str, fail: int | None = None) -> None:
        self.addresses = set(addresses)
        self.fail = fail  # an errno every call fails with (e.g. EPERM without CAP_NET_ADMIN)
        self.calls: list[str] = []

    def __call__(self, op: str, interface: str, iface: IPInterface) -> None:
        self.calls.append(op)
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        if op == "del":
            if str(iface) not in self.addresses:
                raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
            self.addresses.discard(str(iface))
        else:
            self.addresses.add(str(iface))


def test_remove_of_an_absent_vip_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    # at startup a passive removes a VIP it does not hold: the kernel says EADDRNOTAVAIL
    link = FakeLink("10.77.0.5/24")
    v = VirtualIP("10.77.0.100/24", "eth0", netlink=link)
    with caplog.at_level(logging.DEBUG, logger="balancer"):
        asyncio.run(v.remove())
    assert link.calls == ["del"]
    assert link.addresses == {"10.77.0.5/24"}
    assert [r for r in caplog.records if r.name.startswith("balancer")] == []


def test_remove_of_a_held_vip_deletes_it() -> None:
    link = FakeLink("10.77.0.5/24", "10.77.0.100/24")
    asyncio.run(VirtualIP("10.77.0.100/24", "eth0", netlink=link).remove())
    assert link.addresses == {"10.77.0.5/24"}


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENODEV, errno.ENXIO])
def test_remove_surfaces_every_other_error(err: int) -> None:
    # e.g. no CAP_NET_ADMIN or a wrong interface: this node cannot give the VIP up
    v = VirtualIP("10.77.0.100/24", "eth0", netlink=FakeLink(fail=err))
    with pytest.raises(OSError, match=r"cannot remove 10\.77\.0\.100/24 from eth0") as exc:
        asyncio.run(v.remove())
    assert exc.value.errno == err
    assert (
        str(exc.value)
        == f"[Errno {err}] cannot remove 10.77.0.100/24 from eth0: {os.strerror(err)}"
    )


def test_remove_on_a_missing_interface_raises() -> None:
    # the real netlink path: the name lookup fails before any message is sent
    v = VirtualIP("10.77.0.100/24", "no-such-if0")
    with pytest.raises(OSError, match=r"cannot remove 10\.77\.0\.100/24 from no-such-if0") as exc:
        asyncio.run(v.remove())
    assert str(exc.value).endswith("from no-such-if0: no interface with this name")


@needs_netns
def test_remove_of_an_absent_vip_inside_a_namespace_changes_nothing() -> None:
    ns = f"lbvip-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(
            ["ip", "netns", "exec", ns, "ip", "addr", "add", "10.77.0.5/24", "dev", "lo"],
            check=True,
        )
        before = _addresses(ns, "lo")
        code = (
            "import asyncio, logging\n"
            "from balancer.pair.vip import VirtualIP\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "asyncio.run(VirtualIP('10.77.0.100/24', 'lo').remove())\n"
        )
        assert _run_in(ns, code) == ""  # nothing raised, nothing logged
        assert _addresses(ns, "lo") == before
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_netlink_message_matches_ip_addr_replace() -> None:
    import ipaddress
    import struct

    from balancer.pair.vip import netlink_addr_message

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


def test_a_vip_that_cannot_be_removed_stops_the_start(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    argv = ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"]
    argv += ["--peer", "127.0.0.1:47811", "--bind-election", "127.0.0.1:47812"]
    argv += ["--secret-file", str(secret), "--vip", "10.77.0.100/24"]
    argv += ["--vip-interface", "no-such-if0"]
    out = subprocess.run(
        [sys.executable, "-m", "balancer", *argv], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "balancer: cannot start: cannot remove 10.77.0.100/24 from no-such-if0: "
        "no interface with this name"
    ]
