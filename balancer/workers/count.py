"""How many workers `--workers` means: a number, or `auto` (one per available core).

Pure: the affinity mask size and the cgroup v2 `cpu.max` text are passed in.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

MAX_WORKERS = 64


def quota_cores(cpu_max: str | None) -> int | None:
    """Cores a cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD") allows, rounded up;
    None when there is no quota (or the text is not understood)."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def resolve(setting: str, affinity: int, cpu_max: str | None) -> int:
    """`setting` is "auto" or a validated number; auto = cores in the affinity mask,
    capped by the cgroup quota, at least 1 and at most MAX_WORKERS."""
    if setting != "auto":
        return int(setting)
    cores = max(1, affinity)
    quota = quota_cores(cpu_max)
    if quota is not None:
        cores = min(cores, quota)
    return min(cores, MAX_WORKERS)


def resolve_here(setting: str) -> int:
    """`resolve` with this process's affinity mask and its cgroup's cpu.max."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    return resolve(setting, affinity, _cpu_max())


def _cpu_max() -> str | None:
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    rel = line.partition("::")[2]  # cgroup v2: "0::/path"
    root = Path("/sys/fs/cgroup")
    for path in (root / rel.lstrip("/") / "cpu.max", root / "cpu.max"):
        try:
            return path.read_text().strip()
        except OSError:
            continue
    return None
