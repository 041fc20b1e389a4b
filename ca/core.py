"""Local certificate authority for the testbed, built on trustme + cryptography.

Layout of a CA directory (mode 0700):

    ca.crt, ca.key          the CA (key 0600)
    NAME.crt, NAME.key      issued leaves: NAME.crt holds the leaf, then any intermediates
                            (none for this root CA: clients must trust ca.crt itself)

trustme issues leaves with a critical subjectAltName and a server+client+code-signing EKU,
which the WebPKI profile (and cryptography's verifier) rejects. Every leaf is therefore
re-signed with the CA key: SAN non-critical, and an EKU of exactly serverAuth or clientAuth,
which is also how `renew` later tells a server certificate from a client one.

All failures the user can cause raise `CAError` with a one-line message; every file is
written to a temporary file in the same directory (right mode, fsync) and renamed into place.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeAlias

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

DEFAULT_LIFETIME = timedelta(days=90)
# notBefore is backdated so that a peer whose clock lags a little still accepts a fresh cert.
CLOCK_SKEW = timedelta(minutes=5)
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
ORGANIZATION = "lb-testbed"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")

SigningKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
# a leaf's key: public-key cryptography is what a full TLS handshake pays for (bench.handshakes)
KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")
DEFAULT_KEY_TYPE = "ec256"
IPAddr: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class CAError(Exception):
    """A user-facing failure: bad input or a broken CA directory. The message is one line."""


@dataclass(frozen=True)
class CertDescription:
    name: str
    path: Path
    kind: str  # "ca", "server" or "client"
    subject: str
    sans: tuple[str, ...]
    serial: int
    not_before: datetime
    not_after: datetime
    fingerprint_sha256: str
    key_type: str
    expired: bool
    verify_error: str | None  # None means it verifies against the CA at the given time

    @property
    def verified(self) -> bool:
        return self.verify_error is None

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


# ---------------------------------------------------------------- pure helpers


def check_name(name: str) -> str:
    """NAME becomes NAME.crt/NAME.key in the CA dir: keep it a plain, safe file name."""
    if not _NAME_RE.fullmatch(name) or name.lower() == "ca":
        raise CAError(
            f"bad name {name!r}: use 1-64 of [A-Za-z0-9._-], not starting with '.' or '-',"
            " and not 'ca'"
        )
    return name


def parse_ip(text: str) -> IPAddr:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CAError(f"bad IP address {text!r}") from None


def check_dns(text: str) -> str:
    name = text.strip().rstrip(".").lower()
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise CAError(f"{text!r} is an IP address: pass it with --ip")
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            raise CAError(f"bad DNS name {text!r}: a wildcard needs at least two labels after it")
    if len(name) > 253 or not labels or not all(_LABEL_RE.fullmatch(lb) for lb in labels):
        raise CAError(f"bad DNS name {text!r}")
    return name


def lifetime_window(now: datetime, lifetime: timedelta) -> tuple[datetime, datetime]:
    """(not_before, not_after). A negative lifetime gives an already expired certificate."""
    not_before = now - CLOCK_SKEW
    not_after = now + lifetime
    if not_after <= not_before:
        not_before = not_after - timedelta(minutes=1)
    return not_before, not_after


def cert_kind(cert: x509.Certificate) -> str:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            return "ca"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "server"
    if ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        return "client"
    return "server"


def cert_identities(cert: x509.Certificate) -> tuple[list[IPAddr], list[str]]:
    """(IP SANs, DNS SANs) of a certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    ips = [
        ip
        for ip in san.get_values_for_type(x509.IPAddress)
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    ]
    return ips, list(san.get_values_for_type(x509.DNSName))


def san_strings(cert: x509.Certificate) -> tuple[str, ...]:
    ips, dns = cert_identities(cert)
    return tuple([f"DNS:{d}" for d in dns] + [f"IP:{ip}" for ip in ips])


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _short_reason(exc: Exception) -> str:
    # cryptography appends "(encountered processing <Certificate(...)>)": noise on one line.
    text = str(exc).split(" (encountered processing", 1)[0]
    return text.removeprefix("validation failed: ")


def verify_leaf(ca_cert: x509.Certificate, leaf: x509.Certificate, now: datetime) -> str | None:
    """None if `leaf` chains to `ca_cert` under the WebPKI profile at `now`, else the reason."""
    builder = PolicyBuilder().store(Store([ca_cert])).time(now)
    try:
        if cert_kind(leaf) == "client":
            builder.build_client_verifier().verify(leaf, [])
            return None
        ips, dns = cert_identities(leaf)
        subject: x509.DNSName | x509.IPAddress
        plain = [d for d in dns if not d.startswith("*.")]
        if plain:
            subject = x509.DNSName(plain[0])
        elif ips:
            subject = x509.IPAddress(ips[0])
        elif dns:
            subject = x509.DNSName("wildcard-check" + dns[0][1:])
        else:
            return "certificate has no DNS or IP subjectAltName"
        builder.build_server_verifier(subject).verify(leaf, [])
    except VerificationError as exc:
        return _short_reason(exc)
    except ValueError as exc:
        return str(exc)
    return None


