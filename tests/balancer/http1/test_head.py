"""balancer.http1: the pure head handling, no sockets."""

from __future__ import annotations

import pytest

from balancer.http1.head import (
    BadRequest,
    ForwardOptions,
    Framing,
    backend_request,
    client_response,
    error_response,
    inspect_request,
    new_request_id,
    rewrite_response_head,
    split_head,
)

HOST = (b"Host", b"a.example")


def inspect(
    *headers: tuple[bytes, bytes],
    method: bytes = b"GET",
    target: bytes = b"/",
    version: str = "1.1",
):  # type: ignore[no-untyped-def]
    return inspect_request(method, target, version, list(headers))


def head_lines(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\r\n\r\n")
    return raw[:-4].split(b"\r\n")


# ---------------------------------------------------------------- inspect_request


def test_plain_get() -> None:
    req = inspect(HOST, (b"Accept", b"*/*"))
    assert req.framing is Framing.NONE and req.content_length == 0
    assert req.host == b"a.example"
    assert req.forward == b"Accept: */*\r\n"
    assert not req.upgrade and not req.expect_continue


@pytest.mark.parametrize(
    ("headers", "framing", "length"),
    [
        ([(b"Content-Length", b"5")], Framing.LENGTH, 5),
        ([(b"Content-Length", b"0")], Framing.NONE, 0),
        ([(b"Content-Length", b"007")], Framing.LENGTH, 7),
        ([(b"Content-Length", b"5"), (b"content-length", b"5")], Framing.LENGTH, 5),
        ([(b"Transfer-Encoding", b"chunked")], Framing.CHUNKED, 0),
        ([(b"Transfer-Encoding", b" Chunked ")], Framing.CHUNKED, 0),
    ],
)
def test_request_framing(headers, framing, length) -> None:  # type: ignore[no-untyped-def]
    req = inspect(HOST, *headers, method=b"POST")
    assert req.framing is framing and req.content_length == length


@pytest.mark.parametrize(
    ("headers", "kw", "status", "words"),
    [
        ([(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")], {}, 400, "both"),
        ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")], {}, 400, "both"),
        ([(b"Transfer-Encoding", b"gzip, chunked")], {}, 400, "unsupported"),
        ([(b"Transfer-Encoding", b"xchunked")], {}, 400, "unsupported"),
        ([(b"Transfer-Encoding", b"chunked")] * 2, {}, 400, "repeated"),
        ([(b"Transfer-Encoding", b"chunked")], {"version": "1.0"}, 400, "HTTP/1.0"),
        ([(b"Content-Length", b"+5")], {}, 400, "invalid Content-Length"),
        ([(b"Content-Length", b"1,1")], {}, 400, "invalid Content-Length"),
        ([(b"Content-Length", b"9" * 19)], {}, 400, "invalid Content-Length"),
        ([(b"Content-Length", b"1"), (b"Content-Length", b"2")], {}, 400, "conflicting"),
        ([(b"Host", b"b")], {}, 400, "more than one Host"),
        ([(b"Upgrade", b"ws"), (b"Content-Length", b"1")], {}, 400, "Upgrade"),
        ([], {"target": b""}, 400, "empty"),
        ([], {"target": b"*"}, 400, "asterisk"),
        ([], {"target": b"ftp://x/"}, 400, "target"),
        ([], {"target": b"http://u:p@x/"}, 400, "authority"),
        ([], {"target": b"http:///p"}, 400, "authority"),
        ([], {"target": b"a.example:443"}, 400, "target"),
        ([], {"version": "2.0"}, 400, "version"),
        ([], {"version": "0.9"}, 400, "version"),
    ],
)
def test_request_refused(headers, kw, status, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadRequest) as err:
        inspect(HOST, *headers, **kw)
    assert err.value.status == status and words in err.value.reason


def test_missing_host() -> None:
    with pytest.raises(BadRequest, match="missing Host"):
        inspect()
    assert inspect(version="1.0").host == b""


def test_absolute_form_wins_over_host() -> None:
    req = inspect((b"Host", b"other"), target=b"http://b.example:81/p?q=1")
    assert (req.host, req.target) == (b"b.example:81", b"/p?q=1")
    assert inspect(target=b"HTTPS://b.example").target == b"/"


def test_asterisk_form_for_options() -> None:
    assert inspect(HOST, method=b"OPTIONS", target=b"*").target == b"*"


def test_hop_by_hop_and_connection_tokens_dropped() -> None:
    req = inspect(
        HOST,
        (b"Connection", b"keep-alive, X-Secret"),
        (b"connection", b"X-Other"),
        (b"X-Secret", b"1"),
        (b"X-Other", b"2"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"X-Kept", b"3"),
    )
    assert req.forward == b"X-Kept: 3\r\n"


def test_spoofable_headers_collected_not_forwarded() -> None:
    req = inspect(
        HOST,
        (b"X-Forwarded-For", b"1.1.1.1"),
        (b"x-forwarded-for", b"2.2.2.2"),
        (b"Via", b"1.0 p"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"evil"),
        (b"Forwarded", b"for=3.3.3.3"),
        (b"X-Request-Id", b"rid"),
        (b"Expect", b"100-Continue"),
    )
    assert req.xff == b"1.1.1.1, 2.2.2.2" and req.via == b"1.0 p"
    assert req.request_id == b"rid" and req.expect_continue
    assert req.forward == b"X-Request-Id: rid\r\nExpect: 100-Continue\r\n"


# ---------------------------------------------------------------- backend_request


def test_backend_request_adds_forwarding_headers() -> None:
    req = inspect(
        HOST,
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"X-A", b"1"),
        method=b"POST",
        target=b"/p",
        version="1.0",
    )
    req.framing, req.content_length = Framing.LENGTH, 3
    raw = backend_request(req, b"127.0.0.9", ForwardOptions(request_id=False))
    lines = head_lines(raw)
    assert lines[0] == b"POST /p HTTP/1.1"
    assert b"X-A: 1" in lines
    assert b"X-Forwarded-For: 10.0.0.1, 127.0.0.9" in lines
    assert b"X-Forwarded-Proto: http" in lines
    assert b"Via: 1.1 lb-testbed" in lines
    assert b"Host: a.example" in lines and b"X-Forwarded-Host: a.example" in lines
    assert b"Content-Length: 3" in lines
    assert not any(ln.lower().startswith(b"x-request-id") for ln in lines)


def test_backend_request_ids_forwarded_and_tls() -> None:
    req = inspect(HOST, (b"Via", b"1.0 p"))
    opts = ForwardOptions(proto=b"https", forwarded=True, tls_facts=True)
    lines = head_lines(backend_request(req, b"::1", opts, ("TLSv1.3", "TLS_AES_128_GCM_SHA256")))
    assert b'Forwarded: for="[::1]";proto=https;host="a.example"' in lines
    assert b"Via: 1.0 p, 1.1 lb-testbed" in lines
    assert b"X-Forwarded-TLS-Version: TLSv1.3" in lines
    assert b"X-Forwarded-TLS-Cipher: TLS_AES_128_GCM_SHA256" in lines
    assert sum(ln.startswith(b"X-Request-Id: ") for ln in lines) == 1


def test_backend_request_chunked_upgrade_and_no_host() -> None:
    chunked = inspect(HOST, (b"Transfer-Encoding", b"chunked"), method=b"POST")
    assert b"Transfer-Encoding: chunked" in head_lines(
        backend_request(chunked, b"1.2.3.4", ForwardOptions())
    )
    up = inspect(HOST, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"))
    lines = head_lines(backend_request(up, b"1.2.3.4", ForwardOptions()))
    assert b"Connection: Upgrade" in lines and b"Upgrade: websocket" in lines
    no_host = inspect(version="1.0")
    lines = head_lines(backend_request(no_host, b"1.2.3.4", ForwardOptions()))
    assert b"Host: " in lines and not any(ln.startswith(b"X-Forwarded-Host") for ln in lines)


def test_request_ids_unique() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000


# ---------------------------------------------------------------- responses


@pytest.mark.parametrize(
    ("status", "headers", "head", "expect"),
    [
        (200, [(b"Content-Length", b"5")], False, Framing.LENGTH),
        (200, [(b"Content-Length", b"0")], False, Framing.NONE),
        (200, [(b"Transfer-Encoding", b"chunked")], False, Framing.CHUNKED),
        (200, [], False, Framing.UNTIL_CLOSE),
        (200, [(b"Content-Length", b"5")], True, Framing.NONE),
        (204, [(b"Content-Length", b"5")], False, Framing.NONE),
        (304, [(b"Content-Length", b"5")], False, Framing.NONE),
        (100, [], False, Framing.NONE),
    ],
)
def test_response_framing(status, headers, head, expect) -> None:  # type: ignore[no-untyped-def]
    raw = b"HTTP/1.1 %d X\r\n" % status + b"".join(b"%s: %s\r\n" % h for h in headers)
    _, framing, _ = rewrite_response_head(
        raw, status, head, client_chunked_ok=True, keep_alive=True
    )
    assert framing is expect


RAW = (
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\nKeep-Alive: t=5\r\n"
    b"X-A: 1\r\n"
)


@pytest.mark.parametrize("fn", ["raw", "parsed"])
@pytest.mark.parametrize(
    ("raw", "status", "head_req", "ok_chunked", "keep", "framing", "chunked", "has"),
    [
        (RAW, 200, False, True, True, Framing.LENGTH, False, [b"X-A: 1", b"Content-Length: 2"]),
        (RAW, 200, True, True, True, Framing.NONE, False, [b"Content-Length: 2"]),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n",
            200,
            False,
            True,
            True,
            Framing.CHUNKED,
            True,
            [b"Transfer-Encoding: chunked"],
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n",
            200,
            False,
            False,
            True,
            Framing.CHUNKED,
            False,
            [b"Connection: close"],
        ),
        (
            b"HTTP/1.1 200 OK\r\nX-B: 2\r\n",
            200,
            False,
            True,
            True,
            Framing.UNTIL_CLOSE,
            True,
            [b"Transfer-Encoding: chunked"],
        ),
        (
            b"HTTP/1.1 204 No Content\r\n",
            204,
            False,
            True,
            False,
            Framing.NONE,
            False,
            [b"Connection: close"],
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: X-Secret, close\r\nX-Secret: s\r\n"
            b"Content-Length: 0\r\n",
            200,
            False,
            True,
            True,
            Framing.NONE,
            False,
            [],
        ),
    ],
)
def test_response_head_rewrite(
    fn, raw, status, head_req, ok_chunked, keep, framing, chunked, has
) -> None:  # type: ignore[no-untyped-def]
    if fn == "raw":
        out, fr, ch = rewrite_response_head(
            raw,
            status,
            head_req,
            client_chunked_ok=ok_chunked,
            keep_alive=keep,
            extra=b"X-Extra: e\r\n",
        )
    else:
        reason, headers = split_head(raw)
        out, fr, ch = client_response(
            status,
            reason,
            headers,
            head_req,
            client_chunked_ok=ok_chunked,
            keep_alive=keep,
            extra=b"X-Extra: e\r\n",
        )
    lines = head_lines(out)
    assert lines[0].startswith(b"HTTP/1.1 %d " % status)
    assert (fr, ch) == (framing, chunked)
    for line in has:
        assert line in lines
    assert b"X-Extra: e" in lines
    lower = [ln.lower() for ln in lines]
    assert not any(ln.startswith((b"keep-alive", b"x-secret", b"connection: x")) for ln in lower)
    assert sum(ln.startswith(b"transfer-encoding") for ln in lower) <= 1


def test_101_keeps_upgrade_headers() -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    out, framing, _ = rewrite_response_head(
        raw, 101, False, client_chunked_ok=True, keep_alive=True
    )
    lines = head_lines(out)
    assert b"Upgrade: websocket" in lines and b"Connection: Upgrade" in lines
    assert framing is Framing.NONE


def test_split_head() -> None:
    reason, headers = split_head(b"HTTP/1.1 404 Not Found\r\nA: 1\r\nB:2 \r\n")
    assert reason == b"Not Found" and headers == [(b"A", b"1"), (b"B", b"2")]


@pytest.mark.parametrize("status", [400, 408, 413, 414, 431, 502, 503, 504, 599])
def test_error_response_is_short_and_framed(status: int) -> None:
    raw = error_response(status, "why", extra=b"Retry-After: 1\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b"content-length: %d" % len(body) in head
    assert b"connection: close" in head and b"Retry-After: 1" in head
    assert body.startswith(b"%d " % status) and body.endswith(b"why\n") and len(body) < 100
    assert b"connection" not in error_response(status, "x", close=False).lower()
