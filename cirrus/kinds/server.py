"""`kind: server`: each replica runs a web app (an ASGI app or a command on $CIRRUS_PORT) and the
gateway proxies every method and path under `/<api>/...` to a ready replica, with the realtime
kind's routing, queueing, autoscaling and rolling updates."""

from __future__ import annotations

from typing import ClassVar

from cirrus.kinds.base import Kind


class ServerKind(Kind):
    name: ClassVar[str] = "server"
    takes_predictions: ClassVar[bool] = False  # the gateway proxies requests instead (`proxied`)
    model_paths: ClassVar[bool] = False
    proxied: ClassVar[bool] = True
    forks: ClassVar[bool] = False  # no predictor module to import ahead: no template

    def no_predictions_hint(self, api: str) -> str:
        return f"{api} is a web app: its paths are under /{api}/"
