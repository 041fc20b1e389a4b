"""Supervisor <-> worker messages: one JSON object per frame, a 4-byte length first.

Pure. A frame over MAX_FRAME bytes is a protocol error (the peer is ours, so it is a bug,
reported as ValueError rather than buffered without bound).
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAX_FRAME = 4 * 1024 * 1024
_LEN = struct.Struct("!I")

Message = dict[str, Any]


def encode(msg: Message) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"message of {len(body)} bytes is over {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


class Decoder:
    """Feed bytes as they arrive; get the complete messages back."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _LEN.size:
            (size,) = _LEN.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes is over {MAX_FRAME}")
            end = _LEN.size + size
            if len(self._buf) < end:
                break
            msg = json.loads(bytes(self._buf[_LEN.size : end]))
            del self._buf[:end]
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise ValueError("a message must be an object with a type")
            out.append(msg)
        return out
