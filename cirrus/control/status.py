"""What `cirrus get` shows: an API's status record, built from the controller's state."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from cirrus.types import ApiStatus, ApiStatusName, EnvStatus, ModelStatus, ReplicaState, ReplicaStatus

if TYPE_CHECKING:
    from collections.abc import Mapping

    from cirrus.control.controller import ApiState, GatewayControl, Replica
    from cirrus.control.envs import EnvBuild
    from cirrus.control.models import ModelFetch
    from cirrus.runtimes.base import Placement
    from cirrus.store.base import QueueStore


def _devices(replica: Replica, placement: Placement | None) -> dict[str, str]:
    if placement is not None and placement.devices:
        return dict(placement.devices)
    return dict(replica.reservation.devices) if replica.reservation is not None else {}


def _reason(replica: Replica, placement: Placement | None) -> str | None:
    """Why a replica is not serving yet: waiting for the controller to place it, or for the runtime."""
    if replica.state is ReplicaState.PENDING:
        return replica.reason
    if replica.state is ReplicaState.STARTING and placement is not None:
        return placement.waiting
    return None


def _health(
    state: ApiState, models: list[ModelFetch], env: EnvBuild | None = None
) -> tuple[ApiStatusName, str | None, int]:
    """(status, message, pending replicas) of the revision the API rolls to."""
    model_failure = next((m.describe() for m in models if m.state == "failed"), None)
    if model_failure is None and env is not None and env.state == "failed":
        model_failure = env.describe()  # like a model that cannot be fetched: nothing of it can start
    current = [r for r in state.replicas.values() if r.revision == state.revision]
    ready = sum(1 for r in current if r.state is ReplicaState.READY)
    pending = [r for r in current if r.state is ReplicaState.PENDING]
    old_serving = any(r.revision != state.revision and r.state is ReplicaState.READY for r in state.replicas.values())
    failing = [r for r in current if r.consecutive_failures > 0]
    message = None
    if state.canary is not None and ready and state.serving is not None:
        status = ApiStatusName.CANARY
        message = (
            f"revision {state.revision} takes {state.canary:g}% of requests beside revision "
            f"{state.serving.revision}: `cirrus promote {state.name}` or `cirrus rollback {state.name}`"
        )
    elif ready >= state.desired and not old_serving:
        status = ApiStatusName.LIVE
        if state.desired == 0:
            message = state.kind.idle_message(state.name)
    elif ready == 0 and model_failure is not None:
        status = ApiStatusName.ERROR
        message = model_failure
    elif ready == 0 and failing:
        status = ApiStatusName.ERROR
        message = failing[0].last_error
        if old_serving:
            message = f"revision {state.revision} does not start (an older revision still serves): {message}"
    elif failing:
        status = ApiStatusName.DEGRADED
        message = failing[0].last_error
    elif old_serving or ready:
        status = ApiStatusName.UPDATING
    else:
        status = ApiStatusName.STARTING
    if pending and message is None:
        message = f"{len(pending)} replica(s) pending: {pending[0].reason or 'waiting to be placed'}"
    return status, message, len(pending)


def api_status(
    state: ApiState,
    gateway: GatewayControl,
    endpoint: str,
    models: list[ModelFetch] | None = None,
    placements: Mapping[str, Placement | None] | None = None,
    env: EnvBuild | None = None,
) -> ApiStatus:
    """`placements`: where the runtime put each started replica (or why it waits), by replica id;
    `env`: the build of the revision's own Python environment, if it has one."""
    models = models or []
    placements = placements or {}
    status, message, pending = _health(state, models, env)
    ready = sum(1 for r in state.replicas.values() if r.revision == state.revision and r.state is ReplicaState.READY)
    requests, p50, p99, in_flight, queued, replica_load = gateway.api_metrics(state.name, time.time())
    cold_starts, last_cold_start = gateway.cold_starts(state.name)
    batch_mean, slot_wait, predict = gateway.inference_metrics(state.name, time.time())
    return ApiStatus(
        models=[
            ModelStatus(
                name=m.name,
                source=m.source,
                state=m.state,
                done_bytes=m.done_bytes,
                total_bytes=m.total_bytes,
                path=m.path,
                error=m.error,
            )
            for m in models
        ],
        environment=None
        if env is None
        else EnvStatus(
            state=env.state,
            key=env.key,
            python=env.python,
            error=env.error,
            log=env.log,
            reused=env.reused,
            build_s=env.build_s,
        ),
        name=state.name,
        kind=state.stored.deployment.spec.kind,
        status=status,
        revision=state.revision,
        replicas_ready=ready,
        replicas_desired=state.desired,
        replicas_pending=pending,
        requests_last_minute=requests,
        p50_ms=None if p50 is None else round(p50 * 1000, 3),
        p99_ms=None if p99 is None else round(p99 * 1000, 3),
        in_flight=in_flight,
        queued=queued,
        endpoint=endpoint,
        message=message,
        autoscaler=state.scaler.reason,
        cold_starts=cold_starts,
        last_cold_start_s=None if last_cold_start is None else round(last_cold_start, 3),
        batch_size_mean=None if batch_mean is None else round(batch_mean, 2),
        slot_wait_p50_ms=None if slot_wait is None else round(slot_wait * 1000, 3),
        predict_p50_ms=None if predict is None else round(predict * 1000, 3),
        canary_percent=state.canary,
        traffic=gateway.traffic(state.name, time.time()),
        replicas=[
            ReplicaStatus(
                id=r.id,
                revision=r.revision,
                state=r.state,
                pid=r.pid,
                restarts=r.restarts,
                in_flight=replica_load.get(r.id, 0),
                last_error=r.last_error,
                started_at=r.started_at,
                reason=_reason(r, placements.get(r.id)),
                devices=_devices(r, placements.get(r.id)),
                node=None if (where := placements.get(r.id)) is None else where.node,
            )
            for r in sorted(state.replicas.values(), key=lambda r: (r.revision, r.id))
        ],
    )


def backlog_fields(store: QueueStore, api: str, now: float) -> dict[str, Any]:
    """An async API's backlog as `ApiStatus` fields (none when the store cannot be read)."""
    try:
        backlog = store.backlog(api, now, detail=True)
    except Exception:
        logging.getLogger(__name__).exception("%s: reading the queue backlog failed", api)
        return {}
    oldest = backlog.oldest_queued_at
    latency = backlog.latency_p50_s
    return {
        "backlog_in_queue": backlog.in_queue,
        "backlog_in_progress": backlog.in_progress,
        "backlog_oldest_age_s": None if oldest is None else round(max(0.0, now - oldest), 3),
        "result_latency_p50_s": None if latency is None else round(latency, 3),
    }
