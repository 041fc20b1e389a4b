"""TLS bytes for the TCP-mode tests: real ClientHellos from Python's TLS client."""

from __future__ import annotations

import ssl


def client_hello(server_name: str | None) -> bytes:
    """The bytes a real TLS client sends first (its ClientHello records)."""
    ctx = ssl.create_default_context()
    if server_name is None:
        # a hello without SNI (Python needs this for server_hostname=None); no handshake
        # is ever completed here, so nothing goes unverified: these are hostile-input bytes
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def rerecord(hello: bytes, size: int) -> bytes:
    """The same handshake message split into TLS records of at most `size` bytes."""
    assert hello[0] == 0x16
    version = hello[1:3]
    message = b""
    pos = 0
    while pos < len(hello):
        length = int.from_bytes(hello[pos + 3 : pos + 5])
        message += hello[pos + 5 : pos + 5 + length]
        pos += 5 + length
    out = b""
    for i in range(0, len(message), size):
        chunk = message[i : i + size]
        out += b"\x16" + version + len(chunk).to_bytes(2) + chunk
    return out
