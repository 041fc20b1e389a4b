"""loadtest/nfq_codec.py against hand-built nfnetlink_queue bytes (no sockets), and the
holder's delay line on an injected clock."""

from __future__ import annotations

import random
import struct

import pytest

from loadtest import nfq_codec as nfq


def nlhdr(length: int, kind: int, flags: int, seq: int) -> bytes:
    return struct.pack("=IHHII", length, kind, flags, seq, 0)


def test_bind_command_bytes() -> None:
    got = nfq.config_cmd(7, nfq.NFQNL_CFG_CMD_BIND, seq=1)
    want = (
        nlhdr(28, 0x0302, 0x1 | 0x4, 1)  # NFNL_SUBSYS_QUEUE<<8 | CONFIG, REQUEST|ACK
        + bytes([0, 0, 0, 7])  # AF_UNSPEC, NFNETLINK_V0, queue 7 big-endian
        + struct.pack("=HH", 8, 1)  # NFQA_CFG_CMD
        + bytes([1, 0, 0, 2])  # BIND, pad, pf AF_INET big-endian
    )
    assert got == want


def test_params_ask_for_metadata_only_and_bound_the_queue() -> None:
    got = nfq.config_params(0, maxlen=500, seq=2)
    want = (
        nlhdr(16 + 4 + 12 + 8, 0x0302, 0x5, 2)
        + bytes(4)
        + struct.pack("=HH", 9, 2)  # NFQA_CFG_PARAMS: copy_range u32, copy_mode u8
        + bytes([0, 0, 0, 0, 1])  # copy_range 0, NFQNL_COPY_META
        + bytes(3)  # padding to 4
        + struct.pack("=HH", 8, 3)  # NFQA_CFG_QUEUE_MAXLEN
        + (500).to_bytes(4, "big")
    )
    assert got == want


def test_verdict_bytes() -> None:
    got = nfq.verdict(3, 0x01020304, accept=True)
    want = (
        nlhdr(32, 0x0301, 0x1, 0)
        + bytes([0, 0, 0, 3])
        + struct.pack("=HH", 12, 2)  # NFQA_VERDICT_HDR
        + bytes([0, 0, 0, 1, 1, 2, 3, 4])  # NF_ACCEPT, id big-endian
    )
    assert got == want
    assert nfq.verdict(3, 9, accept=False)[24:28] == bytes(4)  # NF_DROP


def packet_msg(packet_id: int, seq: int, queue: int = 0) -> bytes:
    hdr_attr = struct.pack("=HH", 11, 1) + packet_id.to_bytes(4, "big") + b"\x08\x00\x01" + b"\0"
    mark_attr = struct.pack("=HH", 8, 3) + (42).to_bytes(4, "big")  # NFQA_MARK, ignored
    body = bytes([2, 0]) + queue.to_bytes(2, "big") + hdr_attr + mark_attr
    return nlhdr(16 + len(body), 0x0300, 0, seq) + body


def test_parse_two_queued_packets_in_one_datagram() -> None:
    msgs = nfq.parse(packet_msg(0xABCDEF01, 5, queue=4) + packet_msg(2, 6))
    assert [(m.kind, m.packet_id, m.queue, m.seq) for m in msgs] == [
        ("packet", 0xABCDEF01, 4, 5),
        ("packet", 2, 0, 6),
    ]


def test_parse_ack_and_error() -> None:
    orig = nlhdr(28, 0x0302, 5, 9)
    ack = nlhdr(16 + 4 + 16, 2, 0, 9) + struct.pack("=i", 0) + orig
    err = nlhdr(16 + 4 + 16, 2, 0, 10) + struct.pack("=i", -1) + orig  # -EPERM
    msgs = nfq.parse(ack + err)
    assert [(m.kind, m.errno, m.seq) for m in msgs] == [("error", 0, 9), ("error", 1, 10)]
    assert nfq.parse(nlhdr(16, 3, 0, 1))[0].kind == "done"


@pytest.mark.parametrize(
    "raw",
    [
        nlhdr(400, 0x0300, 0, 1) + bytes(8),  # longer than the datagram
        nlhdr(8, 0x0300, 0, 1),  # shorter than its own header
        nlhdr(20, 0x0300, 0, 1) + bytes(4),  # a packet without NFQA_PACKET_HDR
        nlhdr(28, 0x0300, 0, 1) + bytes(4) + struct.pack("=HH", 40, 1) + bytes(4),
    ],
)
def test_malformed_bytes_raise_codec_error(raw: bytes) -> None:
    with pytest.raises(nfq.CodecError):
        nfq.parse(raw)


def test_delay_line_releases_after_the_delay_in_arrival_order() -> None:
    line = nfq.DelayLine(0.05, 0.02, max_len=1000, rng=random.Random(1))
    for i in range(100):
        assert line.push(i, now=i * 0.001)
    assert line.due(0.0) == []  # nothing before delay - jitter
    released: list[int] = []
    t = 0.0
    for _ in range(400):  # a fake clock in 1 ms steps
        released += line.due(t)
        t += 0.001
    assert released == list(range(100))  # order kept
    assert len(line) == 0 and line.released == 100 and line.next_due() is None


def test_delay_line_without_jitter_is_exact_and_bounded() -> None:
    line = nfq.DelayLine(0.05, max_len=2)
    assert line.push(1, 10.0) and line.push(2, 10.01)
    assert not line.push(3, 10.02)  # beyond max_len: the caller drops it
    assert line.dropped == 1
    assert line.next_due() == pytest.approx(10.05)
    assert line.due(10.0499) == [] and line.due(10.05) == [1] and line.due(10.06) == [2]
