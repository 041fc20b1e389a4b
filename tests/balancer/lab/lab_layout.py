"""A tcp_info byte layout of known values, for the decoder tests."""

from __future__ import annotations

import struct

from balancer.lab import tcpinfo


def layout(size: int, **values: int) -> bytes:
    """A tcp_info of `size` bytes with fields at the kernel's offsets (include/uapi/linux/tcp.h)."""
    buf = bytearray(size)
    buf[0] = 1  # ESTABLISHED
    buf[1] = 4  # TCP_CA_Loss
    buf[5] = 1 | 2 | 4  # timestamps, sack, wscale
    buf[6] = (9 << 4) | 7  # rcv_wscale 9, snd_wscale 7
    offsets = {name: (code, off) for name, code, off in tcpinfo._FIELDS}
    for name, value in values.items():
        code, off = offsets[name]
        if off + struct.calcsize(code) <= size:
            struct.pack_into("<" + code, buf, off, value)
    return bytes(buf)
