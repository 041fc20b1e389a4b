"""CPU accounting from /proc/PID/stat.

/proc/PID/stat utime+stime already covers all threads of the process; live child
processes are added by walking the ppid tree so a forking proxy is charged fully.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    utime_ticks: int
    stime_ticks: int

    @property
    def ticks(self) -> int:
        return self.utime_ticks + self.stime_ticks


def parse_proc_stat(text: str) -> ProcStat:
    """Parse one /proc/PID/stat line. comm may hold spaces and ')', so split at the last ')'."""
    head, sep, rest = text.rpartition(")")
    if not sep or "(" not in head:
        raise ValueError("malformed /proc/PID/stat line")
    pid = int(head.split("(", 1)[0].strip())
    fields = rest.split()
    # fields[0] is field 3 (state); utime/stime are fields 14/15 (1-based).
    if len(fields) < 13:
        raise ValueError("truncated /proc/PID/stat line")
    return ProcStat(
        pid=pid, ppid=int(fields[1]), utime_ticks=int(fields[11]), stime_ticks=int(fields[12])
    )


def descendants(root: int, parent_of: Mapping[int, int]) -> set[int]:
    """All pids below root in a pid->ppid map (root excluded). Bounded by the map size."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child != root:
                found.add(child)
                stack.append(child)
    return found


def tree_ticks(root: int, stats: Iterable[ProcStat]) -> int:
    """utime+stime of root plus its live descendants."""
    by_pid = {s.pid: s for s in stats}
    if root not in by_pid:
        raise ProcessLookupError(root)
    pids = {root} | descendants(root, {s.pid: s.ppid for s in by_pid.values()})
    return sum(by_pid[p].ticks for p in pids)


def cpu_us_per_req(ticks_before: int, ticks_after: int, requests: int, clk_tck: int) -> float:
    """CPU microseconds spent per completed request over a measured window."""
    if requests <= 0:
        raise ValueError("no completed requests")
    if ticks_after < ticks_before:
        raise ValueError("CPU counter went backwards (process restarted?)")
    cpu_s = (ticks_after - ticks_before) / clk_tck
    return cpu_s * 1e6 / requests


def _read_all_stats(proc: str = "/proc") -> list[ProcStat]:
    stats: list[ProcStat] = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "stat"), encoding="utf-8") as f:
                stats.append(parse_proc_stat(f.read()))
        except (OSError, ValueError):
            continue  # process vanished between listdir and open
    return stats


def read_tree_ticks(pid: int) -> int:
    """Current CPU ticks of pid and its descendants, read from /proc."""
    return tree_ticks(pid, _read_all_stats())


@dataclass(frozen=True)
class SystemTicks:
    """The machine-wide `cpu` line of /proc/stat: all CPUs, in clock ticks."""

    steal: int
    total: int


def parse_system_ticks(text: str) -> SystemTicks:
    """From /proc/stat: steal is the time the hypervisor ran someone else on our vCPUs."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:9]]  # user..steal; guest time is inside user
            if len(values) < 8:
                raise ValueError("/proc/stat cpu line has no steal field")
            return SystemTicks(steal=values[7], total=sum(values))
    raise ValueError("/proc/stat has no cpu line")


def steal_percent(before: SystemTicks, after: SystemTicks) -> float:
    """Share of all CPU time over the window that the host took (0 on bare metal)."""
    total = after.total - before.total
    return 0.0 if total <= 0 else 100.0 * (after.steal - before.steal) / total


def read_system_ticks(path: str = "/proc/stat") -> SystemTicks:
    with open(path, encoding="utf-8") as f:
        return parse_system_ticks(f.read())
