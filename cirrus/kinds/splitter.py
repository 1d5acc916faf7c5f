"""`kind: splitter`: no code of its own; the gateway sends each request to one of its `apis` by weight
(and a copy to each shadow). The APIs it names scale themselves; the splitter runs no replicas."""

from __future__ import annotations

from typing import ClassVar

from cirrus.kinds.base import Kind, KindHost, Wanted


class SplitterKind(Kind):
    name: ClassVar[str] = "splitter"
    model_paths: ClassVar[bool] = False
    autoscaled: ClassVar[bool] = False
    runs_replicas: ClassVar[bool] = False
    proves_load: ClassVar[bool] = False

    def wanted(self, host: KindHost, api: str, autoscaled: int, reason: str) -> Wanted:
        return Wanted(0, "a splitter runs no replicas: the APIs it routes to scale themselves")

    def idle_message(self, api: str) -> str:
        return "routes each request to one of its APIs"
