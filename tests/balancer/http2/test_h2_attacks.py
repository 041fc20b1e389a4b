"""The known HTTP/2 attacks against a running balancer (TLS, ALPN h2), each while another
client keeps being served: every attack ends in a GOAWAY with its error code (or a reset
stream), the balancer's memory stays bounded, and the victim's requests all succeed."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from harness import Harness, LocalStack
from harness.h2 import H2Conn
from harness.procs import proc_rss_kib

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROTOCOL_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 0x1, 0x7, 0x8, 0xB
RSS_GROWTH_KIB = 64 * 1024  # what one attack may leave behind in the balancer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    work = tmp_path_factory.mktemp("h2attacks")
    with Harness(work) as h:
        # a short stall deadline so the zero-window test takes about a second
        yield h.stack(tls=True, pki_dir=work / "pki", balancer_args=("--timeout-client-body", "1"))


class Attacker:
    """A raw HTTP/2 connection: hand-made frames out, frames parsed back until GOAWAY."""

    def __init__(self, st: LocalStack, preface: bytes = PREFACE) -> None:
        assert st.ca_file is not None
        ctx = ssl.create_default_context(cafile=st.ca_file)
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection((st.host, st.service_port), timeout=5)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.enc = Encoder()
        self.authority = f"localhost:{st.service_port}".encode()
        self.buf = b""
        self.resets: list[int] = []
        self.send(preface + SettingsFrame(0).serialize())

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False  # the balancer closed on us: the reply says why

    def head(self, sid: int, path: str = "/", method: str = "GET", **kw: object) -> bytes:
        block = self.enc.encode(
            [
                (b":method", method.encode()),
                (b":scheme", b"https"),
                (b":path", path.encode()),
                (b":authority", self.authority),
            ]
        )
        f = HeadersFrame(sid, block, flags=["END_HEADERS", *kw.get("flags", ["END_STREAM"])])  # type: ignore[list-item]
        return f.serialize()

    def goaway(self, timeout: float = 10.0, resets: int | None = None) -> int | None:
        """Read frames until a GOAWAY (its error code) or EOF/timeout (None); with
        `resets`, also stop (None) once that many RST_STREAM frames have come."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while len(self.buf) >= 9:
                f, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
                if len(self.buf) < 9 + length:
                    break
                f.parse_body(memoryview(self.buf[9 : 9 + length]))
                self.buf = self.buf[9 + length :]
                if isinstance(f, GoAwayFrame):
                    return f.error_code
                if isinstance(f, RstStreamFrame):
                    self.resets.append(f.error_code)
            if resets is not None and len(self.resets) >= resets:
                return None
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                return None
            if not data:
                return None
            self.buf += data
        return None

    def close(self) -> None:
        self.sock.close()


class Victim:
    """Another client doing ordinary HTTP/2 requests, new connections, until stopped."""

    def __init__(self, st: LocalStack) -> None:
        self.st = st
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        st = self.st
        for _ in range(2000):  # bounded; stopped long before
            if self.stop.is_set():
                return
            try:
                assert st.ca_file is not None
                with H2Conn(st.host, st.service_port, ca_file=st.ca_file) as c:
                    for r in c.get(["/", "/"]):
                        if r.status == 200 and r.ended:
                            self.ok += 1
                        else:
                            self.failed.append(f"{r.status} reset={r.reset}")
            except (OSError, ConnectionError) as exc:
                self.failed.append(repr(exc))
            time.sleep(0.02)


def under_attack(st: LocalStack, attack: Callable[[], None]) -> None:
    """Run `attack` while a victim is served; bound the balancer's memory growth."""
    pid = st.balancers[0].pid
    before = proc_rss_kib(pid)
    victim = Victim(st)
    victim.thread.start()
    try:
        attack()
        deadline = time.monotonic() + 5
        while victim.ok < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        victim.stop.set()
        victim.thread.join(10)
    assert victim.failed == [] and victim.ok >= 4
    assert proc_rss_kib(pid) - before < RSS_GROWTH_KIB


def test_rapid_reset_is_cut_off_with_enhance_your_calm(stack: LocalStack) -> None:
    def attack() -> None:
        a = Attacker(stack)
        burst = b"".join(
            a.head(sid, "/delay?ms=300") + RstStreamFrame(sid, error_code=CANCEL).serialize()
            for sid in range(1, 2 * 1000, 2)
        )
        a.send(burst)
        assert a.goaway() == ENHANCE_YOUR_CALM
        a.close()

    under_attack(stack, attack)


