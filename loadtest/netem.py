"""Network impairments with `tc netem`: one value (`Impairment`) and apply/clear, locally
on a veth of a `harness.netns.NetNs`, or in compose from a short-lived helper container
that joins a backend container's network namespace (backends stay unprivileged).

    ns = NetNs.create()                               # the backend runs inside ns
    apply_local(ns.host_if, Impairment(delay_ms=200)) # host -> backend traffic delayed
    clear_local(ns.host_if)

The qdisc sits on the egress of the given device: on the host end of the veth it delays
what the balancer sends to the backend (requests, connection set-up), which is what the
drills measure. Drills for delay/loss/bandwidth build on these functions.

Kernels without sch_netem (some VM kernels, this project's CI) get the same impairment
from `loadtest.nfq_impair` (method "nfqueue": iptables NFQUEUE + a userspace delay holder,
iptables statistic for loss, tbf for rate). The first apply probes netem once; the
result of `apply_local` says which method is in use. LBT_IMPAIR_METHOD=nfqueue forces
the fallback (to test it where netem exists).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from harness.netns import NetNsError, require_tools, run
from loadtest import nfq_impair

COMPOSE_IMAGE = "lb-testbed:latest"  # our image has iproute2
DOCKER_TIMEOUT_S = 60.0  # a helper container's start and exit
METHOD_ENV = "LBT_IMPAIR_METHOD"  # "netem" or "nfqueue"; unset: netem if the kernel has it
log = logging.getLogger(__name__)
_netem_ok: bool | None = None  # probed by the first apply_local


class NetemUnavailable(NetNsError):
    """The kernel has no sch_netem (some VM kernels): nothing can be impaired here."""


@dataclass(frozen=True)
class Impairment:
    """What netem does to every packet: delay (± jitter), random loss, a rate limit.
    Zero means "not impaired" for that field."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_kbit: int = 0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.rate_kbit < 0:
            raise ValueError("netem: delay, jitter and rate cannot be negative")
        if self.jitter_ms and not self.delay_ms:
            raise ValueError("netem: jitter needs a delay")
        if not 0 <= self.loss_pct <= 100:
            raise ValueError("netem: loss_pct must be within [0, 100]")
        if not (self.delay_ms or self.loss_pct or self.rate_kbit):
            raise ValueError("netem: an impairment needs a delay, a loss or a rate")

    def netem_args(self) -> list[str]:
        """The `netem` options, e.g. ['delay', '200ms', '20ms', 'loss', '1%']."""
        args: list[str] = []
        if self.delay_ms:
            args += ["delay", f"{self.delay_ms:g}ms"]
            if self.jitter_ms:
                args.append(f"{self.jitter_ms:g}ms")
        if self.loss_pct:
            args += ["loss", f"{self.loss_pct:g}%"]
        if self.rate_kbit:
            args += ["rate", f"{self.rate_kbit}kbit"]
        return args

    def describe(self) -> str:
        return " ".join(self.netem_args())


def apply_argv(dev: str, imp: Impairment) -> list[str]:
    """`tc qdisc replace`: applying twice replaces, never stacks."""
    return ["tc", "qdisc", "replace", "dev", dev, "root", "netem", *imp.netem_args()]


def clear_argv(dev: str) -> list[str]:
    return ["tc", "qdisc", "del", "dev", dev, "root"]


def _in_ns(netns: str | None, argv: list[str]) -> list[str]:
    return argv if netns is None else ["ip", "netns", "exec", netns, *argv]


def method() -> str:
    """The method apply_local uses: "netem", "nfqueue", or "probe" before the first apply."""
    forced = os.environ.get(METHOD_ENV, "")
    if forced in ("netem", "nfqueue"):
        return forced
    return "probe" if _netem_ok is None else ("netem" if _netem_ok else "nfqueue")


