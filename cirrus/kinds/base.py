"""What every kind answers (`Kind`), and what a kind may ask of the control plane (`KindHost`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from cirrus.spec import ApiSpec
    from cirrus.wire import QueueConfig


class KindHost(Protocol):
    """The control plane's facts a kind decides from (the controller implements it)."""

    def gateway_load(self, api: str) -> float:
        """Requests in flight in replicas plus queued in the gateway."""
        ...

    def queue_backlog(self, api: str) -> float | None:
        """Queued plus leased requests of an API in the queue store (None: unknown right now)."""
        ...

    def running_job(self, api: str) -> tuple[str, int] | None:
        """(id, workers wanted) of the API's running batch job, if one runs."""
        ...


@dataclass(frozen=True)
class Wanted:
    """How many replicas a kind wants, why, and which job they work for (None: no job)."""

    replicas: int
    reason: str
    job: str | None = None


class Kind:
    """The realtime behaviour; other kinds override what differs."""

    name: ClassVar[str] = "realtime"
    # The gateway: `POST /<api>` predicts; `queued`: the request is stored and answered 202 with an id
    # (`GET /<api>/<id>` reads it); `model_paths`: `POST /<api>/<model>` names a model (multi-model APIs).
    takes_predictions: ClassVar[bool] = True
    queued: ClassVar[bool] = False
    model_paths: ClassVar[bool] = True
    # The control plane: `autoscaled`: the autoscaler sets the replicas (else `wanted` does);
    # `proves_load`: a deploy starts one replica even when none is wanted, to show the code loads;
    # `runs_jobs`: `cirrus jobs submit` works on it; `replica_timeout`: replicas enforce `timeout_s`
    # themselves (so changing it restarts them), else the gateway does (a scale-only change).
    autoscaled: ClassVar[bool] = True
    runs_replicas: ClassVar[bool] = True  # False: no predictor, no replicas, no template (a splitter)
    proves_load: ClassVar[bool] = True
    runs_jobs: ClassVar[bool] = False
    replica_timeout: ClassVar[bool] = False
    # `proxied`: the gateway proxies every method and path under /<api>/ to a replica's web app
    # (kind server); `forks`: replicas fork from a template that imported the predictor module.
    proxied: ClassVar[bool] = False
    forks: ClassVar[bool] = True

    def load(self, host: KindHost, api: str, desired: int) -> float:
        """The autoscaler's in-flight measure."""
        return host.gateway_load(api)

    def wanted(self, host: KindHost, api: str, autoscaled: int, reason: str) -> Wanted:
        """The replicas to run, given the autoscaler's answer."""
        return Wanted(autoscaled, reason)

    def queue(self, spec: ApiSpec, queue_url: str | None) -> QueueConfig | None:
        """Where replicas pull requests from (None: the gateway sends them)."""
        return None

    def idle_message(self, api: str) -> str:
        """`cirrus get` at zero replicas."""
        return "scaled to zero; the next request starts a replica"

    def no_predictions_hint(self, api: str) -> str:
        """The 405 answer to `POST /<api>` on a kind that takes no predictions."""
        return f"{api} takes no predictions"
