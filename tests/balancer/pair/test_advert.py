"""The advert codec with no sockets: round trips, HMAC, replay guard, garbage, fuzzing."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.pair.advert import (
    MAC_LEN,
    AdvertCodec,
    AdvertError,
    Envelope,
    authenticate,
    decode,
    encode,
)
from balancer.pair.election import Advert

SECRET = b"correct horse battery staple"
WALL = 1_700_000_000.0
ADV = Advert(node="10.0.0.1", priority=150, interval=0.2, role="active", healthy_backends=3)


class FakeWall:
    def __init__(self, t: float = WALL) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def drops(codec: AdvertCodec) -> dict[str, int]:
    return {k: v for k, v in codec.counters.items() if k not in ("sent", "received", "accepted")}


def resign_mac(body: bytes) -> bytes:
    return body + hmac.digest(SECRET, body, hashlib.sha256)


def test_encode_decode_round_trip() -> None:
    env = Envelope(ADV, seq=7, boot_id=2**64 - 1, timestamp_ms=int(WALL * 1000))
    data = encode(env, SECRET)
    assert len(data) == 71 + len("10.0.0.1")
    assert decode(data, SECRET) == env


@pytest.mark.parametrize(
    "advert",
    [
        Advert("127.0.0.1:40000", 0, 0.05, "passive", 0),
        Advert("[::1]:5405", 254, 65.535, "active", 2**32 - 1),
        Advert("bälancer-ü", 1, 0.001, "passive", 12),
    ],
)
def test_codec_round_trip_between_two_nodes(advert: Advert) -> None:
    sender = AdvertCodec(SECRET, wall_clock=FakeWall())
    receiver = AdvertCodec(SECRET, wall_clock=FakeWall())
    assert receiver.unpack(sender.pack(advert)) == advert
    assert receiver.counters["accepted"] == 1 and sender.counters["sent"] == 1


def test_wrong_secret_is_dropped_and_counted() -> None:
    sender = AdvertCodec(b"another secret", wall_clock=FakeWall())
    receiver = AdvertCodec(SECRET, wall_clock=FakeWall())
    assert receiver.unpack(sender.pack(ADV)) is None
    assert receiver.counters["bad_mac"] == 1 and receiver.counters["accepted"] == 0


def test_every_flipped_bit_is_dropped() -> None:
    sender = AdvertCodec(SECRET, boot_id=1, wall_clock=FakeWall())
    packet = sender.pack(ADV)
    receiver = AdvertCodec(SECRET, wall_clock=FakeWall())
    for i in range(len(packet) * 8):
        forged = bytearray(packet)
        forged[i // 8] ^= 1 << (i % 8)
        assert receiver.unpack(bytes(forged)) is None
    assert receiver.counters["accepted"] == 0
    # Magic (32 bits), version (8) and node length (8) fail before the MAC is even checked.
    assert receiver.counters["bad_magic"] == 32 and receiver.counters["bad_version"] == 8
    assert receiver.counters["truncated"] == 8
    assert receiver.counters["bad_mac"] == len(packet) * 8 - 48
    assert sum(drops(receiver).values()) == len(packet) * 8
    assert receiver.unpack(packet) == ADV  # the genuine one still gets through


def test_replay_of_same_and_lower_seq_is_dropped() -> None:
    sender = AdvertCodec(SECRET, boot_id=1, wall_clock=FakeWall())
    receiver = AdvertCodec(SECRET, wall_clock=FakeWall())
    p1, p2, p3 = sender.pack(ADV), sender.pack(ADV), sender.pack(ADV)
    assert receiver.unpack(p2) == ADV
    assert receiver.unpack(p2) is None  # same seq
    assert receiver.unpack(p1) is None  # lower seq
    assert receiver.unpack(p3) == ADV
    assert receiver.counters["replay"] == 2 and receiver.counters["accepted"] == 2


def test_new_boot_id_is_accepted_and_the_old_one_retired() -> None:
    wall = FakeWall()
    old = AdvertCodec(SECRET, boot_id=111, wall_clock=wall)
    receiver = AdvertCodec(SECRET, wall_clock=wall)
    for _ in range(5):
        assert receiver.unpack(old.pack(ADV)) == ADV
    late_old = old.pack(ADV)
    wall.t += 10
    restarted = AdvertCodec(SECRET, boot_id=222, wall_clock=wall)  # seq starts again at 1
    assert receiver.unpack(restarted.pack(ADV)) == ADV
    assert receiver.unpack(late_old) is None  # a replay from the previous life
    assert receiver.counters["replay"] == 1
    assert receiver.unpack(restarted.pack(ADV)) == ADV


@pytest.mark.parametrize(("skew", "accepted"), [(29.0, True), (-29.0, True), (31.0, False)])
def test_new_boot_id_needs_a_timestamp_within_the_window(skew: float, accepted: bool) -> None:
    sender = AdvertCodec(SECRET, boot_id=5, wall_clock=FakeWall(WALL + skew))
    receiver = AdvertCodec(SECRET, wall_clock=FakeWall())
    assert (receiver.unpack(sender.pack(ADV)) == ADV) is accepted
    assert receiver.counters["stale"] == (0 if accepted else 1)


def test_truncated_packets_are_dropped() -> None:
    packet = AdvertCodec(SECRET, wall_clock=FakeWall()).pack(ADV)
    receiver = AdvertCodec(SECRET, wall_clock=FakeWall())
    for n in range(len(packet)):
        assert receiver.unpack(packet[:n]) is None
    assert receiver.unpack(packet + b"x") is None
    assert receiver.counters["truncated"] == len(packet) + 1
    assert receiver.counters["accepted"] == 0


def test_wrong_version_and_bad_fields_are_dropped_even_with_a_valid_mac() -> None:
    packet = AdvertCodec(SECRET, wall_clock=FakeWall()).pack(ADV)
    body = bytearray(packet[:-MAC_LEN])
    v2 = bytearray(body)
    v2[4] = 2
    bad_role = bytearray(body)
    bad_role[5] = 9
    bad_prio = bytearray(body)
    bad_prio[6] = 255
    receiver = AdvertCodec(SECRET, wall_clock=FakeWall())
    for forged in (v2, bad_role, bad_prio):
        assert receiver.unpack(resign_mac(bytes(forged))) is None
    bad_utf8 = bytes(body[:-1]) + b"\xff"
    assert receiver.unpack(resign_mac(bad_utf8)) is None
    assert receiver.counters["bad_version"] == 1
    assert receiver.counters["malformed"] == 3


def test_garbage_is_dropped_and_counted() -> None:
    receiver = AdvertCodec(SECRET, wall_clock=FakeWall())
    samples = [b"", b"\x00", b"LBEL", b"GET / HTTP/1.1\r\n\r\n" * 10, bytes(200), b"\xff" * 67]
    for data in samples:
        assert receiver.unpack(data) is None
    assert receiver.counters["received"] == len(samples)
    assert receiver.counters["accepted"] == 0
    assert receiver.counters["truncated"] + receiver.counters["bad_magic"] == len(samples)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=400) | st.binary(min_size=4, max_size=300).map(lambda b: b"LBEL\x01" + b))
def test_fuzzed_packets_never_raise(data: bytes) -> None:
    receiver = AdvertCodec(SECRET, wall_clock=FakeWall())
    assert receiver.unpack(data) is None
    assert sum(drops(receiver).values()) == 1


def test_codec_refuses_empty_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        AdvertCodec(b"")


def test_seq_and_boot_id_are_in_the_packet() -> None:
    codec = AdvertCodec(SECRET, boot_id=0xABCDEF, wall_clock=FakeWall())
    codec.pack(ADV)
    env = decode(codec.pack(ADV), SECRET)
    assert (env.seq, env.boot_id, env.timestamp_ms) == (2, 0xABCDEF, int(WALL * 1000))
    header = struct.unpack_from("!4sB", encode(env, SECRET))
    assert header == (b"LBEL", 1)


def test_authenticate_strips_a_good_mac_and_refuses_a_bad_one() -> None:
    data = encode(Envelope(ADV, seq=1, boot_id=1, timestamp_ms=0), SECRET)
    assert authenticate(data, SECRET) == data[:-MAC_LEN]
    with pytest.raises(AdvertError) as bad:
        authenticate(data, b"another secret")
    assert bad.value.reason == "bad_mac"
