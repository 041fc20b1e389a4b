"""Pure HTTP/1.x head handling for the data path: no sockets, no clock.

The proxy parses with httptools (llhttp, strict mode), which already refuses
CL+TE, duplicate Content-Length, obs-fold, bare CR/LF, CTLs in names/values and
bad chunk sizes. What llhttp allows but a proxy must not forward ambiguously is
checked here, and the heads for the backend and for the client are rebuilt from parsed fields
so that nothing the client framed one way reaches a backend framed another.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum

# RFC 9110 7.6.1 plus the legacy ones that proxies strip in practice.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


class Framing(Enum):
    NONE = 0  # no body
    LENGTH = 1  # Content-Length
    CHUNKED = 2  # Transfer-Encoding: chunked
    UNTIL_CLOSE = 3  # response body delimited by connection close


class BadRequest(Exception):
    """The client's request must be refused; `status` says how."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ForwardOptions:
    """Header rewriting settings for one listener."""

    proto: bytes = b"http"  # X-Forwarded-Proto
    via: bytes = b"1.1 lb-testbed"
    forwarded: bool = False  # also emit RFC 7239 Forwarded
    request_id: bool = True  # keep or create X-Request-Id
    tls_facts: bool = False  # X-Forwarded-TLS-Version / -Cipher


def error_response(status: int, detail: str, *, close: bool = True, extra: bytes = b"") -> bytes:
    """A complete, short text error response."""
    body = f"{status} {_REASONS.get(status, b'Error').decode()}: {detail}\n".encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
        % (
            status,
            _REASONS.get(status, b"Error"),
            len(body),
        )
    )
    if close:
        head += b"connection: close\r\n"
    return head + extra + b"\r\n" + body


_EMPTY: frozenset[bytes] = frozenset()


def _tokens(values: list[bytes]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        for tok in value.split(b","):
            tok = tok.strip().lower()
            if tok:
                tokens.add(tok)
    return frozenset(tokens)


@dataclass(slots=True)
class RequestHead:
    """What the data path needs to know about a parsed request head."""

    method: bytes
    target: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    framing: Framing
    content_length: int
    host: bytes
    upgrade: bytes  # b"" unless this is an Upgrade request
    request_id: bytes
    expect_continue: bool
    forward: bytes  # header lines passed to the backend unchanged
    xff: bytes  # incoming X-Forwarded-For, to append to
    via: bytes  # incoming Via, to append to


# Headers we set ourselves from what we saw; a client must not be able to spoof them.
_REWRITTEN = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})
# Headers never forwarded as they came: hop-by-hop, re-added from parsed values, or ours.
_NOT_FORWARDED = HOP_BY_HOP | _REWRITTEN | {b"host", b"content-length", b"x-forwarded-for", b"via"}
# Every header inspect_request looks at; anything else is passed through untouched.
_INSPECTED = _NOT_FORWARDED | {b"x-request-id", b"expect"}


