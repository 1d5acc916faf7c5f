"""The autoscaling policy: a pure function from (spec, metric history, replicas, state, now) to a decision.

The controller keeps a short history of one metric per API, the requests *in flight* (executing in
replicas plus queued in the gateway), calls `decide` about once a second (and at once when a request
arrives for an API at zero replicas) and applies `Decision.desired`. Everything the policy remembers
between calls lives in the immutable `PolicyState` it is handed and hands back, so the policy has no
clock, no I/O and no hidden state: it is tested on traces with an injected clock
(tests/test_autoscaler.py) and explained in docs/autoscaling.md.

One call, in order:

1. **Windows.** Samples older than `window_s` are ignored. `stable_avg` is the mean in-flight of the
   samples in the last `window_s`, `panic_avg` that of the last `panic_window_s`. A recommendation
   is `ceil(avg / target_concurrency)`. No sample in the window: hold `current` (within bounds).
2. **Scale from zero.** `current == 0` and anything in flight (latest sample or panic window):
   straight to `max(1, stable, panic recommendation)`, no stabilization, no factor.
3. **Tolerance.** With `current > 0` and `|stable_avg / (current * target) - 1| <= tolerance`, the
   stable recommendation is `current`. Each stable recommendation is remembered with its time.
4. **Panic.** With `current > 0`, a panic-window demand `panic_avg / target_concurrency` (the panic
   recommendation before rounding up) `>= panic_threshold * current` (re)starts panic mode until
   `window_s` after this trigger. In panic, desired is `max(current, panic recommendation)`: it never
   scales down (not to zero either), still at most `ceil(current * max_upscale_factor)` per decision
   and within bounds. What panic decides is remembered as the recommendation, so when panic ends,
   downscale stabilization still holds the replicas for `downscale_stabilization_s`.
5. **Stabilization.** Otherwise a scale-up goes only to the *lowest* recommendation of the last
   `upscale_stabilization_s` (0: this one alone), a scale-down only to the *highest* of the last
   `downscale_stabilization_s`; between the two, replicas stay put.
6. **Factors.** Per decision at most `ceil(current * max_upscale_factor)` and, going down, at least
   `floor(current * max_downscale_factor)` (always a step of at least one replica).
7. **Zero.** With `min_replicas == 0`, desired drops to 0 exactly when in-flight has been 0 for
   `scale_to_zero_after_s` (from the first zero sample after the last busy one, `idle_since`);
   until then at least 1 is kept even when the recommendation is 0.
8. **Bounds.** The result is clamped to `[min_replicas, max_replicas]`; bounds beat every rule above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cirrus.spec import AutoscalingSpec

# Rounding slack: 10 * 1.1 is 11.000000000000002 in floats, which must not ceil to 12.
_EPSILON = 1e-9
# A recommendation never exceeds this (far above any max_replicas), so a huge metric cannot overflow.
_MAX_RECOMMENDATION = 1_000_000


@dataclass(frozen=True)
class Sample:
    """The API's in-flight requests (executing in replicas + queued in the gateway) at time `at`."""

    at: float
    in_flight: float


@dataclass(frozen=True)
class PolicyState:
    """Everything the policy remembers between calls; `decide` returns a new one, never mutates this."""

    recommendations: tuple[tuple[float, int], ...] = ()
    """(time, stable recommendation) of the last max(upscale, downscale) stabilization window."""
    panic_until: float | None = None
    """Panic mode lasts while `now < panic_until` (`window_s` after the last trigger); None: not in panic."""
    idle_since: float | None = None
    """Time of the first zero in-flight sample after the last busy one; None while busy or unknown."""


@dataclass(frozen=True)
class Decision:
    desired: int
    state: PolicyState
    reason: str
    """Short human text for logs and `cirrus get`."""
    panic: bool