def describe_cert(
    name: str, path: Path, cert: x509.Certificate, ca_cert: x509.Certificate, now: datetime
) -> CertDescription:
    kind = cert_kind(cert)
    error = _verify_ca_self(cert, now) if kind == "ca" else verify_leaf(ca_cert, cert, now)
    return CertDescription(
        name=name,
        path=path,
        kind=kind,
        subject=cert.subject.rfc4514_string(),
        sans=san_strings(cert),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint_sha256=fingerprint(cert),
        key_type=key_type_of(cert),
        expired=now > cert.not_valid_after_utc,
        verify_error=error,
    )


def _verify_ca_self(cert: x509.Certificate, now: datetime) -> str | None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return "CA certificate is not valid at this time"
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError) as exc:
        return f"CA self-signature does not verify: {exc}"
    return None


def make_key(key_type: str) -> SigningKey:
    """A new private key of one of KEY_TYPES."""
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa2048", "rsa3072", "rsa4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    raise CAError(f"unknown key type {key_type!r}; choose {', '.join(KEY_TYPES)}")


def key_type_of(cert: x509.Certificate) -> str:
    """The KEY_TYPES name of a certificate's public key (else its class name)."""
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        curve = public.curve.name
        return {"secp256r1": "ec256", "secp384r1": "ec384"}.get(curve, curve)
    if isinstance(public, rsa.RSAPublicKey):
        return f"rsa{public.key_size}"
    return type(public).__name__


def _resign(
    leaf: x509.Certificate, ca_key: SigningKey, client: bool, key: SigningKey
) -> x509.Certificate:
    """Copy `leaf` with our key, a non-critical SAN and a single-purpose, non-critical EKU."""
    purpose = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(key.public_key())
        .serial_number(leaf.serial_number)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
    )
    for ext in leaf.extensions:
        value: x509.ExtensionType = ext.value
        critical = ext.critical
        if isinstance(value, x509.SubjectAlternativeName):
            critical = False
        elif isinstance(value, x509.ExtendedKeyUsage):
            value, critical = x509.ExtendedKeyUsage([purpose]), False
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(ca_key, hashes.SHA256())


# ---------------------------------------------------------------- file helpers


