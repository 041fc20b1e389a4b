"""HPACK for the front: a stateless encoder for response heads (no dynamic table, so no
per-header search, no Huffman, and each field's encoding can be cached), and a decoder
with a fast path for request heads made only of one-byte indexed fields.

Every field is a "literal header field without indexing" (RFC 7541 6.2.2), naming a static
table entry when there is one; `:status` values of the static table are fully indexed. With
no dynamic table the encoding of a field never depends on what came before it, so the bytes
of each (name, value) are computed once and reused (a bounded cache: dates and lengths vary).
Heads come out larger than with indexing (no Huffman, nothing remembered between
responses); on the bench hpack's encoder cost about a fifth of the balancer's CPU per
HTTP/2 request.

A client that repeats its request fields (h2load, browsers for everything but the path)
sends most heads as indexed fields only (6.1): one byte each, which change no state. Those
are looked up directly; anything else (literals, table size updates, long indexes) goes to
hpack's decoder. The header list size limit (the HPACK-bomb defence) applies to both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hpack import Decoder, OversizedHeaderListError
from hpack.table import HeaderTable

CACHE_MAX = 4096

_STATIC_NAME: dict[bytes, int] = {}
_STATIC_FULL: dict[tuple[bytes, bytes], int] = {}
for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_NAME.setdefault(_n, _i)
    if _n == b":status":
        _STATIC_FULL[(_n, _v)] = _i


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1, with the high bits of the first byte already set in `first`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(name: bytes, value: bytes) -> bytes:
    full = _STATIC_FULL.get((name, value))
    if full is not None:
        return bytes((0x80 | full,))  # indexed (6.1)
    index = _STATIC_NAME.get(name)
    if index is not None:
        head = _integer(index, 4, 0x00)  # literal without indexing, indexed name (6.2.2)
    else:
        head = b"\x00" + _integer(len(name), 7, 0x00) + name  # ... new name
    return head + _integer(len(value), 7, 0x00) + value


class StatelessEncoder:
    """What h2 needs of an encoder: `encode(headers)` and a `header_table_size` to set."""

    def __init__(self) -> None:
        self.header_table_size = 4096  # the peer's limit; we never insert, so never exceed it
        self.cache: dict[tuple[bytes, bytes], bytes] = {}

    def encode(self, headers: list[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        cache = self.cache
        parts = []
        for field in headers:
            data = cache.get(field)
            if data is None:
                data = encode_field(field[0], field[1])
                if len(cache) >= CACHE_MAX:
                    cache.clear()
                cache[field] = data
            parts.append(data)
        return b"".join(parts)


class FastDecoder(Decoder):
    """hpack's `Decoder`, with the all-indexed request head decoded in one pass."""

    def decode(self, data: bytes, raw: bool = False) -> Iterable[Any]:
        if not raw or not data:
            return super().decode(data, raw)
        for b in data:
            if b <= 0x80 or b == 0xFF:  # not a one-byte indexed field
                return super().decode(data, raw)
        get = self.header_table.get_by_index  # InvalidTableIndex (an HPACKError) if bad
        headers = [get(b & 0x7F) for b in data]
        size = sum([len(n) + len(v) for n, v in headers]) + 32 * len(headers)
        if size > self.max_header_list_size:
            msg = f"A header list larger than {self.max_header_list_size} has been received"
            raise OversizedHeaderListError(msg)
        return headers
