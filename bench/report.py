"""Result rows, the stdout table and the JSON document (pure: no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    proxy: str
    mode: str
    rps: float | None = None
    cpu_us_per_req: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int | None = None
    requests: int | None = None
    status: str = "ok"  # "ok" or "error"
    reason: str | None = None
    cpu_samples: tuple[float, ...] = ()  # per round, when the row is a median of rounds
    # % of the machine's CPU time the hypervisor gave to other guests during the window;
    # a proxy measured while it was high was measured on a slower machine
    steal_pct: float | None = None
    # --workers N rows: the largest distance of one worker's request count from the even
    # share, in % of that share
    worker_spread_pct: float | None = None

    @classmethod
    def failed(cls, proxy: str, mode: str, reason: str) -> Row:
        return cls(proxy=proxy, mode=mode, status="error", reason=reason)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def median_rows(samples: Sequence[Row]) -> list[Row]:
    """One row per (proxy, mode): the median of its successful rounds.

    A Python proxy's cost per request swings more between runs than HAProxy's,
    so one sample per row can say either pass or fail; interleaved rounds and
    their median are what a claim rests on. Errors and requests add up.
    """
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in samples:
        groups.setdefault((row.proxy, row.mode), []).append(row)
    out = []
    for (proxy, mode), rows in groups.items():
        ok = [r for r in rows if r.status == "ok" and r.cpu_us_per_req is not None]
        if not ok:
            out.append(rows[-1])
            continue

        def med(attr: str, rows: list[Row] = ok) -> float | None:
            values = [getattr(r, attr) for r in rows if getattr(r, attr) is not None]
            return round(_median(values), 3) if values else None

        out.append(
            Row(
                proxy=proxy,
                mode=mode,
                rps=med("rps"),
                cpu_us_per_req=med("cpu_us_per_req"),
                p50_ms=med("p50_ms"),
                p99_ms=med("p99_ms"),
                errors=sum(r.errors or 0 for r in rows),
                requests=sum(r.requests or 0 for r in ok),
                cpu_samples=tuple(r.cpu_us_per_req for r in ok if r.cpu_us_per_req is not None),
                steal_pct=med("steal_pct"),
                worker_spread_pct=med("worker_spread_pct"),
            )
        )
    return out


def cpu_ratio(rows: Sequence[Row], numerator: str, denominator: str) -> dict[str, float | None]:
    """Per mode, numerator's cpu_us_per_req divided by denominator's (None if either is missing)."""
    by_key = {(r.proxy, r.mode): r for r in rows}
    out: dict[str, float | None] = {}
    for mode in dict.fromkeys(r.mode for r in rows):
        num = by_key.get((numerator, mode))
        den = by_key.get((denominator, mode))
        if (
            num is None
            or den is None
            or num.cpu_us_per_req is None
            or not den.cpu_us_per_req  # None or 0.0
        ):
            out[mode] = None
        else:
            out[mode] = round(num.cpu_us_per_req / den.cpu_us_per_req, 3)
    return out


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _short(reason: str | None, limit: int = 110) -> str:
    lines = (reason or "").strip().splitlines()
    first = lines[0] if lines else "unknown"
    return first if len(first) <= limit else first[: limit - 3] + "..."


STEAL_WARN_PCT = 5.0


def describe_sample(r: Row) -> str:
    """One round, for the progress log."""
    if r.status != "ok":
        return f"error: {_short(r.reason)}"
    steal = "-" if r.steal_pct is None else f"{r.steal_pct:.1f}%"
    return f"{_fmt(r.rps, '.0f')} req/s, {_fmt(r.cpu_us_per_req, '.1f')} us/req, steal {steal}"


def spread_pct(counts: Sequence[int]) -> float | None:
    """How far the busiest or idlest worker is from an even share, in % of that share."""
    total = sum(counts)
    if not counts or total <= 0:
        return None
    even = total / len(counts)
    return round(max(abs(c - even) for c in counts) / even * 100, 1)


def _note(r: Row) -> str:
    if r.status != "ok":
        return f"ERROR: {_short(r.reason)}"

    if r.steal_pct is not None and r.steal_pct >= STEAL_WARN_PCT:
        return f"host stole {r.steal_pct:.0f}% of CPU time: a noisy measurement"
    if r.worker_spread_pct is not None:
        return f"workers within {r.worker_spread_pct:.0f}% of an even share"
    return ""


def format_table(rows: Sequence[Row]) -> str:
    header = ("proxy", "mode", "rps", "cpu_us/req", "p50_ms", "p99_ms", "errors", "note")
    lines = [
        (
            r.proxy,
            r.mode,
            _fmt(r.rps, ".0f"),
            _fmt(r.cpu_us_per_req, ".1f"),
            _fmt(r.p50_ms, ".3f"),
            _fmt(r.p99_ms, ".3f"),
            _fmt(r.errors, "d"),
            _note(r),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header[:-1])]
    out = []
    for cells in [header, *lines]:
        parts = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ]
        out.append("  ".join([*parts, cells[-1]]).rstrip())
    return "\n".join(out)


def build_document(
    rows: Sequence[Row], meta: Mapping[str, Any], ratios: Mapping[str, Any]
) -> dict[str, Any]:
    return {"meta": dict(meta), "rows": [asdict(r) for r in rows], "ratios": dict(ratios)}
