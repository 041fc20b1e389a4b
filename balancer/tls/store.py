"""TLS termination for the listener: certificate store with SNI selection and hot reload.

The listener passes `store.context` to `loop.create_server(..., ssl=store.context)`
(asyncio or uvloop). That front context has an
`sni_callback` which, on every ClientHello (OpenSSL calls it with or without SNI), switches
the connection to the *current* per-certificate context. A reload builds complete new
per-certificate contexts and swaps the list in one assignment, so new handshakes get the new
certificate while established connections keep the one they were set up with.

All contexts (front and per-certificate) are configured identically: after the switch
OpenSSL takes the certificate, client-CA store and ALPN callback from the new context, but
ticket keys and the session cache from the front one, so resumption survives reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger(__name__)

# TLS 1.2 only: forward secrecy + AEAD. TLS 1.3 suites are AEAD by construction.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20"

IPAddr: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
FileStamp: TypeAlias = tuple[int, int, int] | None  # (mtime_ns, size, inode); None = missing


class TLSConfigError(Exception):
    """A certificate, key or CA file cannot be used. The message names the file."""


@dataclass(frozen=True)
class LoadedCert:
    cert_file: Path
    key_file: Path
    context: ssl.SSLContext
    dns_names: tuple[str, ...]  # lower-case, may start with "*."
    ips: frozenset[IPAddr]
    serial: int
    not_after: datetime
    issuer: str = ""  # RFC 4514 string of the issuer's name
    sha256: str = ""  # fingerprint of the DER certificate, colon-separated hex


# ---------------------------------------------------------------- pure SNI matching


def _norm_host(name: str) -> str:
    return name.strip().rstrip(".").lower()


def dns_matches(pattern: str, host: str) -> bool:
    """RFC 6125 matching: exact, or a leftmost "*" label standing for exactly one label."""
    pattern, host = _norm_host(pattern), _norm_host(host)
    if not pattern.startswith("*."):
        return pattern == host
    first, sep, rest = host.partition(".")
    return bool(first) and bool(sep) and rest == pattern[2:]


def select_index(
    names: Sequence[tuple[Sequence[str], frozenset[IPAddr]]], server_name: str | None
) -> int:
    """Index of the certificate to present for `server_name`; 0 (the default) if none fits.

    Exact DNS names beat wildcards; an IP literal (some clients send one) matches IP SANs.
    """
    if not server_name:
        return 0
    host = _norm_host(server_name)
    try:
        ip: IPAddr | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        return next((i for i, (_, ips) in enumerate(names) if ip in ips), 0)
    for i, (dns, _) in enumerate(names):
        if host in dns:
            return i
    for i, (dns, _) in enumerate(names):
        if any(p.startswith("*.") and dns_matches(p, host) for p in dns):
            return i
    return 0


# ---------------------------------------------------------------- contexts


def _server_context(
    min_version: ssl.TLSVersion, alpn: Sequence[str], client_ca: Path | None
) -> ssl.SSLContext:
    # Not create_default_context(CLIENT_AUTH): that would also trust the system CAs for
    # client certificates. PROTOCOL_TLS_SERVER already sets OP_NO_COMPRESSION,
    # OP_CIPHER_SERVER_PREFERENCE and OP_SINGLE_ECDH_USE; tickets stay on.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = min_version
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(CIPHERS_TLS12)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"client CA {client_ca}: {_reason(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{path}: {_reason(exc)}") from None


def _load_pair(
    cert_file: Path,
    key_file: Path,
    min_version: ssl.TLSVersion,
    alpn: Sequence[str],
    client_ca: Path | None,
) -> LoadedCert:
    before = _read(cert_file)
    try:
        leaf = x509.load_pem_x509_certificates(before)[0]
    except ValueError:
        raise TLSConfigError(f"{cert_file}: not a PEM certificate") from None
    problem = server_auth_problem(leaf)
    if problem is not None:
        raise TLSConfigError(f"{cert_file}: {problem}")
    ctx = _server_context(min_version, alpn, client_ca)
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except ssl.SSLError as exc:
        why = "key does not match certificate" if "MISMATCH" in str(exc) else _reason(exc)
        raise TLSConfigError(f"{cert_file} + {key_file}: {why}") from None
    except OSError as exc:
        raise TLSConfigError(f"{cert_file} + {key_file}: {_reason(exc)}") from None
    # OpenSSL read the file itself: make sure it saw what cryptography parsed.
    if _read(cert_file) != before:
        raise TLSConfigError(f"{cert_file}: changed while loading, will retry")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(_norm_host(d) for d in san.get_values_for_type(x509.DNSName))
        ips = frozenset(
            ip
            for ip in san.get_values_for_type(x509.IPAddress)
            if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
        )
    except x509.ExtensionNotFound:
        dns, ips = (), frozenset()
    not_after = leaf.not_valid_after_utc
    if not_after < datetime.now(UTC):
        log.warning("TLS certificate %s expired at %s", cert_file, not_after.isoformat())
    fingerprint = leaf.fingerprint(hashes.SHA256()).hex(":").upper()
    issuer = leaf.issuer.rfc4514_string()
    return LoadedCert(
        cert_file, key_file, ctx, dns, ips, leaf.serial_number, not_after, issuer, fingerprint
    )


def server_auth_problem(leaf: x509.Certificate) -> str | None:
    """Why `leaf` may not serve TLS (RFC 5280 4.2.1.12), or None. No extended key usage
    means any use; otherwise serverAuth (or anyExtendedKeyUsage) must be listed, or every
    client rejects the handshake with an error that does not say why."""
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    allowed = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
    if any(oid in eku for oid in allowed):
        return None
    names = ", ".join(getattr(oid, "_name", oid.dotted_string) for oid in eku) or "nothing"
    return (
        f"extended key usage ({names}) does not allow server auth; "
        "issue a server certificate (python -m ca issue without --client)"
    )


def _stamp(path: Path) -> FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class CertStore:
    """Server certificates for one listener: SNI selection, hot reload, admin info.

    `pairs` is a list of (cert_file, key_file); the first is the default certificate.
    Construction raises TLSConfigError if anything is unusable (fail fast at start-up);
    later reloads never raise: a broken set of files is logged and the old one kept.
    """

    def __init__(
        self,
        pairs: Iterable[tuple[Path | str, Path | str]],
        *,
        min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
        client_ca: Path | str | None = None,
        alpn: Sequence[str] = ("http/1.1",),
    ) -> None:
        self.pairs = [(Path(c), Path(k)) for c, k in pairs]
        if not self.pairs:
            raise TLSConfigError("at least one certificate/key pair is needed")
        if min_version < ssl.TLSVersion.TLSv1_2:
            raise TLSConfigError(f"minimum TLS version {min_version.name} is below TLSv1_2")
        self.min_version = min_version
        self.client_ca = Path(client_ca) if client_ca is not None else None
        self.alpn = tuple(alpn)
        self.last_error: str | None = None
        self.reloads = 0
        self._stamps = self._stat_all()
        self._certs = self._load_all()
        self._front = _server_context(min_version, self.alpn, self.client_ca)
        try:
            self._front.load_cert_chain(str(self.pairs[0][0]), str(self.pairs[0][1]))
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"{self.pairs[0][0]}: {_reason(exc)}") from None
        self._front.sni_callback = self._on_sni

    @property
    def context(self) -> ssl.SSLContext:
        """The context to give create_server; it never changes identity across reloads."""
        return self._front

    def _files(self) -> list[Path]:
        files = [p for pair in self.pairs for p in pair]
        return files + ([self.client_ca] if self.client_ca is not None else [])

    def _stat_all(self) -> list[FileStamp]:
        return [_stamp(p) for p in self._files()]

    def _load_all(self) -> list[LoadedCert]:
        return [
            _load_pair(c, k, self.min_version, self.alpn, self.client_ca) for c, k in self.pairs
        ]

    def _on_sni(
        self, ssl_obj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        certs = self._certs  # one read: a concurrent swap cannot mix two generations
        i = select_index([(c.dns_names, c.ips) for c in certs], server_name)
        ssl_obj.context = certs[i].context
        with contextlib.suppress(AttributeError):  # the network lab shows it (io/lab.py)
            ssl_obj.lb_server_name = server_name  # type: ignore[union-attr]
        return None

    def reload(self) -> bool:
        """Re-read every file. On any error: log it once, keep serving the old set, False."""
        stamps = self._stat_all()
        try:
            fresh = self._load_all()
            # Also refresh the front context's own cert so that nothing can ever serve the
            # old one, even a handshake that somehow skipped the SNI callback.
            self._front.load_cert_chain(str(fresh[0].cert_file), str(fresh[0].key_file))
        except (TLSConfigError, OSError, ssl.SSLError) as exc:
            self._stamps = stamps  # don't retry (and re-log) until a file changes again
            self.last_error = str(exc) if isinstance(exc, TLSConfigError) else _reason(exc)
            log.error("TLS reload failed, still serving the previous certificates: %s", exc)
            return False
        self._certs = fresh
        self._stamps = stamps
        self.last_error = None
        self.reloads += 1
        log.info("TLS certificates reloaded: %s", ", ".join(f"{c.serial:x}" for c in fresh))
        return True

    def maybe_reload(self) -> bool | None:
        """Reload if any file's (mtime_ns, size, inode) changed: None if nothing changed."""
        if self._stat_all() == self._stamps:
            return None
        return self.reload()

    def cert_info(self) -> list[dict[str, Any]]:
        """For the admin API: what each listener certificate currently is."""
        now = datetime.now(UTC)
        return [
            {
                "cert_file": str(c.cert_file),
                "default": i == 0,
                "names": [*c.dns_names, *(str(ip) for ip in sorted(c.ips, key=str))],
                "serial": f"{c.serial:x}",
                "not_after": c.not_after.isoformat(),
                "expired": c.not_after < now,
                "issuer": c.issuer,
                "sha256": c.sha256,
            }
            for i, c in enumerate(self._certs)
        ]


async def watch(store: CertStore, interval: float = 1.0) -> None:
    """Poll the store's files every `interval` seconds; run as a task, cancel to stop.

    The stat calls and a reload (a few small files, a few ms) run inline on the loop.
    """
    while True:
        await asyncio.sleep(interval)
        try:
            store.maybe_reload()
        except Exception:  # a watcher that dies silently is worse than a logged error
            log.exception("TLS certificate watcher error")


def client_context(
    cafile: Path | str,
    cert: Path | str | None = None,
    key: Path | str | None = None,
    *,
    alpn: Sequence[str] = ("http/1.1",),
) -> ssl.SSLContext:
    """A verifying client context (re-encryption to backends, HTTPS checks).

    Trusts only `cafile`, checks the hostname, TLS 1.2+; optional client cert for mTLS.
    """
    if key is not None and cert is None:
        raise TLSConfigError("a client key was given without its certificate")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cafile))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"CA file {cafile}: {_reason(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if cert is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"client certificate {cert}: {_reason(exc)}") from None
    return ctx
