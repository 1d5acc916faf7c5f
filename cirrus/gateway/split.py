"""Weighted choices of the gateway: a splitter's API for each request, and a canary's share.

`WeightedPicker` is smooth weighted round-robin (as nginx's upstreams): over any run of requests the
share each target gets is within one request of its weight, deterministically, so weights hold
exactly over 10,000 requests as over 100. `sticky_index` maps a header's value to a target by weight
through a hash, so the same caller always lands on the same target while the weights stay the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from cirrus.gateway.metrics import ApiMetrics

_STICKY_BUCKETS = 1 << 32


class WeightedPicker:
    """Picks indices in proportion to `weights` (non-negative, at least one positive)."""

    def __init__(self, weights: Sequence[float]) -> None:
        if not weights or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, not {list(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self._total = sum(self.weights)
        self._current = [0.0] * len(self.weights)

    def pick(self) -> int:
        current = self._current
        best = 0
        for index, weight in enumerate(self.weights):
            current[index] += weight
            if current[index] > current[best]:
                best = index
        current[best] -= self._total
        return best


def sticky_index(key: bytes, weights: Sequence[float]) -> int:
    """The target for a sticky key: a hash of it, placed on the weights' cumulative ranges."""
    point = int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big") / _STICKY_BUCKETS
    total = sum(weights)
    edge = 0.0
    for index, weight in enumerate(weights):
        edge += weight / total
        if point < edge and weight > 0:
            return index
    return max(i for i, w in enumerate(weights) if w > 0)


@dataclass
class Split:
    """A splitter's routing: its weighted targets, its shadows, and what each got."""

    targets: tuple[str, ...]
    weights: tuple[float, ...]
    shadows: tuple[str, ...] = ()
    sticky_header: bytes | None = None  # lower-case header name
    picker: WeightedPicker = field(init=False)
    sent: dict[str, ApiMetrics] = field(init=False)  # per target and shadow: statuses and latencies
    shadows_dropped: int = 0  # copies not sent: the shadow was full, cold or not deployed

    def __post_init__(self) -> None:
        self.picker = WeightedPicker(self.weights)
        self.sent = {name: ApiMetrics() for name in (*self.targets, *self.shadows)}

    def choose(self, headers: Sequence[tuple[bytes, bytes]]) -> str:
        """The API this request goes to."""
        if self.sticky_header is not None:
            for key, value in headers:
                if key == self.sticky_header:
                    return self.targets[sticky_index(value, self.weights)]
        return self.targets[self.picker.pick()]

    def same_as(self, other: Split) -> bool:
        return (self.targets, self.weights, self.shadows, self.sticky_header) == (
            other.targets,
            other.weights,
            other.shadows,
            other.sticky_header,
        )