def apply_local(dev: str, imp: Impairment, *, netns: str | None = None) -> dict[str, Any]:
    """Impair the egress of `dev` (in namespace `netns`, if given). Root and tc needed.
    netem when the kernel has it (probed once), else the nfqueue fallback; returns
    {"method": ..., "impairment": {...}, ...} for logs and reports."""
    global _netem_ok
    require_tools("tc", "ip")
    how = method()
    if how != "nfqueue":
        try:
            run(_in_ns(netns, apply_argv(dev, imp)))
            _netem_ok = True
            return {"method": "netem", "dev": dev, "impairment": asdict(imp)}
        except NetNsError as exc:
            if "qdisc kind is unknown" not in str(exc):
                raise
            if how == "netem":
                raise NetemUnavailable("the kernel has no netem qdisc (sch_netem)") from None
            _netem_ok = False
            log.warning("no sch_netem in this kernel: impairing with nfqueue/iptables/tbf")
    info = nfq_impair.apply(
        dev,
        delay_ms=imp.delay_ms,
        jitter_ms=imp.jitter_ms,
        loss_pct=imp.loss_pct,
        rate_kbit=imp.rate_kbit,
        netns=netns,
    )
    return {**info, "dev": dev, "impairment": asdict(imp)}


def clear_local(dev: str, *, netns: str | None = None) -> bool:
    """Remove the impairment of `dev`; False when there was none (or dev is gone)."""
    require_tools("tc", "ip")
    if method() == "netem":
        return run(_in_ns(netns, clear_argv(dev)), check=False).returncode == 0
    if "netem" in shown(dev, netns=netns):
        return run(_in_ns(netns, clear_argv(dev)), check=False).returncode == 0
    try:
        return nfq_impair.clear(dev, netns=netns)
    except NetNsError:  # not a harness.netns veth: only a qdisc could be there
        return run(_in_ns(netns, clear_argv(dev)), check=False).returncode == 0


def shown(dev: str, *, netns: str | None = None) -> str:
    """`tc qdisc show dev DEV` (empty when the device is gone)."""
    res = run(_in_ns(netns, ["tc", "qdisc", "show", "dev", dev]), check=False)
    return res.stdout.strip()


def impaired(dev: str, *, netns: str | None = None) -> bool:
    return "netem" in shown(dev, netns=netns) or nfq_impair.active(dev, netns=netns)


# compose: act from a helper container in the backend container's network namespace -------
def compose_argv(
    container: str, tc_argv: Sequence[str], *, image: str = COMPOSE_IMAGE
) -> list[str]:
    """`docker run` of a short-lived helper with NET_ADMIN in `container`'s namespace."""
    return [
        "docker",
        "run",
        "--rm",
        "--network",
        f"container:{container}",
        "--cap-add",
        "NET_ADMIN",
        "--user",  # the image runs as `lb`: NET_ADMIN only takes effect for root
        "0",
        "--entrypoint",
        "tc",
        image,
        *tc_argv[1:],
    ]


def apply_compose(container: str, imp: Impairment, *, dev: str = "eth0") -> dict[str, Any]:
    """Impair a compose container's `dev` (its egress: the backend's responses): netem, or
    the nfqueue method without sch_netem (the image needs iptables). Written for the
    compose drills; not yet exercised against a running compose stack."""
    global _netem_ok
    how = method()
    if how != "nfqueue":
        try:
            run(compose_argv(container, apply_argv(dev, imp)), timeout=DOCKER_TIMEOUT_S)
            _netem_ok = True
            return {"method": "netem", "container": container, "impairment": asdict(imp)}
        except NetNsError as exc:
            if "qdisc kind is unknown" not in str(exc):
                raise NetNsError(f"netem in {container}: {exc}") from None
            if how == "netem":
                raise NetemUnavailable("the kernel has no netem qdisc (sch_netem)") from None
            _netem_ok = False
    info = nfq_impair.apply_compose(
        container,
        delay_ms=imp.delay_ms,
        jitter_ms=imp.jitter_ms,
        loss_pct=imp.loss_pct,
        rate_kbit=imp.rate_kbit,
        image=COMPOSE_IMAGE,
        dev=dev,
    )
    return {**info, "impairment": asdict(imp)}


def clear_compose(container: str, *, dev: str = "eth0") -> bool:
    if method() == "netem":
        argv = compose_argv(container, clear_argv(dev))
        return run(argv, check=False, timeout=DOCKER_TIMEOUT_S).returncode == 0
    return nfq_impair.clear_compose(container, image=COMPOSE_IMAGE, dev=dev)