def decide(
    spec: AutoscalingSpec,
    target_concurrency: float,
    samples: Sequence[Sample],
    current: int,
    state: PolicyState,
    now: float,
) -> Decision:
    """Desired replicas for one API, and the policy state to pass to the next call.

    `target_concurrency` is the in-flight requests per replica to aim for
    (`ApiSpec.target_concurrency`); `samples` the controller's metric history (samples older than
    `spec.window_s` before `now` are ignored); `current` the replicas the controller currently
    wants (desired so far, ready or not); `now` the controller's clock, the same one that stamps
    the samples. The rules, in the order they apply, are in this module's docstring and in
    docs/autoscaling.md.
    """
    if not target_concurrency > 0:
        raise ValueError(f"target_concurrency must be positive, got {target_concurrency!r}")
    if current < 0:
        raise ValueError(f"current replicas must not be negative, got {current}")

    recent = [s for s in samples if s.at > now - spec.window_s]
    still_panic_until = state.panic_until if state.panic_until is not None and now < state.panic_until else None
    if not recent:
        return _hold_without_metrics(spec, current, state, still_panic_until, now)

    demand = _measure(spec, target_concurrency, recent, now)
    idle_since = _idle_since(recent, demand.latest, state.idle_since)
    if current == 0:
        return _scale_from_zero(spec, demand, state.recommendations, still_panic_until, idle_since, now)

    demand, tolerated = _apply_tolerance(spec, demand, current)
    up_cap = max(current + 1, _ceil(current * spec.max_upscale_factor))
    panic_until = _panic_until(spec, demand, current, still_panic_until, now)
    if panic_until is not None:
        return _panic(spec, demand, current, up_cap, state.recommendations, panic_until, idle_since, now)

    recs = _remember(state.recommendations, now, demand.stable_rec, spec)
    new_state = PolicyState(recs, None, idle_since)
    if spec.min_replicas == 0 and idle_since is not None and now - idle_since >= spec.scale_to_zero_after_s:
        return Decision(0, new_state, f"scale to zero: idle for {now - idle_since:.1f} s; {current} -> 0", False)

    wanted, desired, why = _stabilize(spec, demand, current, tolerated, up_cap, recs, now)
    if desired == 0:
        # Only the idle timer takes an API to zero; until it fires, one replica stays.
        desired = 1
        wanted = 1
        idle_for = 0.0 if idle_since is None else now - idle_since
        why += f"; idle {idle_for:.1f} of {spec.scale_to_zero_after_s:g} s before zero"
    clamped = _clamp(desired, spec)
    return Decision(clamped, new_state, _describe(why, current, clamped, wanted, spec), False)


@dataclass(frozen=True)
class _Demand:
    """What the samples in the window ask for (step 1); `stable_rec` may be replaced by tolerance (step 3)."""

    latest: Sample
    stable_avg: float
    panic_avg: float
    stable_rec: int
    panic_rec: int
    target_concurrency: float


def _measure(spec: AutoscalingSpec, target_concurrency: float, recent: Sequence[Sample], now: float) -> _Demand:
    """Step 1: the stable and panic window averages and the replicas each recommends."""
    panic_samples = [s for s in recent if s.at > now - spec.panic_window_s]
    stable_avg = _mean(recent)
    panic_avg = _mean(panic_samples)
    return _Demand(
        latest=max(recent, key=lambda s: s.at),
        stable_avg=stable_avg,
        panic_avg=panic_avg,
        stable_rec=_recommend(stable_avg, target_concurrency),
        panic_rec=_recommend(panic_avg, target_concurrency),
        target_concurrency=target_concurrency,
    )


def _hold_without_metrics(
    spec: AutoscalingSpec, current: int, state: PolicyState, still_panic_until: float | None, now: float
) -> Decision:
    """Step 1, no sample in the window: hold `current` (within bounds)."""
    desired = _clamp(current, spec)
    kept = PolicyState(_prune(state.recommendations, now, spec), still_panic_until, state.idle_since)
    reason = f"no metrics in the last {spec.window_s:g} s; holding {desired}"
    return Decision(desired, kept, reason, still_panic_until is not None)


