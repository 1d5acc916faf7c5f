"""`kind: realtime`: the request waits for its answer; the gateway routes it to a replica."""

from __future__ import annotations

from typing import ClassVar

from cirrus.kinds.base import Kind


class RealtimeKind(Kind):
    name: ClassVar[str] = "realtime"