def test_a_continuation_flood_is_refused(stack: LocalStack) -> None:
    def attack() -> None:
        a = Attacker(stack)
        frames = [HeadersFrame(1, a.enc.encode([(b":method", b"GET")])).serialize()]
        frames += [ContinuationFrame(1, b"\x00" * 1000).serialize() for _ in range(500)]
        a.send(b"".join(frames))
        assert a.goaway() == PROTOCOL_ERROR
        a.close()

    under_attack(stack, attack)


def test_an_hpack_bomb_is_refused_with_enhance_your_calm(stack: LocalStack) -> None:
    def attack() -> None:
        a = Attacker(stack)
        # 4 KB enters the dynamic table once; each repeat is a 1-byte index: ~1 MB decoded
        fields = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", b"/"),
            (b":authority", a.authority),
        ]
        block = a.enc.encode(fields + [(b"x-bomb", b"a" * 4000)] * 250)
        assert len(block) < 16384
        a.send(HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        assert a.goaway() == ENHANCE_YOUR_CALM
        a.close()

    under_attack(stack, attack)


def test_an_oversized_header_list_is_refused(stack: LocalStack) -> None:
    def attack() -> None:
        assert stack.ca_file is not None
        with H2Conn(stack.host, stack.service_port, ca_file=stack.ca_file) as c:
            c.send("/", headers=[(b"x-big", b"b" * 40000)])
            assert c.wait_goaway() == ENHANCE_YOUR_CALM

    under_attack(stack, attack)


@pytest.mark.parametrize("kind", ["settings", "ping", "empty-data"])
def test_control_frame_floods_are_cut_off(stack: LocalStack, kind: str) -> None:
    def attack() -> None:
        a = Attacker(stack)
        if kind == "settings":
            frame = SettingsFrame(0).serialize()
        elif kind == "ping":
            frame = PingFrame(0, opaque_data=b"12345678").serialize()
        else:
            a.send(a.head(1, "/upload", "POST", flags=[]))
            frame = DataFrame(1, b"").serialize()
        for _ in range(10):
            if not a.send(frame * 500):
                break
        assert a.goaway() == ENHANCE_YOUR_CALM
        a.close()

    under_attack(stack, attack)


def test_a_zero_window_stall_is_cancelled(stack: LocalStack) -> None:
    def attack() -> None:
        assert stack.ca_file is not None
        with H2Conn(
            stack.host,
            stack.service_port,
            ca_file=stack.ca_file,
            settings={SettingCodes.INITIAL_WINDOW_SIZE: 0},
        ) as c:  # SETTINGS_INITIAL_WINDOW_SIZE = 0: the client never takes a byte
            sid = c.send("/bytes?n=10000000")
            (r,) = c.wait([sid], timeout=10)
            assert r.status == 200 and r.body == b"" and r.reset == CANCEL

    under_attack(stack, attack)


def test_too_many_concurrent_streams_are_refused(stack: LocalStack) -> None:
    def attack() -> None:
        a = Attacker(stack)
        # 101 requests whose bodies never come: each stream stays open; the 101st alone
        # is refused (REFUSED_STREAM, safe to retry) and the connection carries on
        a.send(b"".join(a.head(s, "/upload", "POST", flags=[]) for s in range(1, 203, 2)))
        assert a.goaway(resets=1) is None and a.resets == [REFUSED_STREAM]
        # a client that keeps going past the limit: 100 more refusals, then GOAWAY
        sid, code = 203, None
        for _ in range(10):
            a.send(
                b"".join(a.head(s, "/upload", "POST", flags=[]) for s in range(sid, sid + 40, 2))
            )
            sid += 40
            code = a.goaway(resets=len(a.resets) + 20)
            if code is not None:
                break
        assert code == ENHANCE_YOUR_CALM and set(a.resets) == {REFUSED_STREAM}
        assert len(a.resets) == 101  # the last refusal came with the GOAWAY
        a.close()

    under_attack(stack, attack)


def test_a_bad_preface_is_refused(stack: LocalStack) -> None:
    def attack() -> None:
        a = Attacker(stack, preface=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert a.goaway() == PROTOCOL_ERROR
        a.close()

    under_attack(stack, attack)


def test_the_logs_stay_free_of_tracebacks(stack: LocalStack) -> None:
    log = Path(stack.workdir) / "logs" / "a.log"
    assert "Traceback" not in log.read_text()
