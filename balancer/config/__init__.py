"""Balancer configuration: one settings model, filled from a TOML file and then from flags,
validated once.

- `schema`: the frozen dataclasses, with each setting's reload behaviour and flag;
- `load`: TOML and flags (and the deprecated names they still accept);
- `validate`: every rule, one line per fault;
- `reload`: what a reload changed, applied or could not apply.

Every limit and timeout is explicit (no hidden library defaults). This package imports no
asyncio, socket or ssl.
"""

from __future__ import annotations

from balancer.config.address import split_hostport
from balancer.config.load import build_parser, from_args, load_toml, parse_backend
from balancer.config.reload import ReloadResult, diff, in_effect
from balancer.config.schema import (
    ALGORITHMS,
    LOG_LEVELS,
    AdminSettings,
    BackendSpec,
    Config,
    ConfigError,
    HealthCheckSettings,
    Limits,
    ListenerSettings,
    OutlierSettings,
    PairSettings,
    RetrySettings,
    Timeouts,
    TLSSettings,
)
from balancer.config.validate import validate

__all__ = [
    "ALGORITHMS",
    "LOG_LEVELS",
    "AdminSettings",
    "BackendSpec",
    "Config",
    "ConfigError",
    "HealthCheckSettings",
    "Limits",
    "ListenerSettings",
    "OutlierSettings",
    "PairSettings",
    "ReloadResult",
    "RetrySettings",
    "TLSSettings",
    "Timeouts",
    "build_parser",
    "diff",
    "from_args",
    "in_effect",
    "load_toml",
    "parse_backend",
    "split_hostport",
    "validate",
]
