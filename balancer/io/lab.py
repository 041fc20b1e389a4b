"""The network lab's driver: reads TCP_INFO, the saved SYN and the congestion-control
algorithm off the connections' sockets, and counts the balancer's sockets by TCP state
over sock_diag (pyroute2). The decoding is pure (`balancer.lab`).

TCP_INFO is read when someone looks (the API, at most once a second per connection) and
once when a connection closes; never per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from balancer.lab import syn as synp
from balancer.lab import tcpinfo
from balancer.lab.merge import merge_rows
from balancer.lab.states import SockRow, count, parse_netstat
from balancer.lab.table import ConnRecord, ConnTable, Side, TlsFacts

TCP_SAVE_SYN = 27  # linux/tcp.h; the socket module does not name them
TCP_SAVED_SYN = 28
FAMILIES = (socket.AF_INET, socket.AF_INET6)
INFO_LEN = 512  # more than any kernel's struct tcp_info
SYN_LEN = 512  # IPv6 header + the longest TCP header (60)
SAMPLE_EVERY = 1.0  # seconds between two TCP_INFO reads of one connection when looked at
MAX_DIAG_ROWS = 200_000  # sock_diag rows read at most (a bound, not a limit we expect to hit)


def save_syn(sockets: Iterable[Any]) -> None:
    """TCP_SAVE_SYN on listening sockets: each accepted connection keeps its SYN."""
    for s in sockets:
        if s.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, TCP_SAVE_SYN, 1)


def _tcp(sock: Any) -> bool:
    # uvloop's socket of a closed TLS transport says "negative file descriptor" (ValueError)
    try:
        return sock is not None and sock.fileno() >= 0 and sock.family in FAMILIES
    except (OSError, ValueError):
        return False


def read_info(sock: Any) -> tcpinfo.TcpInfo | None:
    if not _tcp(sock):
        return None
    try:
        return tcpinfo.decode(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, INFO_LEN))
    except (OSError, ValueError):  # TcpInfoError is a ValueError
        return None


def read_congestion(sock: Any) -> str | None:
    if not _tcp(sock):
        return None
    try:
        raw: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    except (OSError, ValueError):
        return None
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def read_syn(sock: Any) -> tuple[synp.SynInfo | None, str | None]:
    """The kernel hands the saved SYN out once; (info, None) or (None, why not)."""
    if not _tcp(sock):
        return None, "not a TCP socket"
    try:
        raw: bytes = sock.getsockopt(socket.IPPROTO_TCP, TCP_SAVED_SYN, SYN_LEN)
    except (OSError, ValueError) as exc:
        return None, f"no saved SYN ({getattr(exc, 'strerror', None) or exc})"
    if not raw:
        return None, "no saved SYN (the listener was not saving them)"
    try:
        return synp.parse(raw), None
    except synp.SynError as exc:
        return None, f"unreadable SYN: {exc}"


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if not peer:
        return "unknown"
    host = peer[0]
    return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"


def track(
    table: ConnTable, side: Side, transport: asyncio.BaseTransport, backend: str | None = None
) -> ConnRecord:
    return table.add(side, _peer(transport), transport.get_extra_info("socket"), backend)


def tls_facts(sslobj: Any, handshake_s: float) -> TlsFacts:
    cipher = sslobj.cipher()
    return TlsFacts(
        version=sslobj.version() or "",
        cipher=cipher[0] if cipher else "",
        alpn=sslobj.selected_alpn_protocol(),
        sni=getattr(sslobj, "lb_server_name", None),  # set by CertStore's SNI callback
        resumed=bool(sslobj.session_reused),
        handshake_s=handshake_s,
    )


def closing(table: ConnTable, rec: ConnRecord | None, exc: Exception | None) -> None:
    """connection_lost: the last TCP_INFO reading (the socket is still open), then out."""
    if rec is None:
        return
    if rec.fin is None:
        # we close only through TransportOps (which marks "balancer"): a connection lost
        # without it was ended by the peer, with a FIN (a TLS close_notify and FIN reaches
        # us as a plain loss, without eof_received) or with a reset
        rec.fin = "reset" if exc is not None else "peer"
    info = read_info(rec.sock)
    if info is not None:
        table.sample(rec, info, table.clock())
    table.remove(rec)


class Remote(Protocol):
    """The worker processes that hold the connections (balancer.workers.supervisor)."""

    def pids(self) -> list[int]: ...

    async def ask_lab(self, msg: dict[str, Any]) -> list[dict[str, Any]]: ...


class Lab:
    """What the admin API shows of the connections and sockets. With worker processes
    (`remote`), the connections are theirs: the `*_async` views ask them."""

    def __init__(
        self,
        table: ConnTable,
        listen_ports: Callable[[], set[int]],
        backend_addrs: Callable[[], set[tuple[str, int]]],
    ) -> None:
        self.table = table
        self.listen_ports = listen_ports
        self.backend_addrs = backend_addrs
        self.remote: Remote | None = None
        self.pid = os.getpid()  # each record says which process holds it

    def _refresh(self, rec: ConnRecord, now: float) -> None:
        if rec.sock is None or now - rec.info_at < SAMPLE_EVERY:
            return
        if rec.congestion is None:
            rec.congestion = read_congestion(rec.sock)
        if rec.side == "client" and rec.syn is None and rec.syn_error is None:
            rec.syn, rec.syn_error = read_syn(rec.sock)
        info = read_info(rec.sock)
        if info is not None:
            self.table.sample(rec, info, now)

    def connections(self, closed: bool = False) -> dict[str, Any]:
        table = self.table
        now = table.clock()
        wall = time.time()
        rows = []
        for rec in table:
            self._refresh(rec, now)
            rows.append(rec.view(now, wall) | {"pid": self.pid})
        out: dict[str, Any] = {
            "now": wall,
            "connections": rows,
            "backends": table.backend_summary(),
            "tls": table.tls_summary(),
        }
        if closed:
            out["closed"] = [
                rec.view(now, wall) | {"pid": self.pid} for rec in reversed(table.closed)
            ]
        return out

    def connection(self, cid: int) -> dict[str, Any] | None:
        rec = self.table.get(cid)
        if rec is None:
            return None
        now = self.table.clock()
        self._refresh(rec, now)
        return rec.view(now, time.time(), history=True) | {"pid": self.pid}

    async def connections_async(self, closed: bool = False) -> dict[str, Any]:
        if self.remote is None:
            return self.connections(closed)
        replies = await self.remote.ask_lab({"type": "lab", "closed": closed})
        out: dict[str, Any] = {  # the replies' aggregates are in the table by now
            "now": time.time(),
            "connections": merge_rows(replies, "connections"),
            "backends": self.table.backend_summary(),
            "tls": self.table.tls_summary(),
        }
        if closed:
            out["closed"] = merge_rows(replies, "closed")
        left_off = sum(r.get("left_off", 0) for r in replies)
        if left_off:  # a worker with very many connections sends only the first ones
            out["left_off"] = left_off
        return out

    async def connection_async(self, cid: int) -> dict[str, Any] | None:
        if self.remote is None:
            return self.connection(cid)
        replies = await self.remote.ask_lab({"type": "lab", "id": cid})
        found: dict[str, Any] | None = next((r["conn"] for r in replies if r.get("conn")), None)
        return found

    async def tcp(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._tcp_now)

    def _tcp_now(self) -> dict[str, Any]:
        ports = self.listen_ports()
        addrs = set(self.backend_addrs())
        for rec in list(self.table.open.values()) + list(self.table.closed):
            if rec.side == "backend":
                host, _, port = rec.peer.rpartition(":")
                addrs.add((host.strip("[]"), int(port)))
        pids: list[int | str] = ["self"]
        if self.remote is not None:
            pids += self.remote.pids()
        counts = count(diag_rows(), our_inodes(pids), ports, addrs)
        try:
            with open("/proc/net/netstat") as f:
                netstat = parse_netstat(f.read())
        except OSError:
            netstat = {}
        counts["listen_overflows"] = netstat.get("TcpExt.ListenOverflows")
        counts["listen_drops"] = netstat.get("TcpExt.ListenDrops")
        counts["overflows_scope"] = "network namespace"
        return counts


def our_inodes(pids: Iterable[int | str] = ("self",)) -> set[int]:
    """The inodes of the sockets of these processes (this one and its workers): their
    descriptors that are sockets. A process that is gone adds nothing."""
    out: set[int] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(os.path.join(fd_dir, name))
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(int(target[8:-1]))
    return out


def diag_rows() -> list[SockRow]:
    """Every TCP socket of this network namespace, over NETLINK_SOCK_DIAG (pyroute2).

    Runs in a worker thread. pyroute2 drives netlink with an asyncio loop of its own; a
    new loop under uvloop's policy is uvloop's, which cannot open AF_NETLINK endpoints, so
    it gets a plain selector loop, made and closed here."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink import NETLINK_SOCK_DIAG
    from pyroute2.netlink.diag import MarshalDiag
    from pyroute2.netlink.nlsocket import NetlinkSocket

    class Diag(DiagSocket):  # type: ignore[misc]
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            NetlinkSocket.__init__(self, NETLINK_SOCK_DIAG, use_event_loop=loop)
            self.set_marshal(MarshalDiag())

    loop = asyncio.SelectorEventLoop()
    try:
        return _dump(Diag(loop))
    finally:
        loop.close()


def _dump(diag: Any) -> list[SockRow]:
    rows: list[SockRow] = []
    with diag as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ds.get_sock_stats(family=family, states=0xFFFF):
                rows.append(
                    SockRow(
                        state=msg["idiag_state"],
                        src=msg["idiag_src"],
                        sport=msg["idiag_sport"],
                        dst=msg["idiag_dst"],
                        dport=msg["idiag_dport"],
                        rqueue=msg["idiag_rqueue"],
                        wqueue=msg["idiag_wqueue"],
                        inode=msg["idiag_inode"],
                    )
                )
                if len(rows) >= MAX_DIAG_ROWS:
                    return rows
    return rows