def _scale_from_zero(
    spec: AutoscalingSpec,
    demand: _Demand,
    recs: tuple[tuple[float, int], ...],
    still_panic_until: float | None,
    idle_since: float | None,
    now: float,
) -> Decision:
    """Step 2: at zero replicas, anything in flight goes straight to what the windows recommend."""
    in_flight = max(0.0, demand.latest.in_flight)
    busy = in_flight > 0 or demand.panic_avg > 0
    wanted = max(1, demand.stable_rec, demand.panic_rec) if busy else 0
    desired = _clamp(wanted, spec)
    reason = (
        f"scale from zero: {round(in_flight, 1):g} in flight; 0 -> {desired}"
        if busy
        else f"idle at zero; {desired} (min_replicas {spec.min_replicas})"
        if desired
        else "idle at zero"
    )
    remembered = _remember(recs, now, wanted, spec)
    return Decision(desired, PolicyState(remembered, still_panic_until, idle_since), reason, False)


def _apply_tolerance(spec: AutoscalingSpec, demand: _Demand, current: int) -> tuple[_Demand, bool]:
    """Step 3: an average within `tolerance` of the current capacity recommends `current`."""
    capacity = current * demand.target_concurrency
    tolerated = demand.stable_rec != current and abs(demand.stable_avg / capacity - 1) <= spec.tolerance + _EPSILON
    if tolerated:
        demand = replace(demand, stable_rec=current)
    return demand, tolerated


def _panic_until(
    spec: AutoscalingSpec, demand: _Demand, current: int, still_panic_until: float | None, now: float
) -> float | None:
    """Step 4: when panic mode ends, (re)started by a panic-window demand over the threshold; None: no panic."""
    # The trigger compares the unrounded demand: ceil() would make 1.1 requests "2 replicas", a panic at 1.
    if demand.panic_avg / (current * demand.target_concurrency) >= spec.panic_threshold:
        return now + spec.window_s
    return still_panic_until


def _panic(
    spec: AutoscalingSpec,
    demand: _Demand,
    current: int,
    up_cap: int,
    recs: tuple[tuple[float, int], ...],
    panic_until: float,
    idle_since: float | None,
    now: float,
) -> Decision:
    """Step 4, in panic: never down, up to the panic recommendation (factor and bounds still apply)."""
    wanted = max(current, demand.panic_rec)
    desired = _clamp(min(wanted, up_cap), spec)
    why = f"panic: {demand.panic_avg:.1f} in flight over {spec.panic_window_s:g} s needs {demand.panic_rec}"
    reason = _describe(why, current, desired, wanted, spec)
    # Remember what panic decided, not the lagging stable recommendation: leaving panic then hands
    # over to downscale stabilization instead of dropping at once to the 30-s average.
    remembered = _remember(recs, now, max(demand.stable_rec, desired), spec)
    return Decision(desired, PolicyState(remembered, panic_until, idle_since), reason, True)


def _stabilize(
    spec: AutoscalingSpec,
    demand: _Demand,
    current: int,
    tolerated: bool,
    up_cap: int,
    recs: tuple[tuple[float, int], ...],
    now: float,
) -> tuple[int, int, str]:
    """Steps 5 and 6: (wanted, desired, why) from the stabilization windows, within the per-decision factors."""
    stable_rec = demand.stable_rec
    lowest = min(r for t, r in recs if t > now - spec.upscale_stabilization_s or t == now)
    highest = max(r for t, r in recs if t > now - spec.downscale_stabilization_s or t == now)
    avg_text = f"{spec.window_s:g}-s average {demand.stable_avg:.1f}"
    if lowest > current:
        why = f"{avg_text} needs {stable_rec}" + (
            f", lowest over {spec.upscale_stabilization_s:g} s {lowest}" if lowest != stable_rec else ""
        )
        return lowest, min(lowest, up_cap), why
    if highest < current:
        why = f"{avg_text} needs {stable_rec}" + (
            f", highest over {spec.downscale_stabilization_s:g} s {highest}" if highest != stable_rec else ""
        )
        return highest, max(highest, min(current - 1, _floor(current * spec.max_downscale_factor))), why
    return current, current, _hold_reason(spec, demand, current, tolerated, lowest, highest, avg_text)


