"""What a reload does with a new Config, derived from the schema's `live` metadata."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from balancer.config.schema import SECTIONS, Config, is_live, leaves


@dataclass(frozen=True)
class ReloadResult:
    """`applied`: changed settings now in effect; `restart_needed`: changed settings the
    running process keeps at their old value; `refused`: why the new configuration was
    rejected as a whole (then nothing changed)."""

    applied: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)
    refused: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "applied": list(self.applied),
            "restart_needed": list(self.restart_needed),
            "refused": self.refused,
        }

    def summary(self) -> str:
        """One line for the log and the event timeline."""
        if self.refused is not None:
            return f"refused, keeping the old configuration: {self.refused}"
        if not self.applied and not self.restart_needed:
            return "no changes"
        parts = []
        if self.applied:
            parts.append(f"applied {', '.join(self.applied)}")
        if self.restart_needed:
            parts.append(f"restart needed for {', '.join(self.restart_needed)}")
        return "; ".join(parts)


def diff(old: Config, new: Config) -> ReloadResult:
    """Sort the settings that differ into applied-live and restart-needed."""
    before, after = leaves(old), leaves(new)
    changed = [key for key in after if before[key] != after[key]]
    return ReloadResult(
        applied=[k for k in changed if is_live(k)],
        restart_needed=[k for k in changed if not is_live(k)],
    )


def in_effect(old: Config, new: Config) -> Config:
    """`new` with every restart-only setting kept at its running value in `old`: what the
    process runs with after a reload (so the next reload reports them again)."""
    top: dict[str, Any] = {}
    for f in fields(Config):
        if f.name == "source":
            continue
        if f.name in SECTIONS:
            kept = {
                sub.name: getattr(getattr(old, f.name), sub.name)
                for sub in fields(SECTIONS[f.name])
                if not is_live(f"{f.name}.{sub.name}")
            }
            top[f.name] = replace(getattr(new, f.name), **kept)
        elif not is_live(f.name):
            top[f.name] = getattr(old, f.name)
    return replace(new, **top)
