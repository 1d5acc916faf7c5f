"""`kind: async`: the gateway stores the request and answers 202 with an id; replicas pull it from the
queue store with a lease; the backlog, not the gateway's in-flight count, drives autoscaling."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from cirrus.kinds.base import Kind, KindHost
from cirrus.wire import QueueConfig, WebhookPolicy

if TYPE_CHECKING:
    from cirrus.spec import ApiSpec


class AsyncKind(Kind):
    name: ClassVar[str] = "async"
    queued: ClassVar[bool] = True
    model_paths: ClassVar[bool] = False
    replica_timeout: ClassVar[bool] = True

    def load(self, host: KindHost, api: str, desired: int) -> float:
        backlog = host.queue_backlog(api)
        return float(desired) if backlog is None else backlog

    def queue(self, spec: ApiSpec, queue_url: str | None) -> QueueConfig:
        if queue_url is None:
            raise RuntimeError("async APIs need a queue store; the controller has none")
        webhooks = spec.queue.webhooks
        return QueueConfig(
            store_url=queue_url,
            lease_s=spec.queue.lease_s,
            timeout_s=spec.concurrency.timeout_s,
            max_concurrency=spec.concurrency.max_concurrency,
            webhooks=None
            if webhooks is None
            else WebhookPolicy(allowed_hosts=list(webhooks.allowed_hosts), allow_private=webhooks.allow_private),
        )
