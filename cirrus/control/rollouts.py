"""Rollouts of revisions: canaries (a share of requests to a new revision beside the serving one),
promoting or aborting them, rolling back, and the checks a deploy passes first.

The controller owns the API states and reconciles them; this module changes which revisions an API
serves and rolls to (`ApiState.serving`, `.stored`, `.canary`) and records that in the store, then
lets the controller's next reconcile start and drain replicas, so no request is dropped.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from cirrus.control.store import fingerprint
from cirrus.kinds import kind_of
from cirrus.types import DeployResult, RevisionInfo

if TYPE_CHECKING:
    from cirrus.control.controller import ApiState, Controller
    from cirrus.spec import Deployment

log = logging.getLogger("cirrus.controller")


class DeployRefused(ValueError):
    """A deploy or rollout that cannot happen as asked; `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def canary_replicas(desired: int, percent: float) -> int:
    """Replicas of a canary revision taking `percent` of an API that wants `desired` replicas in all."""
    return 0 if desired <= 0 else max(1, math.ceil(desired * percent / 100))


class Rollouts:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def _live(self, name: str) -> ApiState:
        state = self.controller.apis.get(name)
        if state is None or state.deleted:
            raise KeyError(f"no API named {name!r}")
        return state

    # --- checks before a deploy ---------------------------------------------------------
    def check(self, deployments: list[Deployment], force: bool, canary: float | None) -> None:
        """Refuse (DeployRefused) a deploy that cannot start as asked, before anything is recorded."""
        self._check_splitters(deployments)
        refused = self.controller.queue_refused
        for deployment in deployments:
            kind = kind_of(deployment.spec.kind)
            if refused is not None and (kind.queued or kind.runs_jobs):
                raise DeployRefused(f"API {deployment.spec.name!r} ({deployment.spec.kind}): {refused}", 400)
        if canary is None:
            return
        if not 0 < canary < 100:
            raise DeployRefused(f"a canary takes a share of requests between 0 and 100 percent, not {canary:g}", 400)
        for deployment in deployments:
            self._check_canary(deployment, force)

    def _check_canary(self, deployment: Deployment, force: bool) -> None:
        name = deployment.spec.name
        state = self.controller.apis.get(name)
        if state is None or state.deleted:
            raise DeployRefused(f"API {name!r} is not deployed: a canary starts beside a serving revision")
        kind = kind_of(deployment.spec.kind)
        if kind.queued or not (kind.takes_predictions or kind.proxied) or not kind.runs_replicas:
            raise DeployRefused(f"API {name!r}: canaries are for realtime APIs, not {deployment.spec.kind} ones", 400)
        if deployment.spec.kind != state.stored.deployment.spec.kind:
            raise DeployRefused(f"API {name!r}: a canary cannot change the API's kind", 400)
        if state.canary is None and (state.serving is not None or state.revision not in state.loaded):
            raise DeployRefused(
                f"API {name!r}: revision {state.revision} is still rolling out; wait until it is live "
                "(cirrus get) or deploy without --canary"
            )
        current = state.stored if state.canary is None else state.serving
        if not force and current is not None and fingerprint(deployment) == current.fingerprint:
            raise DeployRefused(
                f"API {name!r}: nothing to canary: the code and spec match revision {current.revision} "
                "(--force makes a new revision of the same code)",
                400,
            )

    def _check_splitters(self, deployments: list[Deployment]) -> None:
        """A splitter's APIs must be deployed (now, or in the same deploy) and take predictions."""
        kinds = {n: s.stored.deployment.spec.kind for n, s in self.controller.apis.items() if not s.deleted}
        kinds.update({d.spec.name: d.spec.kind for d in deployments})
        for deployment in deployments:
            spec = deployment.spec
            for target in spec.apis or []:
                found = kinds.get(target.name)
                if found is None:
                    raise DeployRefused(f"splitter {spec.name!r}: API {target.name!r} is not deployed", 400)
                if found in ("splitter", "batch") or (target.shadow and kind_of(found).queued):
                    what = "a shadow" if target.shadow else "a splitter"
                    raise DeployRefused(
                        f"splitter {spec.name!r}: {target.name!r} is a {found} API; {what} sends requests to "
                        "realtime APIs" + ("" if target.shadow else " (or async ones)"),
                        400,
                    )

    # --- canaries -----------------------------------------------------------------------
    def replacing(self, deployment: Deployment, force: bool) -> None:
        """Before a deployment is recorded: one that makes a new revision aborts a running canary, so
        it rolls over the serving revision (a deploy of the serving code again simply aborts it)."""
        state = self.controller.apis.get(deployment.spec.name)
        if state is None or state.deleted or state.canary is None:
            return
        if force or fingerprint(deployment) != state.stored.fingerprint:
            self.end_canary(state)

    def end_canary(self, state: ApiState) -> None:
        """Abort a running canary: the serving revision is again the one the API rolls to."""
        serving = state.serving
        if state.canary is None or serving is None:
            return
        store = self.controller.store
        aborted = state.revision
        state.canary, state.stored, state.serving = None, serving, None
        store.set_canary(state.name, None)
        store.set_target(state.name, serving.revision)
        state.scaler.update_spec(serving.deployment.spec)
        self.controller.set_route(serving)
        log.info(
            "%s: canary revision %d aborted; revision %d serves every request", state.name, aborted, serving.revision
        )

    def started(self, state: ApiState, percent: float) -> None:
        """A deploy made the revision the API rolls to a canary taking `percent` of requests."""
        state.canary = percent
        self.controller.store.set_canary(state.name, percent)
        serving = state.serving.revision if state.serving is not None else None
        log.info(
            "%s: canary revision %d takes %g%% of requests beside revision %s",
            state.name,
            state.revision,
            percent,
            serving,
        )

    def promote(self, name: str) -> DeployResult:
        """The canary revision takes every request; the serving one drains once it has its replicas."""
        state = self._live(name)
        if state.canary is None:
            raise DeployRefused(f"API {name!r} runs no canary to promote (deploy one with --canary PERCENT)")
        state.canary = None
        self.controller.store.set_canary(name, None)
        self.controller.gateway.promote_canary(name)
        log.info("%s: canary revision %d promoted: it takes every request", name, state.revision)
        self.controller.wake()
        return DeployResult(
            name=name, action="promoted", revision=state.revision, endpoint=self.controller.endpoint(name)
        )

    # --- rollbacks and history ----------------------------------------------------------
    def rollback(self, name: str, to: int | None = None) -> DeployResult:
        """Abort a running canary (when `to` is not given), or serve revision `to` (default: the one
        before the revision serving now) again, as a new revision with today's scale settings, through
        the ordinary rolling update."""
        state = self._live(name)
        controller = self.controller
        if state.canary is not None and to is None:
            aborted = state.revision
            self.end_canary(state)
            controller.wake()
            return DeployResult(
                name=name,
                action=f"canary {aborted} aborted",
                revision=state.revision,
                endpoint=controller.endpoint(name),
            )
        if state.canary is not None:
            self.end_canary(state)
        if to is None:
            now = state.serving.revision if state.serving is not None else state.revision
            earlier = [r.api.revision for r in controller.store.revisions(name) if r.api.revision < now]
            if not earlier:
                raise DeployRefused(f"API {name!r} has no revision before {now} to roll back to")
            to = earlier[-1]
        stored = controller.store.rollback(name, to)
        log.info("%s: revision %d rolls back to revision %d", name, stored.revision, to)
        controller.apply(stored, "updated")
        controller.wake()
        return DeployResult(name=name, action="updated", revision=stored.revision, endpoint=controller.endpoint(name))

    def revisions(self, name: str) -> list[RevisionInfo]:
        state = self.controller.apis.get(name)
        serving = None if state is None else (state.serving.revision if state.serving else state.saved)
        target = None if state is None else state.revision
        canary = None if state is None else state.canary
        out = []
        for record in self.controller.store.revisions(name):
            revision = record.api.revision
            rolling = "rolling out" if canary is None else f"canary {canary:g}%"
            role = ", ".join(
                word
                for word, holds in (("serving", revision == serving), (rolling, revision == target != serving))
                if holds
            )
            out.append(
                RevisionInfo(
                    revision=revision,
                    created_at=record.created_at,
                    note=record.note,
                    snapshot=record.api.deployment.snapshot,
                    role=role,
                )
            )
        return out
