"""The server name (SNI) of a TLS ClientHello, read without terminating TLS.

Pure: it is fed the bytes a client sent so far and answers whether it needs more, found
the hello (with or without a server name), or saw something that is not a ClientHello.
The hello may be split over TCP segments and over TLS records (RFC 8446 5.1 allows a
handshake message across records); the reader bounds how much it looks at (`MAX_HELLO`)
and never raises on hostile bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

# record layer
CONTENT_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0x0000
NAME_TYPE_HOST = 0x00
MAX_RECORD = 16384 + 2048  # TLSPlaintext is at most 2^14; leave room for odd clients
# a ClientHello larger than this is refused (post-quantum key shares are about 1.2 KB)
MAX_HELLO = 32 * 1024
# what a reader buffers at most: the hello plus a record header per fragment
MAX_BUFFER = MAX_HELLO + 64 * 5

# a fatal unrecognized_name alert (RFC 6066 3), as a TLS 1.0-versioned record so every
# client version parses it: level 2 (fatal), description 112
UNRECOGNIZED_NAME_ALERT = bytes((0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x70))


@dataclass(frozen=True)
class Hello:
    """The outcome of reading a ClientHello.

    `status`: "more" (feed more bytes), "hello" (complete; `sni` is the lower-case name or
    None when the client sent none), "not-tls" (the first bytes are not a TLS handshake
    record: plain TCP), "invalid" (a malformed or oversized hello: close the connection).
    """

    status: str
    sni: str | None = None
    reason: str = ""


MORE = Hello("more")
NOT_TLS = Hello("not-tls")


def _invalid(reason: str) -> Hello:
    return Hello("invalid", reason=reason)


def read_client_hello(data: bytes) -> Hello:
    """Read the ClientHello at the start of `data` (everything the client sent so far)."""
    if not data:
        return MORE
    if data[0] != CONTENT_HANDSHAKE:
        return NOT_TLS
    if len(data) >= 2 and data[1] != 0x03:
        return NOT_TLS  # SSLv2 or another protocol starting with 0x16
    handshake = bytearray()
    pos = 0
    need: int | None = None  # the handshake message's full length, once known
    while need is None or len(handshake) < need:
        if len(data) - pos < 5:
            return MORE if len(data) <= MAX_BUFFER else _invalid("too many records")
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5])
        if ctype != CONTENT_HANDSHAKE or major != 0x03:
            return _invalid("a non-handshake record inside the ClientHello")
        if length == 0 or length > MAX_RECORD:
            return _invalid(f"record length {length}")
        body = data[pos + 5 : pos + 5 + length]
        if len(body) < length:
            return MORE if len(data) <= MAX_BUFFER else _invalid("hello too large")
        handshake += body
        pos += 5 + length
        if need is None and len(handshake) >= 4:
            if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                return _invalid("the first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(handshake[1:4])
            if need > MAX_HELLO:
                return _invalid(f"ClientHello of {need} bytes")
    return _parse_hello(bytes(handshake[4:need]))


def _parse_hello(msg: bytes) -> Hello:
    """The body of a ClientHello (after its 4-byte handshake header)."""
    r = _Reader(msg)
    r.skip(2 + 32)  # legacy_version, random
    r.skip(r.u8())  # legacy_session_id
    r.skip(r.u16())  # cipher_suites
    r.skip(r.u8())  # legacy_compression_methods
    if r.failed:
        return _invalid("truncated ClientHello")
    if r.left() == 0:
        return Hello("hello")  # no extensions: no server name
    length = r.u16()
    end = r.pos + length
    if r.failed or end > len(msg):
        return _invalid("truncated extensions")
    sni: str | None = None
    seen: set[int] = set()
    while r.pos < end:
        ext, length = r.u16(), r.u16()
        if r.failed or r.pos + length > end:
            return _invalid("truncated extension")
        if ext in seen:
            return _invalid(f"extension {ext} twice")
        seen.add(ext)
        if ext == EXT_SERVER_NAME:
            result = _server_name(msg[r.pos : r.pos + length])
            if isinstance(result, Hello):
                return result
            sni = result
        r.skip(length)
    return Hello("hello", sni)


def _server_name(ext: bytes) -> str | Hello:
    r = _Reader(ext)
    list_end = 2 + r.u16()
    if r.failed or list_end != len(ext):
        return _invalid("malformed server_name list")
    name: str | None = None
    while r.pos < list_end:
        kind = r.u8()
        raw = r.take(r.u16())
        if r.failed:
            return _invalid("truncated server_name")
        if kind != NAME_TYPE_HOST:
            continue
        if name is not None:
            return _invalid("two host names in server_name")
        if not raw or len(raw) > 253 or not all(_HOST_BYTE[b] for b in raw):
            return _invalid("server_name is not a host name")
        name = raw.decode("ascii").lower().rstrip(".")
    if name is None:
        return _invalid("server_name without a host name")
    return name


_HOST_BYTE = [chr(b).isascii() and (chr(b).isalnum() or chr(b) in "-._") for b in range(256)]


class _Reader:
    """Big-endian reads that set `failed` instead of raising when the bytes run out."""

    __slots__ = ("data", "failed", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.failed = False

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            self.failed = True
            self.pos = len(self.data)
            return b""
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        self.take(n)

    def u8(self) -> int:
        b = self.take(1)
        return b[0] if b else 0

    def u16(self) -> int:
        b = self.take(2)
        return int.from_bytes(b) if len(b) == 2 else 0


def sni_matches(pattern: str, name: str) -> bool:
    """`pattern` is an exact host name or `*.suffix` (which needs at least one label more)."""
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return name.endswith(suffix) and len(name) > len(suffix)
    return pattern == name
