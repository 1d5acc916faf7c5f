"""API kinds: one behaviour object per `kind:` of the spec.

Each kind says, in one file, how the gateway serves it (`takes_predictions`, `queued`, `model_paths`),
how many replicas it wants and what load drives its autoscaling (`wanted`, `load`), what its replicas
pull work from (`queue`), whether a deploy must prove it loads, and what its idle status reads. The
controller, the gateway and the status code ask the kind instead of comparing names, so a new kind is
one new module here plus its name in the spec's `kind` field.
"""

from __future__ import annotations

from cirrus.kinds.async_ import AsyncKind
from cirrus.kinds.base import Kind, KindHost, Wanted
from cirrus.kinds.batch import BatchKind
from cirrus.kinds.realtime import RealtimeKind
from cirrus.kinds.server import ServerKind
from cirrus.kinds.splitter import SplitterKind
from cirrus.kinds.task import TaskKind

KINDS: dict[str, Kind] = {
    kind.name: kind for kind in (RealtimeKind(), AsyncKind(), BatchKind(), SplitterKind(), ServerKind(), TaskKind())
}

__all__ = ["KINDS", "Kind", "KindHost", "Wanted", "kind_of"]


def kind_of(name: str) -> Kind:
    """The behaviour of `kind: name` (the spec has validated the name)."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown API kind {name!r}; known: {', '.join(KINDS)}") from None