def inspect_request(
    method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]]
) -> RequestHead:
    """Validate framing-relevant headers (BadRequest for anything ambiguous) in one pass,
    and collect the header block that is forwarded as-is."""
    framing = Framing.NONE
    content_length = 0
    host: bytes | None = None
    upgrade = b""
    request_id = b""
    expect_continue = False
    te_seen = False
    cl_seen: bytes | None = None
    conn_values: list[bytes] = []
    xff = b""
    via = b""
    fwd: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname not in _INSPECTED:
            # the common case: an ordinary header, forwarded as it came
            fwd += (name, b": ", value, b"\r\n")
            continue
        if lname in HOP_BY_HOP:
            if lname == b"transfer-encoding":
                if te_seen:
                    raise BadRequest(400, "repeated Transfer-Encoding header")
                te_seen = True
                if value.strip().lower() != b"chunked":
                    raise BadRequest(400, "unsupported Transfer-Encoding")
            elif lname == b"connection":
                conn_values.append(value)
            elif lname == b"upgrade":
                upgrade = value.strip()
            continue
        if lname == b"host":
            if host is not None:
                raise BadRequest(400, "more than one Host header")
            host = value.strip()
        elif lname == b"content-length":
            v = value.strip()
            if not v.isdigit() or len(v) > 18:
                raise BadRequest(400, "invalid Content-Length")
            if cl_seen is not None and cl_seen != v:
                raise BadRequest(400, "conflicting Content-Length headers")
            cl_seen = v
        elif lname == b"x-forwarded-for":
            xff = xff + b", " + value if xff else value
        elif lname == b"via":
            via = via + b", " + value if via else value
        elif lname in _REWRITTEN:
            pass
        else:
            if lname == b"x-request-id":
                request_id = value
            elif lname == b"expect" and value.strip().lower() == b"100-continue":
                expect_continue = True
            fwd += (name, b": ", value, b"\r\n")
    if te_seen:
        if cl_seen is not None:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if version == "1.0":
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        framing = Framing.CHUNKED
    elif cl_seen is not None:
        content_length = int(cl_seen)
        framing = Framing.LENGTH if content_length else Framing.NONE
    if version != "1.1" and version != "1.0":
        # llhttp accepts any digit.digit; a 2.0 or 0.9 claim in HTTP/1 syntax is bogus
        raise BadRequest(400, "unsupported HTTP version")
    if not target:
        raise BadRequest(400, "empty request target")
    if target[:1] != b"/":
        if target == b"*":
            if method != b"OPTIONS":
                raise BadRequest(400, "asterisk-form target is only valid for OPTIONS")
        else:
            # absolute-form: the authority in the target wins over Host (RFC 9112 3.2.2)
            scheme, sep, rest = target.partition(b"://")
            if not sep or scheme.lower() not in (b"http", b"https"):
                raise BadRequest(400, "invalid request target")
            authority, slash, path = rest.partition(b"/")
            if not authority or b"@" in authority:
                raise BadRequest(400, "invalid authority in request target")
            host = authority
            target = b"/" + path if slash else b"/"
    if host is None:
        if version != "1.0":
            raise BadRequest(400, "missing Host header")
        host = b""
    if upgrade and framing is not Framing.NONE:
        raise BadRequest(400, "Upgrade request with a body")
    drop = _tokens(conn_values) if conn_values else _EMPTY
    if drop - _NOT_FORWARDED:
        # rare: the client named more hop-by-hop headers in Connection
        fwd = []
        for name, value in headers:
            lname = name.lower()
            if lname not in _NOT_FORWARDED and lname not in drop:
                fwd += (name, b": ", value, b"\r\n")
    forward = b"".join(fwd)
    return RequestHead(
        method=method,
        target=target,
        version=version,
        headers=headers,
        framing=framing,
        content_length=content_length,
        host=host,
        upgrade=upgrade,
        request_id=request_id,
        expect_continue=expect_continue,
        forward=forward,
        xff=xff,
        via=via,
    )


_RID_PREFIX = os.urandom(4).hex().encode()
_rid_counter = 0


def new_request_id() -> bytes:
    """Unique per process run: a random prefix and a counter (no syscall per request)."""
    global _rid_counter
    _rid_counter += 1
    return b"%s-%x" % (_RID_PREFIX, _rid_counter)


