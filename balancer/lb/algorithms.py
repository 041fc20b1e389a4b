"""Algorithms (the lb policy): pure cores that pick one backend out of the eligible set.

No I/O, no clock. Randomness comes from an injected ``random.Random`` so tests
(and the active/passive pair) are reproducible. ``pick()`` runs once per
request, so each implementation is a single O(n) pass with no per-call
allocation beyond what hashing needs.
"""

from __future__ import annotations

import hashlib
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Protocol, TypeVar

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "LeastConnections",
    "RoundRobin",
    "SourceHash",
    "Target",
    "make_algorithm",
]


class Target(Protocol):
    """What the data path's Backend exposes to an algorithm."""

    @property
    def id(self) -> str: ...

    @property
    def weight(self) -> float:
        """Effective weight (> 0), slow start already applied."""
        ...

    @property
    def in_flight(self) -> int: ...


T = TypeVar("T", bound=Target)


class Algorithm(ABC):
    """Picks a backend from ``targets`` (the eligible set, already filtered).

    Every algorithm takes the same constructor argument so ``make_algorithm``
    can build any of them; ``rng=None`` means a fresh unseeded generator.
    """

    name: ClassVar[str]

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    @abstractmethod
    def pick(self, targets: Sequence[T], key: bytes | None = None) -> T | None:
        """Return the chosen target, or None when ``targets`` is empty."""

    def forget(self, target_id: str) -> None:
        """Drop per-target state when a backend is removed from the cluster."""
        return None


class RoundRobin(Algorithm):
    """Smooth weighted round robin, exactly nginx's algorithm.

    Each pick: every eligible target's current weight grows by its effective
    weight; the largest wins (first one on ties, as nginx) and loses the total.
    State is keyed by id, so targets may join or leave the eligible set between
    calls: a newcomer starts at 0, an absent target keeps its state untouched
    (nginx does the same for peers marked down) until ``forget()``.
    """

    name: ClassVar[str] = "round-robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._current: dict[str, float] = {}

    def pick(self, targets: Sequence[T], key: bytes | None = None) -> T | None:
        current = self._current
        best: T | None = None
        best_cw = 0.0
        total = 0.0
        for t in targets:
            w = t.weight
            cw = current.get(t.id, 0.0) + w
            current[t.id] = cw
            total += w
            if best is None or cw > best_cw:
                best = t
                best_cw = cw
        if best is not None:
            current[best.id] = best_cw - total
        return best

    def forget(self, target_id: str) -> None:
        self._current.pop(target_id, None)


class LeastConnections(Algorithm):
    """Weighted least connections: minimise ``(in_flight + 1) / weight``.

    The ``+ 1`` makes weights matter when everything is idle (an idle heavy
    backend beats an idle light one). Exact ties are broken uniformly at random
    with the injected rng (reservoir sampling, so no list is built); the rng is
    only consulted when there is a tie.
    """

    name: ClassVar[str] = "least-connections"

    def pick(self, targets: Sequence[T], key: bytes | None = None) -> T | None:
        rand = self._rng.random
        best: T | None = None
        best_score = math.inf
        ties = 0
        for t in targets:
            score = (t.in_flight + 1) / t.weight
            if best is None or score < best_score:
                best = t
                best_score = score
                ties = 1
            elif score == best_score:
                ties += 1
                if rand() * ties < 1.0:
                    best = t
        return best


_TWO_POW_MINUS_53 = 2.0**-53


def _hrw_score(digest: bytes, weight: float) -> float:
    # Top 53 bits + 0.5 keeps h strictly inside (0, 1): ln(h) is finite and < 0.
    h = ((int.from_bytes(digest, "big") >> 11) + 0.5) * _TWO_POW_MINUS_53
    return -weight / math.log(h)


class SourceHash(Algorithm):
    """Weighted rendezvous (highest random weight) hashing on a caller-given key.

    For each target ``h = blake2b-64(id + b"\\0" + key)`` mapped into (0, 1) and
    ``score = -weight / ln(h)``; the highest score wins. Removing a backend only
    moves the keys it owned, and each backend gets a share proportional to its
    weight. blake2b is stable across processes, so both balancers of a pair map
    a key the same way. A hasher pre-fed with the id prefix is cached per id.

    ``key=None`` (e.g. the header or cookie is missing): falls back to a
    weighted random pick with the injected rng, so such requests still spread
    by weight instead of all landing on one backend.
    """

    name: ClassVar[str] = "source-hash"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._prefix: dict[str, hashlib.blake2b] = {}

    def _prefix_hasher(self, target_id: str) -> hashlib.blake2b:
        h = hashlib.blake2b(target_id.encode("utf-8") + b"\0", digest_size=8)
        self._prefix[target_id] = h
        return h

    def pick(self, targets: Sequence[T], key: bytes | None = None) -> T | None:
        if key is None:
            return self._pick_random(targets)
        prefix = self._prefix
        best: T | None = None
        best_digest = b""
        best_weight = 0.0
        best_score = -1.0  # < 0: not computed yet
        for t in targets:
            base = prefix.get(t.id)
            if base is None:
                base = self._prefix_hasher(t.id)
            h = base.copy()
            h.update(key)
            digest = h.digest()
            weight = t.weight
            if best is None:
                best, best_digest, best_weight, best_score = t, digest, weight, -1.0
            elif weight == best_weight:
                # Same weight: the score is monotonic in h, and big-endian digests compare
                # like the integers they encode, so skip the float maths (the common case).
                if digest > best_digest:
                    best, best_digest, best_score = t, digest, -1.0
            else:
                if best_score < 0.0:
                    best_score = _hrw_score(best_digest, best_weight)
                score = _hrw_score(digest, weight)
                if score > best_score:
                    best, best_digest, best_weight, best_score = t, digest, weight, score
        return best

    def _pick_random(self, targets: Sequence[T]) -> T | None:
        if not targets:
            return None
        total = 0.0
        for t in targets:
            total += t.weight
        point = self._rng.random() * total
        for t in targets:
            point -= t.weight
            if point < 0.0:
                return t
        return targets[-1]  # float rounding left a sliver past the last target

    def forget(self, target_id: str) -> None:
        self._prefix.pop(target_id, None)


# the one registry: config validates names against it, the admin API and the flags list it
ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (RoundRobin, LeastConnections, SourceHash)
}


def make_algorithm(name: str, rng: random.Random) -> Algorithm:
    """Build the algorithm called ``name``; ValueError lists the valid names."""
    try:
        cls = ALGORITHMS[name]
    except KeyError:
        valid = ", ".join(sorted(ALGORITHMS))
        raise ValueError(f"unknown algorithm {name!r}; expected one of: {valid}") from None
    return cls(rng)
