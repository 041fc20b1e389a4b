"""Pure HTTP/2 <-> HTTP/1.1 head translation for one stream: no sockets, no h2 state.

A stream's request head (pseudo-headers and fields, as h2 decoded them) becomes the same
`RequestHead` an HTTP/1.1 request gives, so the head rules of `balancer.http1.head` and the
backend request builder apply unchanged; a backend's HTTP/1.1 response head becomes an
HTTP/2 header list. The rules (RFC 9113 8.2-8.3):
- `:method`, `:scheme` and `:path` are required once each (CONNECT is refused), pseudo-headers
  come first and no other one exists; `:authority` wins over `Host` and becomes `Host`.
- Connection-specific fields never cross: a request carrying them is malformed (h2 checks
  that too), a response's are dropped, with any field its `Connection` header names.
- Cookie crumbs are joined with "; " into one `Cookie` field for HTTP/1.1 (8.2.3).
- A request body without `content-length` goes upstream chunked.
- Field names are lowercase tokens and values carry no CR, LF, NUL or other controls and
  no surrounding whitespace (8.2.1): checked here, on every field, because the values are
  written into an HTTP/1.1 head (h2's own inbound validation is off: it makes any malformed
  field a connection error, and costs more than these two regexes).
"""

from __future__ import annotations

import re

from balancer.http1.head import HOP_BY_HOP, BadRequest, RequestHead, inspect_request

_PSEUDO_REQUEST = frozenset({b":method", b":scheme", b":path", b":authority"})
# TE is allowed in HTTP/2 only as "trailers"; the rest are connection-specific (8.2.2)
_FORBIDDEN = frozenset(HOP_BY_HOP - {b"te", b"proxy-authenticate", b"proxy-authorization"})


_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|^[ \t]|[ \t]$")


# fields already found valid (a client repeats most of its fields on every request, and
# HPACK hands back the same objects): checking is a pure function of (name, value), so a
# hit skips the two regular expressions. Bounded in entries and in each entry's size.
_CLEAN: dict[tuple[bytes, bytes], None] = {}
CLEAN_MAX = 4096
CLEAN_FIELD = 512


class StreamError(Exception):
    """A malformed stream: reset it with PROTOCOL_ERROR (the connection's others carry on)."""


def request_head(headers: list[tuple[bytes, bytes]], end_stream: bool) -> RequestHead:
    """The HTTP/1.1 view of a stream's request head. StreamError for a malformed head,
    BadRequest for one that is well formed HTTP/2 but must be refused with a status."""
    method = scheme = path = authority = None
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    seen_regular = False
    clean = _CLEAN
    if len(clean) > CLEAN_MAX:
        clean.clear()
    for field in headers:
        name, value = field
        checked = field in clean
        if not checked:
            if _BAD_VALUE.search(value) is not None:
                raise StreamError("invalid field value")
        if name[:1] == b":":
            if seen_regular:
                raise StreamError("pseudo-header after a regular field")
            if name not in _PSEUDO_REQUEST:
                raise StreamError("unknown pseudo-header")
            if name == b":method":
                if method is not None:
                    raise StreamError("repeated :method")
                method = value
            elif name == b":scheme":
                if scheme is not None:
                    raise StreamError("repeated :scheme")
                scheme = value
            elif name == b":path":
                if path is not None:
                    raise StreamError("repeated :path")
                path = value
            else:
                if authority is not None:
                    raise StreamError("repeated :authority")
                authority = value
            if not checked and len(value) <= CLEAN_FIELD:
                clean[field] = None  # a pseudo-header: only its value is checked here
            continue
        seen_regular = True
        if not checked:
            if _NAME.fullmatch(name) is None:
                raise StreamError("invalid field name")
            if name in _FORBIDDEN:
                raise StreamError("connection-specific header field")
            if name == b"te":
                if value.strip().lower() != b"trailers":
                    raise StreamError("TE other than trailers")
                continue
            if len(name) + len(value) <= CLEAN_FIELD:
                clean[field] = None
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host" and authority is not None:
            continue  # :authority wins (RFC 9113 8.3.1); pseudo-headers come first
        fields.append(field)
    if method == b"CONNECT":
        raise BadRequest(405, "CONNECT is not supported")
    if method is None or scheme is None or not path:
        raise StreamError("missing :method, :scheme or :path")
    if authority is not None:
        if not authority or b"@" in authority:
            raise StreamError("invalid :authority")
        fields.append((b"host", authority))
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    if not end_stream and not any(n == b"content-length" for n, _ in fields):
        fields.append((b"transfer-encoding", b"chunked"))
    return inspect_request(method, path, "1.1", fields)