def backend_request(
    req: RequestHead,
    client_ip: bytes,
    opts: ForwardOptions,
    tls: tuple[str, str] | None = None,
) -> bytes:
    """The request head sent to a backend: HTTP/1.1, hop-by-hop removed, X-Forwarded-* added."""
    host = req.host
    xff = req.xff
    via = req.via
    parts = [
        req.method,
        b" ",
        req.target,
        b" HTTP/1.1\r\n",
        req.forward,
        b"X-Forwarded-For: ",
        xff + b", " + client_ip if xff else client_ip,
        b"\r\nX-Forwarded-Proto: ",
        opts.proto,
        b"\r\nVia: ",
        via + b", " + opts.via if via else opts.via,
        b"\r\n",
    ]
    if host:
        parts += (b"Host: ", host, b"\r\nX-Forwarded-Host: ", host, b"\r\n")
    else:
        parts.append(b"Host: \r\n")  # HTTP/1.1 requires one; empty when unknown (RFC 9112 3.2)
    if opts.request_id and not req.request_id:
        parts += (b"X-Request-Id: ", new_request_id(), b"\r\n")
    if opts.forwarded:
        ip = b'"[' + client_ip + b']"' if b":" in client_ip else client_ip
        fwd = b"for=" + ip + b";proto=" + opts.proto
        if host:
            fwd += b';host="' + host.replace(b'"', b"") + b'"'
        parts += (b"Forwarded: ", fwd, b"\r\n")
    if tls is not None and opts.tls_facts:
        parts += (b"X-Forwarded-TLS-Version: ", tls[0].encode(), b"\r\n")
        parts += (b"X-Forwarded-TLS-Cipher: ", tls[1].encode(), b"\r\n")
    if req.upgrade:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", req.upgrade, b"\r\n")
    elif req.framing is Framing.CHUNKED:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif req.framing is Framing.LENGTH:
        parts += (b"Content-Length: ", str(req.content_length).encode(), b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


# Connection tokens that name no header to strip.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})


def client_response(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    head_request: bool,
    *,
    client_chunked_ok: bool,
    keep_alive: bool,
    extra: bytes = b"",
) -> tuple[bytes, Framing, bool]:
    """The response head sent to the client, in one pass over the backend's headers.

    Returns (head, framing of the backend's body, chunked) where chunked says
    whether the body must be chunk-encoded for the client.
    """
    parts = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
    append = parts.append
    upgrade = status == 101
    te = False
    length = -1
    drop: set[bytes] | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"transfer-encoding":
                te = True
            elif lname == b"connection":
                for tok in value.lower().split(b","):
                    tok = tok.strip()
                    if tok and tok not in _PLAIN_CONNECTION:
                        drop = drop or set()
                        drop.add(tok)
            if upgrade and (lname == b"upgrade" or lname == b"connection"):
                parts += (name, b": ", value, b"\r\n")
            continue
        if lname == b"content-length":
            length = int(value.strip())
        parts += (name, b": ", value, b"\r\n")
    if drop and any(n.lower() in drop for n, _ in headers):
        # rare: the backend named extra hop-by-hop headers in Connection (once they are
        # filtered out the check fails, so this recurses only once)
        return client_response(
            status,
            reason,
            [(n, v) for n, v in headers if n.lower() not in drop],
            head_request,
            client_chunked_ok=client_chunked_ok,
            keep_alive=keep_alive,
            extra=extra,
        )
    if head_request or status < 200 or status in (204, 304):
        framing = Framing.NONE
    elif te:
        framing = Framing.CHUNKED
    elif length > 0:
        framing = Framing.LENGTH
    elif length == 0:
        framing = Framing.NONE
    else:
        framing = Framing.UNTIL_CLOSE
    chunked = False
    if framing is Framing.CHUNKED or framing is Framing.UNTIL_CLOSE:
        if client_chunked_ok:
            append(b"Transfer-Encoding: chunked\r\n")
            chunked = True
        else:
            keep_alive = False
    if extra:
        append(extra)
    if not keep_alive and not upgrade and status >= 200:
        append(b"Connection: close\r\n")
    append(b"\r\n")
    return b"".join(parts), framing, chunked


# Response heads are rewritten as raw bytes: llhttp already proved them well formed
# (no obs-fold, no bare CR/LF, no space before the colon), so one C regex pass can
# find the few lines a proxy must touch, instead of a Python call per header.
_HOP_LINE = re.compile(
    rb"^(?:connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade"
    rb"|proxy-authenticate|proxy-authorization):[^\r\n]*\r\n",
    re.I | re.M,
)
# The lines a proxy reads in a response head: hop-by-hop ones and Content-Length.
_SPECIAL_LINE = re.compile(
    rb"^(connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade"
    rb"|proxy-authenticate|proxy-authorization|content-length):[ \t]*([^\r\n]*)\r\n",
    re.I | re.M,
)


def split_head(raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Status line reason and (name, value) pairs of a raw response head."""
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    reason = parts[2] if len(parts) > 2 else b""
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip(b" \t")))
    return reason, headers


def rewrite_response_head(
    raw: bytes,
    status: int,
    head_request: bool,
    *,
    client_chunked_ok: bool,
    keep_alive: bool,
    extra: bytes = b"",
) -> tuple[bytes, Framing, bool]:
    """Like `client_response`, from the raw head bytes (status line + header lines)."""
    eol = raw.find(b"\r\n")
    block = raw[eol + 2 :]
    te = False
    length = -1
    hop = False
    for name, value in _SPECIAL_LINE.findall(block):
        lname = name.lower()
        if lname == b"content-length":
            length = int(value)
            continue
        hop = True
        if lname == b"transfer-encoding":
            te = True
        elif lname == b"connection" and value.lower() not in _PLAIN_CONNECTION:
            if any(t.strip() not in _PLAIN_CONNECTION for t in value.lower().split(b",")):
                status = -status  # rare: extra hop-by-hop names; take the slow path below
    if status < 0 or status == 101:
        reason, headers = split_head(raw)
        return client_response(
            abs(status),
            reason,
            headers,
            head_request,
            client_chunked_ok=client_chunked_ok,
            keep_alive=keep_alive,
            extra=extra,
        )
    if hop:
        block = _HOP_LINE.sub(b"", block)
    if head_request or status < 200 or status in (204, 304):
        framing = Framing.NONE
    elif te:
        framing = Framing.CHUNKED
    elif length < 0:
        framing = Framing.UNTIL_CLOSE
    else:
        framing = Framing.LENGTH if length else Framing.NONE
    status_line = raw[:eol]
    if not status_line.startswith(b"HTTP/1.1 "):
        status_line = b"HTTP/1.1 " + status_line.partition(b" ")[2]
    parts = [status_line, b"\r\n", block]
    chunked = False
    if framing is Framing.CHUNKED or framing is Framing.UNTIL_CLOSE:
        if client_chunked_ok:
            parts.append(b"Transfer-Encoding: chunked\r\n")
            chunked = True
        else:
            keep_alive = False
    if extra:
        parts.append(extra)
    if not keep_alive and status >= 200:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), framing, chunked
