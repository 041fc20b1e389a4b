"""The stateless response-head encoder decodes, with hpack's decoder, to what was encoded."""

from __future__ import annotations

from hpack import Decoder

from balancer.http2.hpack import StatelessEncoder, encode_field


def test_heads_round_trip_through_hpacks_decoder() -> None:
    enc, dec = StatelessEncoder(), Decoder()
    heads = [
        [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-backend", b"b1")],
        [(b":status", b"418"), (b"content-length", b"0"), (b"x-long", b"v" * 300)],
        [(b":status", b"304"), (b"strict-transport-security", b"max-age=1"), (b"n" * 200, b"")],
        [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-backend", b"b1")],
    ]
    for head in heads:
        assert dec.decode(enc.encode(head), raw=True) == head
    assert len(dec.header_table.dynamic_entries) == 0  # nothing was ever indexed


def test_static_entries_are_used() -> None:
    assert encode_field(b":status", b"200") == b"\x88"  # fully indexed
    assert encode_field(b"content-length", b"5") == b"\x0f\x0d\x015"  # name index 28


def test_the_fast_decoder_agrees_with_hpack_and_keeps_the_size_limit() -> None:
    import pytest
    from hpack import Encoder, OversizedHeaderListError

    from balancer.http2.hpack import FastDecoder

    enc, fast, slow = Encoder(), FastDecoder(), Decoder()
    head = [(b":method", b"GET"), (b":path", b"/"), (b"user-agent", b"x" * 100)]
    for _ in range(3):  # first a literal (hpack's path), then all indexed (the fast path)
        block = enc.encode(head)
        assert fast.decode(block, raw=True) == slow.decode(block, raw=True) == head
    assert all(b > 0x80 for b in block)  # the last one took the fast path
    fast.max_header_list_size = 1000
    bomb = enc.encode([(b"user-agent", b"x" * 100)] * 10)  # ten one-byte references
    with pytest.raises(OversizedHeaderListError):
        fast.decode(bomb, raw=True)