def trailer_fields(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Request trailers that may follow a chunked body upstream (StreamError if malformed)."""
    out = []
    for name, value in headers:
        if name[:1] == b":" or _NAME.fullmatch(name) is None or _BAD_VALUE.search(value):
            raise StreamError("invalid trailer field")
        if name not in HOP_BY_HOP and name not in _NOT_TRAILERS:
            out.append((name, value))
    return out


_NOT_TRAILERS = frozenset({b"content-length", b"host", b"content-type", b"authorization"})
# a response's trailers never carry connection-specific fields (RFC 9113 8.2.2), framing
# or what describes the content, which the head already gave (RFC 9110 6.5.1)
NOT_RESPONSE_TRAILERS = HOP_BY_HOP | {
    b"content-length",
    b"content-type",
    b"content-encoding",
    b"content-range",
}

# one field line of a head llhttp already parsed (no obs-fold, no bare CR or LF); the
# value is matched greedily, then trailing whitespace given back (a lazy match retried
# the rest of the pattern at every byte: twice the instructions)
_FIELD = re.compile(rb"([^:\r\n]+):[ \t]*([^\r\n]*(?<![ \t]))[ \t]*\r\n")


def response_headers(
    status: int, raw: bytes, extra: list[tuple[bytes, bytes]]
) -> tuple[list[tuple[bytes, bytes]], int, bool]:
    """The HTTP/2 header list for a backend's raw HTTP/1.1 response head (status line and
    field lines), its Content-Length (-1 when it has none) and whether it is chunked."""
    block = raw[raw.find(b"\r\n") + 2 :]
    if not block.endswith(b"\r\n"):
        block += b"\r\n"
    out = [(b":status", b"%d" % status)]
    length = -1
    chunked = False
    drop: set[bytes] | None = None
    # one pass: most fields are kept as they are; the few special ones are looked at
    for name, value in _FIELD.findall(block):
        name = name.lower()
        if name not in _SPECIAL:
            out.append((name, value))
        elif name == b"content-length":
            if value.isdigit():
                length = int(value)
                out.append((name, value))
        elif name == b"transfer-encoding":
            chunked = True  # hop-by-hop, like the rest: never sent in HTTP/2
        elif name == b"connection":
            names = {t.strip().lower() for t in value.split(b",")}
            drop = names if drop is None else drop | names
    if drop is not None:
        drop -= _NOT_LISTED  # "keep-alive", "close": nothing more to take out
        if drop:
            out = [f for f in out if f[0] not in drop]
    return out + extra, length, chunked


_SPECIAL = HOP_BY_HOP | {b"content-length"}
_NOT_LISTED = HOP_BY_HOP | {b":status", b"close"}


def interim_headers(status: int, raw: bytes) -> list[tuple[bytes, bytes]]:
    """A 1xx response (100 Continue, 103 Early Hints) as an HTTP/2 header list."""
    headers, _, _ = response_headers(status, raw, [])
    return [(n, v) for n, v in headers if n != b"content-length"]


def error_headers(status: int, body_len: int) -> list[tuple[bytes, bytes]]:
    return [
        (b":status", b"%d" % status),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % body_len),
    ]


def placeholder(headers: list[tuple[bytes, bytes]]) -> RequestHead:
    """A refused request's head, for its access-log line: method and path as sent."""
    pseudo = dict(h for h in headers if h[0][:1] == b":")
    path = pseudo.get(b":path", b"/")
    try:
        return inspect_request(pseudo.get(b":method", b"GET"), path, "1.1", [(b"host", b"-")])
    except BadRequest:
        return inspect_request(b"GET", b"/", "1.1", [(b"host", b"-")])