def _hold_reason(
    spec: AutoscalingSpec, demand: _Demand, current: int, tolerated: bool, lowest: int, highest: int, avg_text: str
) -> str:
    """Step 5, replicas stay put: why (tolerance, an exact match, or a stabilization window)."""
    stable_rec = demand.stable_rec
    if tolerated:
        return f"{avg_text} is within tolerance of {current} x {demand.target_concurrency:g}"
    if stable_rec == current:
        return f"{avg_text} needs {current}"
    if stable_rec > current:
        why = f"{avg_text} needs {stable_rec}; upscale stabilization holds (lowest over "
        return why + f"{spec.upscale_stabilization_s:g} s {lowest})"
    why = f"{avg_text} needs {stable_rec}; downscale stabilization holds (highest over "
    return why + f"{spec.downscale_stabilization_s:g} s {highest})"


def _mean(samples: Sequence[Sample]) -> float:
    if not samples:
        return 0.0
    return sum(max(0.0, s.in_flight) for s in samples) / len(samples)


def _ceil(value: float) -> int:
    return math.ceil(value - _EPSILON)


def _floor(value: float) -> int:
    return math.floor(value + _EPSILON)


def _recommend(average: float, target_concurrency: float) -> int:
    ratio = average / target_concurrency
    if ratio >= _MAX_RECOMMENDATION:
        return _MAX_RECOMMENDATION
    return max(0, _ceil(ratio))


def _clamp(replicas: int, spec: AutoscalingSpec) -> int:
    return max(spec.min_replicas, min(spec.max_replicas, replicas))


def _horizon(spec: AutoscalingSpec) -> float:
    return max(spec.upscale_stabilization_s, spec.downscale_stabilization_s)


def _prune(recs: tuple[tuple[float, int], ...], now: float, spec: AutoscalingSpec) -> tuple[tuple[float, int], ...]:
    start = now - _horizon(spec)
    return tuple((t, r) for t, r in recs if t > start)


def _remember(
    recs: tuple[tuple[float, int], ...], now: float, rec: int, spec: AutoscalingSpec
) -> tuple[tuple[float, int], ...]:
    return (*_prune(recs, now, spec), (now, rec))


def _idle_since(recent: Sequence[Sample], latest: Sample, known: float | None) -> float | None:
    """When in-flight became 0 and stayed there, judged from the samples in the window and the last call."""
    if latest.in_flight > 0:
        return None
    busy = [s.at for s in recent if s.in_flight > 0]
    last_busy = max(busy) if busy else None
    if known is not None and (last_busy is None or last_busy < known):
        return known
    idle = [s.at for s in recent if last_busy is None or s.at > last_busy]
    return min(idle)


def _describe(why: str, current: int, desired: int, wanted: int, spec: AutoscalingSpec) -> str:
    if desired == current:
        return f"{why}; keeping {current}"
    text = f"{why}; {current} -> {desired}"
    if desired == spec.max_replicas and wanted > desired:
        text += f" (max_replicas {spec.max_replicas})"
    elif desired == spec.min_replicas and wanted < desired:
        text += f" (min_replicas {spec.min_replicas})"
    elif desired < wanted:
        text += f" (max_upscale_factor {spec.max_upscale_factor:g})"
    elif desired > wanted:
        text += f" (max_downscale_factor {spec.max_downscale_factor:g})"
    return text
