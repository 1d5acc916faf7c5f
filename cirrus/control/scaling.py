"""The thin stateful shell around the pure autoscaling policy: one per API.

It keeps the metric history and the policy's state, and asks `autoscaler.decide` for the
desired replica count; the controller applies the answer.
"""

from __future__ import annotations

from collections import deque

from cirrus.control.autoscaler import PolicyState, Sample, decide
from cirrus.spec import ApiSpec


class ApiScaler:
    def __init__(self, spec: ApiSpec, now: float) -> None:
        self.spec = spec
        self.desired = spec.autoscaling.initial
        # The initial count holds for the downscale stabilization window, as if it had been
        # recommended all along (a deploy's `init_replicas` is not cut a second later).
        self.hold_initial_until = now + spec.autoscaling.downscale_stabilization_s
        self.samples: deque[Sample] = deque()
        self.policy = PolicyState()
        self.reason = "initial replicas"
        self.panic = False

    def update_spec(self, spec: ApiSpec) -> None:
        """A new revision: keep the current scale, within the new bounds."""
        self.spec = spec
        bounds = spec.autoscaling
        self.desired = min(max(self.desired, bounds.min_replicas), bounds.max_replicas)

    def observe(self, in_flight: float, now: float) -> None:
        samples = self.samples
        samples.append(Sample(at=now, in_flight=in_flight))
        horizon = now - self.spec.autoscaling.window_s
        while samples and samples[0].at < horizon:
            samples.popleft()

    def decide(self, now: float) -> int:
        decision = decide(
            self.spec.autoscaling, self.spec.target_concurrency, tuple(self.samples), self.desired, self.policy, now
        )
        self.policy = decision.state
        self.desired = decision.desired
        self.reason = decision.reason
        initial = self.spec.autoscaling.initial
        if now < self.hold_initial_until and self.desired < initial:
            self.desired = initial
            self.reason = f"holding the initial {initial} replica(s) for the stabilization window"
        self.panic = decision.panic
        return decision.desired
