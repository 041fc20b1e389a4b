"""`python -m ca`: command line for the local CA (see ca/core.py for the rules).

Every user error is one line on stderr and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from ca.core import (
    DEFAULT_KEY_TYPE,
    DEFAULT_LIFETIME,
    KEY_TYPES,
    CAError,
    CertAuthority,
    CertDescription,
    check_name,
    init_ca,
    load_cert,
)

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus the error; the contract here is a single line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:  # 0 or less would issue a certificate that is already expired
        raise argparse.ArgumentTypeError(f"must be at least 1 (a lifetime), got {value}")
    if value > 36500:
        raise argparse.ArgumentTypeError(f"out of range (1..36500): {value}")
    return value


def _add_lifetime(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--days", type=_count, help="lifetime in days (default 90)")
    group.add_argument("--hours", type=_count, help="lifetime in hours")
    group.add_argument("--minutes", type=_count, help="lifetime in minutes (rotation drills)")


def _lifetime(args: argparse.Namespace) -> timedelta:
    if args.days is not None:
        return timedelta(days=args.days)
    if args.hours is not None:
        return timedelta(hours=args.hours)
    if args.minutes is not None:
        return timedelta(minutes=args.minutes)
    return DEFAULT_LIFETIME


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ca", description="Local certificate authority (trustme).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create the CA, or reuse the one in --dir")
    p.add_argument("--dir", required=True, help="CA directory (created 0700)")

    p = sub.add_parser(
        "issue",
        help="issue a server (or --client) certificate",
        description="Issue NAME.crt and NAME.key, signed by the CA in --dir. With no --dns "
        "and no --ip, NAME itself becomes the certificate's DNS name (SAN).",
    )
    p.add_argument("--dir", required=True)
    p.add_argument("--name", required=True, help="file name stem: NAME.crt / NAME.key")
    p.add_argument("--ip", action="append", default=[], help="IP SAN (repeatable)")
    p.add_argument(
        "--dns",
        action="append",
        default=[],
        help="DNS SAN (repeatable); with no --dns and no --ip, NAME is the DNS SAN",
    )
    p.add_argument("--client", action="store_true", help="clientAuth instead of serverAuth")
    p.add_argument(
        "--key-type",
        choices=KEY_TYPES,
        default=DEFAULT_KEY_TYPE,
        help=f"the leaf's key (default {DEFAULT_KEY_TYPE})",
    )
    p.add_argument("--force", action="store_true", help="replace an existing NAME")
    _add_lifetime(p)

    p = sub.add_parser("show", help="describe the CA and issued certs, or one cert")
    p.add_argument("--dir", required=True)
    p.add_argument("name", nargs="?")

    p = sub.add_parser("export", help="print the CA certificate (PEM) to stdout")
    p.add_argument("--dir", required=True)

    p = sub.add_parser("renew", help="re-issue NAME with the same names and kind")
    p.add_argument("--dir", required=True)
    p.add_argument("name")
    _add_lifetime(p)
    return parser


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_description(d: CertDescription) -> str:
    expiry = _iso(d.not_after) + ("  EXPIRED" if d.expired else "")
    verifies = "yes" if d.verified else f"no: {d.verify_error}"
    rows = [
        ("name", d.name),
        ("file", str(d.path)),
        ("kind", d.kind),
        ("subject", d.subject),
        ("SANs", ", ".join(d.sans) or "-"),
        ("key", d.key_type),
        ("serial", d.serial_hex),
        ("not before", _iso(d.not_before)),
        ("not after", expiry),
        ("sha256", d.fingerprint_sha256),
        ("verifies", verifies),
    ]
    return "\n".join(f"{k + ':':<12}{v}" for k, v in rows)


def _listing_line(ca: CertAuthority, name: str, now: datetime) -> str:
    try:
        cert = load_cert(ca.cert_path(name))
    except CAError as exc:
        return f"  {name:<24}unreadable: {exc}"
    expired = "  EXPIRED" if now > cert.not_valid_after_utc else ""
    try:
        d = ca.describe(name, now=now)
    except CAError as exc:
        return f"  {name:<24}expires {_iso(cert.not_valid_after_utc)}{expired}  ({exc})"
    return f"  {name:<24}{d.kind:<8}expires {_iso(d.not_after)}{expired}  serial {d.serial_hex}"


def run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "init":
        ca = init_ca(args.dir)
        verb = "created new CA" if ca.created else "reusing existing CA"
        d = ca.describe()
        print(f"{verb} in {ca.directory} (sha256 {d.fingerprint_sha256})")
        return 0
    ca = CertAuthority.load(args.dir)
    if cmd == "issue":
        crt, key = ca.issue(
            args.name,
            ips=args.ip,
            dns=args.dns,
            lifetime=_lifetime(args),
            client=args.client,
            overwrite=args.force,
            key_type=args.key_type,
        )
        print(f"issued {crt} and {key}")
    elif cmd == "renew":
        check_name(args.name)
        if not ca.cert_path(args.name).exists():
            raise CAError(f"no certificate named {args.name!r} in {ca.directory}")
        crt, key = ca.renew(args.name, lifetime=_lifetime(args))
        print(f"renewed {crt} (serial {ca.describe(args.name).serial_hex})")
    elif cmd == "export":
        sys.stdout.write(ca.cert_pem().decode("ascii"))
    elif cmd == "show":
        now = datetime.now(UTC)
        if args.name is not None:
            print(format_description(ca.describe(args.name, now=now)))
            return 0
        print(format_description(ca.describe(now=now)))
        names = ca.issued_names()
        print(f"issued:     {len(names)}")
        for name in names:
            print(_listing_line(ca, name, now))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CAError as exc:
        msg = str(exc)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        msg = f"{exc.strerror or exc}{where}"
    except Exception as exc:  # the contract is one line, never a traceback
        msg = f"unexpected {type(exc).__name__}: {exc}"
    print(f"{parser.prog}: error: {' '.join(msg.split())}", file=sys.stderr)
    return EXIT_USAGE
