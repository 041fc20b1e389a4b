"""The balancer's event log vocabulary: one enum of kinds and the event record. Pure.

The values are the strings the admin API, the dashboard and the logs show; renaming one is
an API change. tests/balancer/test_events.py keeps the dashboard's list in step with this one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class EventKind(enum.StrEnum):
    # backends: membership and admin state
    ADDED = "added"
    DRAINING = "draining"  # removed from the configuration or DNS; drains, then goes
    REMOVED = "removed"
    DRAIN = "drain"  # admin actions
    ENABLE = "enable"
    MAINT = "maint"
    WEIGHT = "weight"
    # backends: health
    UP = "up"
    DOWN = "down"
    EJECTED = "ejected"
    RECOVERED = "recovered"
    RESCUED = "rescued"
    # the balancer as a whole
    ALGORITHM = "algorithm"
    POOL_MODE = "pool-mode"
    RELOAD = "reload"
    RELOAD_REFUSED = "reload-refused"
    DISCOVERY = "discovery"
    ROLE = "role"
    SHUTDOWN = "shutdown"
    WORKER = "worker"  # a worker process started, exited or was restarted


@dataclass(frozen=True)
class Event:
    ts: float
    kind: EventKind
    backend: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        kind = str(self.kind)  # a plain str for json and for equality with old clients
        return {"ts": self.ts, "kind": kind, "backend": self.backend, "detail": self.detail}
