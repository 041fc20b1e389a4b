"""Counts of the balancer's sockets by TCP state, from sock_diag rows. Pure: rows in.

A socket is the balancer's when its inode is one of the process's file descriptors. Sockets
without a descriptor (SYN_RECV request sockets, TIME_WAIT) are matched by address: a local
port that is one of our listeners' is listener side, a remote address that is a backend's
is backend side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from balancer.lab.tcpinfo import TCP_STATES

SHOWN = {"NEW_SYN_RECV": "SYN_RECV"}  # a request socket is what `ss` calls SYN-RECV


@dataclass(frozen=True, slots=True)
class SockRow:
    state: int
    src: str
    sport: int
    dst: str
    dport: int
    rqueue: int  # a listener: the accept queue's length now
    wqueue: int  # a listener: its backlog
    inode: int


def state_name(code: int) -> str:
    name = TCP_STATES[code] if 0 < code < len(TCP_STATES) else str(code)
    return SHOWN.get(name, name)


def _norm(addr: str) -> str:
    return addr[7:] if addr.startswith("::ffff:") else addr


def count(
    rows: Iterable[SockRow],
    inodes: set[int],
    listen_ports: set[int],
    backend_addrs: set[tuple[str, int]],
) -> dict[str, Any]:
    listener: dict[str, int] = {}
    backend: dict[str, int] = {}
    queues: list[dict[str, Any]] = []
    for r in rows:
        ours = r.inode in inodes if r.inode else None  # None: no descriptor, go by address
        if ours is False:
            continue
        name = state_name(r.state)
        if name == "LISTEN":
            if r.sport in listen_ports:
                listener[name] = listener.get(name, 0) + 1
                queues.append(
                    {"address": f"{_norm(r.src)}:{r.sport}", "queue": r.rqueue, "backlog": r.wqueue}
                )
            continue
        if r.sport in listen_ports:
            listener[name] = listener.get(name, 0) + 1
        elif (_norm(r.dst), r.dport) in backend_addrs:
            backend[name] = backend.get(name, 0) + 1
    return {"listener": listener, "backend": backend, "listen_queues": queues}


def parse_netstat(text: str) -> dict[str, int]:
    """/proc/net/netstat: pairs of `Prefix: names` and `Prefix: values` lines ->
    {"TcpExt.ListenOverflows": n, ...}. Malformed pairs are skipped."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        prefix, _, keys = names.partition(":")
        vprefix, _, nums = values.partition(":")
        if prefix != vprefix:
            continue
        for k, v in zip(keys.split(), nums.split(), strict=False):
            try:
                out[f"{prefix}.{k}"] = int(v)
            except ValueError:
                continue
    return out
