"""Is the stack ready for a drill? A compose stack just brought up by `make up` is not: the
pair elects its active, discovery finds the backends, the first checks pass, the VIP moves.
Traffic started before that fails for reasons that are not the drill's (318 failures in
the first 2 s of one delay-backend run), so a compose drill waits, bounded, until:

- one balancer is active (or standalone) and every other one answers and is passive;
- the active one lists every backend the drill knows of, each `up` (checked and healthy);
- the service answered through TLS `need_ok` times in a row.

`why_not_ready` is the pure decision; `wait_ready` polls (what to poll is injected).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable

from loadtest.report import StateSample

READY_OK_STREAK = 3  # service answers in a row
READY_INTERVAL_S = 0.25


class NotReady(Exception):
    """The stack did not get ready in time; the message says what was missing last."""


def settled_active(samples: list[StateSample]) -> str | None:
    """The one active (or standalone) balancer of one poll round, when the others all answer
    and are passive; None while the pair is unsettled (a node starting, unreachable, or two
    actives during a start-up race or a stalled peer's takeover)."""
    active = [s.balancer for s in samples if s.role in ("active", "standalone")]
    others = [s for s in samples if s.balancer not in active]
    if len(active) != 1 or any(not s.reachable or s.role != "passive" for s in others):
        return None
    return active[0]


def why_not_ready(
    samples: list[StateSample], ok_streak: int, want: Iterable[str], need_ok: int = READY_OK_STREAK
) -> str | None:
    """None when ready; else one short reason (the first unmet condition)."""
    active = settled_active(samples)
    if active is None:
        roles = ", ".join(
            f"{s.balancer}={s.role if s.reachable else 'unreachable'}" for s in samples
        )
        return f"no single active balancer with passive peers ({roles or 'no answer'})"
    states = next(s.backends for s in samples if s.balancer == active)
    missing = sorted(set(want) - set(states))
    if missing:
        return f"{active} does not list {', '.join(missing)} yet"
    if not states:
        return f"{active} lists no backend"
    unhealthy = sorted(f"{b}={st}" for b, st in states.items() if st != "up")
    if unhealthy:
        return f"{active}: backends not up: {', '.join(unhealthy)}"
    if ok_streak < need_ok:
        return f"the service answered {ok_streak} of {need_ok} requests in a row"
    return None


async def wait_ready(
    poll: Callable[[], Awaitable[list[StateSample]]],
    probe: Callable[[], Awaitable[bool]],
    want: Iterable[str],
    timeout: float,
    sleep: Callable[[float], Awaitable[None]],
    clock: Callable[[], float] = time.monotonic,
    interval: float = READY_INTERVAL_S,
    need_ok: int = READY_OK_STREAK,
) -> float:
    """Poll until `why_not_ready` is None; the seconds it took. NotReady past `timeout`.
    The service is probed only once the balancers are ready (a streak counts from there)."""
    want = list(want)
    start = clock()
    streak = 0
    why = "not polled"
    for _ in range(int(timeout / interval) + 2):  # bounded in count as well as in time
        samples = await poll()
        balancers_ready = why_not_ready(samples, need_ok, want, need_ok) is None
        streak = streak + 1 if balancers_ready and await probe() else 0
        why = why_not_ready(samples, streak, want, need_ok) or ""
        if not why:
            return clock() - start
        if clock() - start >= timeout:
            break
        await sleep(interval)
    raise NotReady(f"not ready after {timeout:.0f} s: {why}")
