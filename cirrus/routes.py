"""The route table: what the control plane tells joined gateways (`cirrus gateway --join`), and the
load they report back. Shared vocabulary of `cirrus/control/gateways.py` (which builds the table and
keeps the reports) and `cirrus/gateway/join.py` (which applies the table and sends the reports), so
neither imports the other; it travels as JSON over the admin API (`GET /v1/gateways/routes`,
`POST /v1/gateways/{id}/load`).

The table is what the controller told its own gateway, API by API: the settings of `set_api`, the
canary of `set_canary`, the reason of `set_unavailable`, the keys of `set_keys`, and the replicas it
added and has not drained, each with its address and the secret a gateway proves it knows when it
connects. Its `version` is `<boot>-<serial>`: a new daemon has a new boot token, and the serial
grows by one each time the table changes, so versions can be ordered within one daemon's life.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from cirrus.spec import ConcurrencySpec, CorsSpec, ProtocolSpec, QueueSpec, SplitTarget
from cirrus.types import ApiKey

GATEWAY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_REPORTED = 10_000  # APIs or replicas one load report may name
Name = Annotated[str, Field(max_length=200)]
Load = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]


class RouteReplica(BaseModel):
    """A replica the gateway routes to."""

    id: str
    revision: int
    address: str = Field(description='where it listens: "tcp:HOST:PORT" or "unix:PATH"')
    secret: str = Field(description="base64 of the secret a gateway proves it knows when it connects")
    openapi: dict[str, Any] | None = Field(None, description="its predictor's request/response schemas, if typed")


class ApiRoute(BaseModel):
    """One API as the gateway serves it."""

    name: str
    kind: str = "realtime"
    concurrency: ConcurrencySpec
    multi_model: bool = False
    auth_required: bool = False
    cors: CorsSpec | None = None
    split: list[SplitTarget] | None = Field(None, description="a splitter's APIs")
    sticky_header: str | None = None
    protocol: ProtocolSpec | None = Field(None, description="the standard protocol it also speaks (v2, openai)")
    access_log: bool = Field(False, description="write an access log line per request")
    serving: int | None = Field(None, description="the revision that serves (set while a canary runs beside it)")
    canary: int | None = Field(None, description="the canary revision (None: no canary)")
    canary_percent: float = Field(0.0, description="the share of requests the canary gets")
    unavailable: str | None = Field(None, description="while set, requests get 503 with it at once")
    queue: QueueSpec | None = Field(None, description="an async API's queue settings (its accepts need them)")
    replicas: list[RouteReplica] = Field(default_factory=list)


class RouteTable(BaseModel):
    """`GET /v1/gateways/routes`: every API a gateway serves, the API keys, the queue store."""

    version: str = Field(description="<boot>-<serial>: changes whenever anything below does")
    apis: list[ApiRoute] = Field(default_factory=list)
    keys: list[ApiKey] = Field(default_factory=list, description="the API keys (digests, never the keys)")
    queue_store: str | None = Field(
        None,
        description="the Redis queue store URL async APIs are accepted into (None: the daemon's store is a "
        "SQLite file only its node has, so a joined gateway serves no async API)",
    )


class LoadReport(BaseModel):
    """`POST /v1/gateways/{id}/load`: what one joined gateway carries now (sent every ~0.5 s)."""

    model_config = ConfigDict(extra="forbid")

    apis: dict[Name, Load] = Field(
        default_factory=dict, max_length=MAX_REPORTED, description="per API: requests in flight plus queued"
    )
    cold: list[Name] = Field(
        default_factory=list,
        max_length=MAX_REPORTED,
        description="APIs a request came to at zero ready replicas since the last report (start one now)",
    )
    version: str | None = Field(None, max_length=200, description="the route table version it has applied")
    replicas: list[Name] = Field(
        default_factory=list,
        max_length=MAX_REPORTED,
        description="the replicas it routes to, connects to or still drains (a replica is stopped only "
        "once no gateway holds it)",
    )
    url: str | None = Field(None, max_length=2000, description="where it serves, for people")


class LoadAccepted(BaseModel):
    gateways: int = Field(description="joined gateways reporting now")


class JoinedGateway(BaseModel):
    """`GET /v1/gateways`: one joined gateway, as its last report tells."""

    id: str
    url: str | None = None
    seen_s_ago: float
    version: str | None = None
    apis: dict[str, float] = Field(default_factory=dict)


class GatewayList(BaseModel):
    gateways: list[JoinedGateway]


def parse_version(version: str | None) -> tuple[str, int] | None:
    """(boot, serial) of a table version; None when it is not one."""
    if not version:
        return None
    boot, sep, serial = version.rpartition("-")
    return (boot, int(serial)) if sep and serial.isdigit() else None
