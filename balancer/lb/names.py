"""Backend names: the rule for a valid name, and names from Docker's reverse DNS.

A backend has one name users see everywhere (API, dashboard, metric labels, access log,
events, admin URLs). Docker's embedded DNS answers reverse lookups with the container
name and network: `lbtestbed_backend_3.lbtestbed_lbnet` (Compose v1, `_` separators) or
`lbtestbed-backend-3.lbtestbed_lbnet` (Compose v2, `-`). `replica_name` turns either into
`backend-3`, the compose service and its replica number, the name the container's own
demo backend also uses for X-Backend (backends/cli.py).
"""

from __future__ import annotations

import re

# safe in a URL path, a Prometheus label, a JSON log line and a shell word; no `:` so a
# name can never be mistaken for (or collide with) an unnamed backend's `host:port`
NAME_RULE = "1-63 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def replica_name(reverse_name: str, service: str) -> str | None:
    """`<project>{_|-}<service>{_|-}<N>[.<network>]` -> `<service>-<N>`; None otherwise.

    The project may itself contain `_` or `-` (v2 keeps `lb-testbed`), so the service
    is matched from the right, where the replica number is; a name of another service,
    or one without a replica number, is not a replica of `service`.
    """
    label = reverse_name.strip().rstrip(".").split(".", 1)[0]
    if not service or not label:
        return None
    m = re.fullmatch(rf"(?:.+[_-])?{re.escape(service)}[_-]([0-9]+)", label, re.IGNORECASE)
    if m is None:
        return None
    return f"{service}-{int(m.group(1))}"
