"""The saved-SYN parser, against SYNs captured with TCP_SAVED_SYN on this project's kernel,
and on a real listener."""

from __future__ import annotations

import socket

import pytest

from balancer.io.lab import read_syn, save_syn
from balancer.lab.syn import SynError, parse

# Linux 6.18 over loopback (MSS 65495, SACK, timestamps, window scale 10)
SYN_V4 = bytes.fromhex(
    "4500003c596440004006e3557f0000017f000001d1feaba3da6206c000000000"
    "a002ffd7fe3000000204ffd70402080a9fe7ee01000000000103030a"
)
SYN_V6 = bytes.fromhex(
    "600626c8002806400000000000000000000000000000000100000000000000000000000000000001"
    "ca4684d1d203e3dc00000000a002ffc4003000000204ffc40402080ae66cbd7f000000000103030a"
)


def test_captured_ipv4_syn() -> None:
    s = parse(SYN_V4)
    assert (s.ip_version, s.ttl, s.window) == (4, 64, 65495)
    assert (s.mss, s.wscale, s.sack_permitted, s.timestamps) == (65495, 10, True, True)
    assert not s.ecn and not s.fastopen
    assert s.options == ("mss", "sackOK", "TS", "wscale")


def test_captured_ipv6_syn() -> None:
    s = parse(SYN_V6)
    assert (s.ip_version, s.ttl) == (6, 64)
    assert (s.mss, s.wscale, s.sack_permitted, s.timestamps) == (65476, 10, True, True)


def test_ece_and_cwr_on_the_syn_ask_for_ecn() -> None:
    raw = bytearray(SYN_V4)
    raw[20 + 13] |= 0xC0  # the TCP flags byte: CWR | ECE | SYN
    assert parse(bytes(raw)).ecn
    raw[20 + 13] = 0x42  # ECE alone is not an ECN-setup SYN
    assert not parse(bytes(raw)).ecn


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (SYN_V4[:30], "truncated TCP"),
        (SYN_V6[:30], "truncated IPv6"),
        (b"\x55" + SYN_V4[1:], "IP version 5"),
        (SYN_V4[:9] + b"\x11" + SYN_V4[10:], "protocol 17"),
        (SYN_V4[:33] + b"\x10" + SYN_V4[34:], "not a SYN"),  # a bare ACK
        (SYN_V4[:40] + b"\x02\x09" + SYN_V4[42:], "malformed TCP option 2"),  # runs past the end
        (SYN_V4[:40] + b"\x02\x00" + SYN_V4[42:], "malformed TCP option 2"),  # zero length
    ],
)
def test_anything_else_is_a_short_error(raw: bytes, message: str) -> None:
    with pytest.raises(SynError, match=message):
        parse(raw)


def test_a_listener_saving_syns_hands_each_out_once() -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    save_syn([ls])
    c = socket.create_connection(ls.getsockname(), timeout=5)
    a, _ = ls.accept()
    try:
        syn, error = read_syn(a)
        assert error is None and syn is not None
        assert syn.mss is not None and syn.mss > 0 and syn.ip_version == 4
        again, why = read_syn(a)
        assert again is None and why is not None and "no saved SYN" in why
    finally:
        for s in (c, a, ls):
            s.close()
