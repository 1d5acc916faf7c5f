"""The autoscaling policy on traces: a simulated control loop calls `decide` once a second with an
injected clock and a load function; no processes, sockets or sleeps."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import FrozenInstanceError, dataclass, field
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cirrus.control.autoscaler import Decision, PolicyState, Sample, decide
from cirrus.spec import AutoscalingSpec

Load = Callable[[float], float]


@dataclass
class Loop:
    """What the controller does: record a sample, call `decide`, apply `desired`, keep the state."""

    spec: AutoscalingSpec
    target: float = 1.0
    current: int = 1
    state: PolicyState = field(default_factory=PolicyState)
    samples: list[Sample] = field(default_factory=list)
    trace: dict[float, Decision] = field(default_factory=dict)

    def tick(self, now: float, in_flight: float) -> Decision:
        self.samples.append(Sample(now, in_flight))
        # The controller passes the last window_s of samples; the policy must cope with more.
        self.samples = [s for s in self.samples if s.at > now - 2 * self.spec.window_s]
        decision = decide(self.spec, self.target, self.samples, self.current, self.state, now)
        self.current, self.state = decision.desired, decision.state
        self.trace[now] = decision
        return decision

    def run(self, load: Load, start: float, end: float) -> Loop:
        """Tick every second from `start` (inclusive) to `end` (exclusive)."""
        now = start
        while now < end:
            self.tick(now, load(now))
            now += 1.0
        return self

    def desired(self, start: float, end: float) -> list[int]:
        return [d.desired for t, d in sorted(self.trace.items()) if start <= t < end]

    def at(self, t: float) -> int:
        return self.trace[t].desired


def spec(**overrides: Any) -> AutoscalingSpec:
    return AutoscalingSpec(**overrides)


def steady(loop: Loop, level: float, seconds: float = 120.0) -> Loop:
    """Warm the loop up on a constant load ending just before t=0."""
    return loop.run(lambda _t: level, -seconds, 0.0)


def step(before: float, after: float, at: float = 0.0) -> Load:
    return lambda t: before if t < at else after


def reversals(values: list[int]) -> int:
    """How often the direction of change flips (up then down, or down then up)."""
    moves = [b - a for a, b in pairwise(values) if b != a]
    return sum(1 for a, b in pairwise(moves) if (a > 0) != (b > 0))


# --- the step the design is judged by --------------------------------------------------------------


def test_step_1_to_32_requests_replicas_within_a_second() -> None:
    loop = steady(Loop(spec()), 1.0)
    assert loop.current == 1
    loop.run(step(1.0, 32.0), 0.0, 40.0)
    # Defaults: panic window 6 s, factor 4, target 1: 1 -> 4 on the first tick after the step.
    assert loop.desired(0, 10) == [4, 12, 17, 22, 27, 32, 32, 32, 32, 32]
    assert all(loop.trace[t].panic for t in range(10))
    assert loop.at(39) == 32
    assert not loop.trace[39].panic  # panic ends window_s after the last trigger (t=1)


def test_ramp_tracks_load_without_overshoot_or_reversal() -> None:
    loop = steady(Loop(spec()), 1.0)
    ramp: Load = lambda t: min(40.0, 1.0 + t * 39.0 / 60.0)  # noqa: E731
    loop.run(ramp, 0.0, 120.0)
    values = loop.desired(0, 120)
    assert values == sorted(values)  # never down on a rising load
    assert max(values) == 40
    assert all(d.desired <= 40 for d in loop.trace.values())
    assert loop.at(60 + 30) == 40  # a full window after the ramp ends, the average has caught up


def test_upscale_stabilization_takes_the_lowest_recommendation() -> None:
    loop = steady(Loop(spec(upscale_stabilization_s=20, panic_threshold=100)), 10.0)
    loop.run(step(10.0, 20.0), 0.0, 60.0)
    # The stable average climbs over 30 s; each scale-up goes to the lowest rec of the last 20 s.
    for t in range(60):
        recs = [r for at, r in loop.trace[t].state.recommendations if at > t - 20 or at == t]
        assert loop.at(t) <= max(10, min(recs))
    assert loop.at(0) == 10  # a new high recommendation alone does not scale up
    assert loop.at(59) == 20


# --- spikes and panic ------------------------------------------------------------------------------


def test_spike_panics_within_two_seconds_and_never_scales_down_in_panic() -> None:
    loop = steady(Loop(spec()), 2.0)
    assert loop.current == 2
    spike: Load = lambda t: 40.0 if 0 <= t < 5 else 2.0  # noqa: E731
    loop.run(spike, 0.0, 200.0)
    assert loop.at(1) > 2 and loop.trace[1].panic
    in_panic = [t for t in range(200) if loop.trace[t].panic]
    assert in_panic == list(range(in_panic[0], in_panic[-1] + 1))  # one continuous panic
    panic_values = [loop.at(t) for t in in_panic]
    assert panic_values == sorted(panic_values)  # never down during panic
    last_trigger = max(t for t in in_panic if loop.trace[t].state.panic_until == t + 30)
    assert in_panic[-1] == last_trigger + 29  # panic lasts window_s after the last trigger
    assert loop.at(in_panic[-1] + 1) == loop.at(in_panic[-1])  # downscale stabilization still holds
    assert loop.at(199) == 2  # and eventually back to what the load needs


def test_panic_respects_max_upscale_factor_and_max_replicas() -> None:
    loop = steady(Loop(spec(max_replicas=10, max_upscale_factor=2)), 1.0)
    loop.run(step(1.0, 600.0), 0.0, 10.0)
    assert loop.desired(0, 6) == [2, 4, 8, 10, 10, 10]
    assert "max_replicas 10" in loop.trace[3].reason


def test_no_panic_below_threshold() -> None:
    loop = steady(Loop(spec(window_s=30, panic_threshold=4)), 4.0)
    assert loop.current == 4
    loop.run(step(4.0, 12.0), 0.0, 5.0)  # 3x capacity, threshold 4x
    assert not any(loop.trace[t].panic for t in range(5))


# --- scaling down ----------------------------------------------------------------------------------


def test_idle_scales_down_only_after_downscale_stabilization() -> None:
    loop = steady(Loop(spec()), 10.0)
    assert loop.current == 10
    loop.run(step(10.0, 0.0), 0.0, 300.0)
    assert set(loop.desired(0, 60)) == {10}
    first_down = min(t for t in range(300) if loop.at(t) < 10)
    # The 30-s average reaches 9 (a recommendation under 10) at t=2; the last recommendation of 10
    # (at t=1) leaves the 60-s stabilization window at t=61.
    assert first_down == 61
    assert loop.at(first_down) == 9  # the highest recommendation of the last 60 s
    values = loop.desired(0, 300)
    assert all(b >= a // 2 for a, b in pairwise(values))  # max_downscale_factor 0.5
    assert loop.at(299) == 1  # min_replicas 1
    assert reversals(loop.desired(0, 300)) == 0


def test_downscale_factor_limits_each_step() -> None:
    quick = spec(window_s=1, panic_window_s=1, downscale_stabilization_s=0, max_downscale_factor=0.75)
    loop = Loop(quick, current=20).run(lambda _t: 0.0, 0.0, 12.0)
    assert loop.desired(0, 12) == [15, 11, 8, 6, 4, 3, 2, 1, 1, 1, 1, 1]


def test_upscale_factor_limits_each_step() -> None:
    quick = spec(window_s=1, panic_window_s=1, panic_threshold=100, max_upscale_factor=1.5)
    loop = Loop(quick, current=10).run(lambda _t: 100.0, 0.0, 8.0)
    assert loop.desired(0, 8) == [15, 23, 35, 53, 80, 100, 100, 100]
    assert "max_upscale_factor 1.5" in loop.trace[0].reason


def test_flapping_load_does_not_oscillate() -> None:
    # A square wave between 6 and 14 around a capacity of 10: the 30-s average wobbles by about 7%.
    loop = steady(Loop(spec()), 10.0)
    wave: Load = lambda t: 14.0 if int(t) // 10 % 2 == 0 else 6.0  # noqa: E731
    loop.run(wave, 0.0, 600.0)
    values = loop.desired(0, 600)
    assert reversals(values) == 0
    assert len(set(values)) <= 2


def test_small_noise_within_tolerance_keeps_replicas() -> None:
    loop = steady(Loop(spec(downscale_stabilization_s=0)), 10.0)
    noise: Load = lambda t: 10.8 if int(t) % 2 else 9.8  # noqa: E731  (average 10.3: ceil says 11)
    loop.run(noise, 0.0, 300.0)
    assert set(loop.desired(0, 300)) == {10}
    assert "within tolerance" in loop.trace[299].reason


# --- zero ------------------------------------------------------------------------------------------


def test_long_idle_goes_to_zero_exactly_after_scale_to_zero_after_s() -> None:
    loop = steady(Loop(spec(min_replicas=0)), 4.0)
    assert loop.current == 4
    loop.run(step(4.0, 0.0), 0.0, 400.0)
    assert loop.trace[0].state.idle_since == 0.0
    assert loop.at(299) == 1  # downscale walked to 1, never to 0 by itself
    assert loop.at(300) == 0
    assert "scale to zero" in loop.trace[300].reason
    assert set(loop.desired(300, 400)) == {0}


def test_reasons_round_times_for_people() -> None:
    loop = Loop(spec(min_replicas=0), current=1)
    loop.run(lambda _t: 0.0, 0.0, 40.0)
    reason = loop.tick(40.00745, 0.0).reason
    assert re.search(r"idle \d+\.\d of 300 s before zero", reason), reason
    assert "00745" not in reason


def test_a_request_during_idle_restarts_the_idle_timer() -> None:
    loop = steady(Loop(spec(min_replicas=0)), 4.0)
    blip: Load = lambda t: 1.0 if t == 200 else 0.0  # noqa: E731
    loop.run(blip, 0.0, 600.0)
    assert loop.at(499) == 1
    assert loop.at(501) == 0  # idle again from t=201


def test_min_replicas_one_never_goes_to_zero() -> None:
    loop = steady(Loop(spec(min_replicas=1)), 4.0)
    loop.run(lambda _t: 0.0, 0.0, 1000.0)
    assert min(loop.desired(0, 1000)) == 1


def test_scale_from_zero_on_first_request() -> None:
    loop = Loop(spec(min_replicas=0, upscale_stabilization_s=60), current=0)
    loop.run(lambda _t: 0.0, 0.0, 100.0)
    assert set(loop.desired(0, 100)) == {0}
    first = loop.tick(100.5, 1.0)  # the controller calls at once when a request arrives
    assert first.desired == 1
    assert "from zero" in first.reason


def test_scale_from_zero_with_a_burst_goes_straight_to_the_recommendation() -> None:
    loop = Loop(spec(min_replicas=0), current=0)
    loop.run(lambda _t: 0.0, 0.0, 10.0)
    assert loop.tick(10.0, 36.0).desired == 6  # panic window: 36 over 6 samples -> 6 replicas


# --- bounds, tolerance, stale data, purity ---------------------------------------------------------


def test_bounds() -> None:
    loop = steady(Loop(spec(max_replicas=5)), 1.0)
    loop.run(lambda _t: 1000.0, 0.0, 20.0)
    assert max(loop.desired(0, 20)) == 5
    loop = Loop(spec(min_replicas=3), current=3).run(lambda _t: 0.0, 0.0, 200.0)
    assert set(loop.desired(0, 200)) == {3}
    # A spec change that lowers max_replicas takes effect at once, panic or not.
    loop = steady(Loop(spec()), 1.0).run(step(1.0, 50.0), 0.0, 10.0)
    assert loop.current > 8
    loop.spec = spec(max_replicas=8)
    assert loop.tick(10.0, 50.0).desired == 8


@pytest.mark.parametrize(
    ("average", "expected"),
    [(40.0, 40), (41.9, 40), (42.0, 40), (42.1, 43), (38.0, 40), (37.9, 38), (36.5, 37), (60.0, 60)],
)
def test_tolerance_band(average: float, expected: int) -> None:
    # current 40, tolerance 0.05: an average in [38, 42] keeps 40; outside, ceil(average) replicas.
    quick = spec(window_s=1, panic_window_s=1, downscale_stabilization_s=0, panic_threshold=100)
    decision = decide(quick, 1.0, [Sample(0.0, average)], 40, PolicyState(), 0.0)
    assert decision.desired == expected
    assert ("within tolerance" in decision.reason) == (38.0 <= average <= 42.0 and average != 40.0)


def test_target_concurrency_divides_the_load() -> None:
    quick = spec(window_s=1, panic_window_s=1, panic_threshold=100)
    assert decide(quick, 4.0, [Sample(0.0, 36.0)], 8, PolicyState(), 0.0).desired == 9
    assert decide(quick, 4.0, [Sample(0.0, 33.0)], 8, PolicyState(), 0.0).desired == 8  # 3% over: tolerance


def test_stale_samples_are_ignored() -> None:
    s = spec(min_replicas=0)
    stale = [Sample(t, 500.0) for t in range(0, 50)]
    fresh = [Sample(t, 2.0) for t in range(71, 101)]
    with_stale = decide(s, 1.0, stale + fresh, 2, PolicyState(), 100.0)
    without = decide(s, 1.0, fresh, 2, PolicyState(), 100.0)
    assert with_stale == without
    assert with_stale.desired == 2 and not with_stale.panic
    # Only stale samples: no data, hold what we have.
    held = decide(s, 1.0, stale, 3, PolicyState(), 100.0)
    assert held.desired == 3
    assert "no metrics" in held.reason
    assert decide(s, 1.0, stale, 0, PolicyState(), 100.0).desired == 0


def test_old_recommendations_are_forgotten() -> None:
    s = spec(upscale_stabilization_s=10, downscale_stabilization_s=60)
    state = PolicyState(recommendations=((0.0, 50), (50.0, 40)))
    decision = decide(s, 1.0, [Sample(100.0, 4.0)], 4, state, 100.0)
    assert decision.state.recommendations == ((50.0, 40), (100.0, 4))
    assert decision.desired == 4  # 40 at t=50 is still in the 60-s window: no scale-down


def test_decide_never_mutates_its_inputs() -> None:
    s = spec(min_replicas=0)
    state = PolicyState(recommendations=((95.0, 3), (99.0, 2)), panic_until=120.0, idle_since=None)
    samples = [Sample(float(t), 7.0) for t in range(70, 101)]
    state_before, samples_before = copy.deepcopy(state), list(samples)
    decision = decide(s, 1.0, samples, 3, state, 100.0)
    assert state == state_before and samples == samples_before
    assert decision.state is not state
    with pytest.raises(FrozenInstanceError):
        decision.state.panic_until = 0.0  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        samples[0].in_flight = 1.0  # type: ignore[misc]
    assert decide(s, 1.0, samples, 3, state, 100.0) == decision  # same inputs, same answer


def test_invalid_arguments_are_errors() -> None:
    with pytest.raises(ValueError, match="target_concurrency"):
        decide(spec(), 0.0, [], 1, PolicyState(), 0.0)
    with pytest.raises(ValueError, match="negative"):
        decide(spec(), 1.0, [], -1, PolicyState(), 0.0)


# --- invariants ------------------------------------------------------------------------------------


@st.composite
def specs(draw: st.DrawFn) -> AutoscalingSpec:
    max_replicas = draw(st.integers(1, 50))
    window_s = draw(st.floats(1, 120))
    return AutoscalingSpec(
        min_replicas=draw(st.integers(0, max_replicas)),
        max_replicas=max_replicas,
        window_s=window_s,
        panic_window_s=draw(st.floats(0.5, 1)) * window_s,
        upscale_stabilization_s=draw(st.sampled_from([0.0, 5.0, 60.0])),
        downscale_stabilization_s=draw(st.sampled_from([0.0, 5.0, 60.0, 300.0])),
        max_upscale_factor=draw(st.floats(1.01, 10)),
        max_downscale_factor=draw(st.floats(0, 0.99)),
        tolerance=draw(st.floats(0, 0.5)),
        scale_to_zero_after_s=draw(st.sampled_from([0.0, 3.0, 30.0, 300.0])),
        panic_threshold=draw(st.floats(1.01, 10)),
    )


@settings(max_examples=300, deadline=None)
@given(
    policy=specs(),
    target=st.floats(0.1, 64),
    start=st.integers(0, 50),
    loads=st.lists(st.one_of(st.just(0.0), st.floats(0, 1000)), min_size=1, max_size=60),
    gaps=st.lists(st.sampled_from([0.01, 0.5, 1.0, 3.0, 40.0]), min_size=60, max_size=60),
)
def test_invariants(policy: AutoscalingSpec, target: float, start: int, loads: list[float], gaps: list[float]) -> None:
    current, state, now = start, PolicyState(), 0.0
    samples: list[Sample] = []
    for load, gap in zip(loads, gaps, strict=False):
        now += gap
        samples.append(Sample(now, load))
        decision = decide(policy, target, samples, current, state, now)
        assert policy.min_replicas <= decision.desired <= policy.max_replicas
        if current == 0 and load > 0:
            assert decision.desired >= 1
        if decision.panic and current <= policy.max_replicas:
            assert decision.desired >= current
        horizon = max(policy.upscale_stabilization_s, policy.downscale_stabilization_s)
        assert all(t > now - horizon or t == now for t, _ in decision.state.recommendations)  # bounded memory
        current, state = decision.desired, decision.state