def _write_files_atomically(items: Iterable[tuple[Path, bytes, int]]) -> None:
    """Write every file to a temp file (mode set before any data), fsync, then rename all."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data, mode in items:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), mode)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
        staged_dirs = {path.parent for _, path in staged}
        staged.clear()
        for directory in staged_dirs:
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CAError(f"{path} does not exist") from None
    except OSError as exc:
        raise CAError(f"cannot read {path}: {exc.strerror}") from None


def load_cert(path: Path) -> x509.Certificate:
    data = _read(path)
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise CAError(f"{path} is not a PEM certificate") from None


def load_key(path: Path) -> SigningKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CAError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def _spki(key: SigningKey | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_matches(cert: x509.Certificate, key: SigningKey) -> bool:
    return _spki(cert) == _spki(key)


# ---------------------------------------------------------------- the CA


class CertAuthority:
    """A CA directory on disk. Build it with `init_ca` (create or reuse) or `load`."""

    def __init__(
        self, directory: Path, cert: x509.Certificate, key: SigningKey, *, created: bool
    ) -> None:
        self.directory = directory
        self.cert = cert
        self.key = key
        self.created = created
        pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._trust = trustme.CA.from_pem(pem, key_pem)

    @classmethod
    def load(cls, directory: Path | str) -> CertAuthority:
        d = Path(directory)
        if not d.is_dir():
            raise CAError(f"CA directory {d} does not exist (run: python -m ca init --dir {d})")
        cert = load_cert(d / CA_CERT)
        key = load_key(d / CA_KEY)
        if not key_matches(cert, key):
            raise CAError(f"{d / CA_KEY} does not match {d / CA_CERT}")
        if cert_kind(cert) != "ca":
            raise CAError(f"{d / CA_CERT} is not a CA certificate")
        return cls(d, cert, key, created=False)

    # -- paths and listing

    def cert_path(self, name: str) -> Path:
        return self.directory / f"{check_name(name)}.crt"

    def key_path(self, name: str) -> Path:
        return self.directory / f"{check_name(name)}.key"

    def issued_names(self) -> list[str]:
        names = []
        for p in sorted(self.directory.glob("*.crt")):
            if p.name != CA_CERT and _NAME_RE.fullmatch(p.stem):
                names.append(p.stem)
        return names

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    # -- issuing

    def issue(
        self,
        name: str,
        ips: Sequence[str] = (),
        dns: Sequence[str] = (),
        lifetime: timedelta = DEFAULT_LIFETIME,
        client: bool = False,
        *,
        overwrite: bool = False,
        now: datetime | None = None,
        key_type: str = DEFAULT_KEY_TYPE,
    ) -> tuple[Path, Path]:
        """Issue NAME.crt/NAME.key. With no IPs or DNS names, NAME itself is the DNS SAN.

        trustme makes the certificate; the key is ours (`key_type`, which trustme's two
        fixed choices do not cover) and the CA re-signs it (see the module)."""
        check_name(name)
        if key_type not in KEY_TYPES:
            raise CAError(f"unknown key type {key_type!r}; choose {', '.join(KEY_TYPES)}")
        ip_list = [str(parse_ip(ip)) for ip in ips]
        dns_list = [check_dns(d) for d in dns]
        if not ip_list and not dns_list:
            try:
                dns_list = [check_dns(name)]
            except CAError:
                raise CAError(f"name {name!r} is not a DNS name: pass --dns or --ip") from None
        crt, key = self.cert_path(name), self.key_path(name)
        if not overwrite and (crt.exists() or key.exists()):
            raise CAError(f"{crt.name} already exists (use renew, or issue --force)")
        when = now or datetime.now(UTC)
        not_before, not_after = lifetime_window(when, lifetime)
        leaf = self._trust.issue_cert(
            *dict.fromkeys(dns_list + ip_list),
            common_name=name,
            organization_name=ORGANIZATION,
            organization_unit_name="client" if client else "server",
            not_before=not_before,
            not_after=not_after,
        )
        raw = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        private = make_key(key_type)
        cert = _resign(raw, self.key, client, private)
        key_pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        chain = b"".join(
            [cert.public_bytes(serialization.Encoding.PEM)]
            + [blob.bytes() for blob in leaf.cert_chain_pems[1:]]
        )
        _write_files_atomically([(key, key_pem, 0o600), (crt, chain, 0o644)])
        return crt, key

    def renew(
        self, name: str, lifetime: timedelta = DEFAULT_LIFETIME, *, now: datetime | None = None
    ) -> tuple[Path, Path]:
        """Re-issue NAME with the SANs, kind and key type of its current certificate (new
        key, serial)."""
        old = load_cert(self.cert_path(name))
        kind = cert_kind(old)
        if kind == "ca":
            raise CAError(f"{name} is a CA certificate; only leaves can be renewed")
        ips, dns = cert_identities(old)
        if not ips and not dns:
            raise CAError(f"{name}.crt has no DNS or IP subjectAltName to renew")
        return self.issue(
            name,
            ips=[str(ip) for ip in ips],
            dns=dns,
            lifetime=lifetime,
            client=kind == "client",
            overwrite=True,
            now=now,
            key_type=kt if (kt := key_type_of(old)) in KEY_TYPES else DEFAULT_KEY_TYPE,
        )

    # -- inspection

    def describe(self, name: str | None = None, *, now: datetime | None = None) -> CertDescription:
        """Describe the CA (name None) or an issued certificate; checks NAME.key matches."""
        when = now or datetime.now(UTC)
        if name is None:
            return describe_cert("ca", self.directory / CA_CERT, self.cert, self.cert, when)
        crt = self.cert_path(name)
        if not crt.exists():
            raise CAError(f"no certificate named {name!r} in {self.directory}")
        cert = load_cert(crt)
        if not key_matches(cert, load_key(self.key_path(name))):
            raise CAError(f"{self.key_path(name)} does not match {crt}")
        return describe_cert(name, crt, cert, self.cert, when)


def init_ca(directory: Path | str) -> CertAuthority:
    """Create a CA in `directory`, or reuse the one already there (never replaced).

    The result's `.created` says which happened. Half a CA (one of the two files) is an error.
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CAError(f"{d} exists and is not a directory")
    crt, key = d / CA_CERT, d / CA_KEY
    if crt.exists() or key.exists():
        if not (crt.exists() and key.exists()):
            present = crt if crt.exists() else key
            raise CAError(f"{present} exists without its pair; refusing to replace it")
        return CertAuthority.load(d)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    trust = trustme.CA(organization_name=ORGANIZATION, organization_unit_name="lb-testbed local CA")
    _write_files_atomically(
        [(key, trust.private_key_pem.bytes(), 0o600), (crt, trust.cert_pem.bytes(), 0o644)]
    )
    ca = CertAuthority.load(d)
    ca.created = True
    return ca
