"""TCP_INFO decoding: on real loopback sockets, and on byte layouts of known values."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from lab_layout import layout

from balancer.io.lab import read_congestion, read_info
from balancer.lab import tcpinfo


def _pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    c = socket.create_connection(ls.getsockname(), timeout=5)
    a, _ = ls.accept()
    a.settimeout(5)
    return ls, c, a


def test_a_real_loopback_connection_decodes_to_what_was_sent() -> None:
    ls, c, a = _pair()
    try:
        c.sendall(b"x" * 10_000)
        got = 0
        while got < 10_000:  # bounded: recv blocks at most the 5 s timeout each
            chunk = a.recv(65536)
            assert chunk
            got += len(chunk)
        a.sendall(b"y" * 300)
        assert len(c.recv(300)) > 0
        info = read_info(c)
        assert info is not None
        assert info.state == "ESTABLISHED"
        assert info.ca_state == "open"
        assert info.bytes_acked == 10_001  # the SYN counts one
        assert info.bytes_received == 300  # one segment: all of it once recv returned
        assert info.bytes_sent == 10_000
        assert info.cwnd >= 1 and info.snd_mss > 0
        assert info.rtt_ms > 0
        assert info.total_retrans == 0 and info.lost == 0
        assert info.timestamps and info.sack and info.wscale  # Linux offers all three
        mine = read_info(a)
        assert mine is not None and mine.bytes_received == 10_000
        default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
        assert read_congestion(c) == default
    finally:
        for s in (c, a, ls):
            s.close()


def test_a_listener_and_a_closed_half_have_their_states() -> None:
    ls, c, a = _pair()
    try:
        info = read_info(ls)
        assert info is not None and info.state == "LISTEN"
        c.shutdown(socket.SHUT_WR)  # we send the first FIN
        assert a.recv(1) == b""
        mine = read_info(c)
        assert mine is not None and mine.state in ("FIN_WAIT1", "FIN_WAIT2")
        theirs = read_info(a)
        assert theirs is not None and theirs.state == "CLOSE_WAIT"
    finally:
        for s in (c, a, ls):
            s.close()


FIELDS = dict(
    rtt=52_345,
    rttvar=1_500,
    snd_cwnd=3,
    snd_ssthresh=7,
    total_retrans=12,
    lost=2,
    unacked=5,
    delivery_rate=125_000,
    snd_wnd=65_535 * 128,
    rcv_wnd=3_000_000,
    bytes_sent=1_000_000,
    rto=204_000,
    last_data_sent=1500,
    last_data_recv=250,
)


def test_a_known_layout_decodes_field_by_field() -> None:
    info = tcpinfo.decode(layout(280, **FIELDS))
    assert info.state == "ESTABLISHED" and info.ca_state == "loss"
    assert info.rtt_ms == 52.345 and info.rttvar_ms == 1.5 and info.rto_ms == 204.0
    got = (info.cwnd, info.ssthresh, info.total_retrans, info.lost, info.unacked)
    assert got == (3, 7, 12, 2, 5)
    assert info.delivery_rate_bps == 1_000_000
    assert info.snd_wnd == 65_535 * 128 and info.rcv_wnd == 3_000_000
    assert info.bytes_sent == 1_000_000
    assert info.idle_ms == 250  # since data last went either way
    assert (info.snd_wscale, info.rcv_wscale) == (7, 9)
    assert info.timestamps and info.sack and info.wscale and not info.ecn


def test_an_older_kernels_shorter_struct_leaves_the_new_fields_none() -> None:
    info = tcpinfo.decode(layout(192, **FIELDS))  # Linux 4.19: up to sndbuf_limited
    assert info.cwnd == 3 and info.delivery_rate_bps == 1_000_000
    assert info.snd_wnd is None and info.rcv_wnd is None and info.bytes_sent is None


def test_infinite_ssthresh_is_none_and_short_input_is_an_error() -> None:
    info = tcpinfo.decode(layout(280, snd_ssthresh=tcpinfo.INFINITE_SSTHRESH))
    assert info.ssthresh is None
    with pytest.raises(tcpinfo.TcpInfoError, match="50 bytes"):
        tcpinfo.decode(b"\0" * 50)
