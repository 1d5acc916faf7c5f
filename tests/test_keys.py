"""API keys and the token bucket: the pure rate limit on traces, the key ring's answers, the store."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cirrus.control.keys import KeyNotFound, KeyStore
from cirrus.gateway.keys import Bucket, KeyRing, key_id, presented_key, take


def run_trace(times: list[float], rate: float, burst: float) -> list[bool]:
    bucket, allowed = None, []
    for now in times:
        bucket, wait = take(bucket, rate, burst, now)
        allowed.append(wait == 0)
    return allowed


def test_a_burst_then_the_rate() -> None:
    # 10 requests at t=0 with burst 3: 3 pass; then one every 0.5 s at rate 2/s: all pass.
    assert run_trace([0.0] * 10, rate=2, burst=3) == [True] * 3 + [False] * 7
    assert run_trace([0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0], rate=2, burst=3) == [True] * 7


def test_the_wait_says_when_a_token_will_be_there() -> None:
    bucket, _ = take(None, 4, 1, 10.0)
    assert bucket == Bucket(0.0, 10.0)
    _, wait = take(bucket, 4, 1, 10.1)
    assert wait == pytest.approx(0.15)


def test_idle_time_refills_no_more_than_the_burst() -> None:
    assert run_trace([0.0, 0.0, 100.0, 100.0, 100.0], rate=1, burst=2) == [True, True, True, True, False]


@given(st.lists(st.floats(min_value=0, max_value=60), min_size=1, max_size=200), st.sampled_from([0.5, 1, 5, 50]))
def test_never_more_than_burst_plus_rate_times_elapsed(offsets: list[float], rate: float) -> None:
    times = sorted(offsets)
    burst = 3.0
    passed = sum(run_trace(times, rate, burst))
    assert passed <= burst + rate * (times[-1] - times[0]) + 1e-9


def test_keys_are_read_from_either_header() -> None:
    assert presented_key([(b"x-api-key", b" cirrus_a_b ")]) == "cirrus_a_b"
    assert presented_key([(b"authorization", b"Bearer cirrus_a_b")]) == "cirrus_a_b"
    assert presented_key([(b"authorization", b"Basic xyz")]) is None
    assert key_id("cirrus_abc_secret") == "abc" and key_id("abc") is None and key_id("cirrus_abc") is None


def test_the_ring_answers_401_403_429_and_lets_the_rest_through(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "state.db")
    scoped, _ = store.create(apis=["iris"], rate=1, burst=2)
    anywhere, _ = store.create()
    expiring, _ = store.create(expires_in_s=60)
    revoked, record = store.create()
    store.revoke(record.id)
    ring = KeyRing()
    ring.set_keys(store.list())
    now = 1e10  # far after creation: only the expiring key is past its time
    assert ring.check(None, "iris", now).status == 401  # type: ignore[union-attr]
    assert ring.check("cirrus_nope_nope", "iris", now).status == 401  # type: ignore[union-attr]
    assert ring.check(revoked, "iris", now).status == 401  # type: ignore[union-attr]
    assert ring.check(scoped[:-1] + "x", "iris", now).status == 401  # type: ignore[union-attr]
    assert ring.check(expiring, "iris", now).message == "the API key has expired"  # type: ignore[union-attr]
    assert ring.check(scoped, "other", now).status == 403  # type: ignore[union-attr]
    assert ring.check(anywhere, "other", now) is None
    assert [ring.check(scoped, "iris", now) for _ in range(2)] == [None, None]
    denied = ring.check(scoped, "iris", now)
    assert denied is not None and (denied.status, denied.retry_after_s) == (429, 1)
    assert ring.check(scoped, "iris", now + 1.0) is None
    store.close()


def test_the_store_keeps_only_digests_and_revokes(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "state.db")
    key, record = store.create(apis=["b", "a", "a"], name="ci")
    assert record.apis == ["a", "b"] and key.startswith(f"cirrus_{record.id}_")
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir())  # state.db and its WAL
    assert record.digest.encode() in stored and key.encode() not in stored
    assert store.revoke(record.id).revoked_at is not None
    with pytest.raises(KeyNotFound):
        store.revoke("missing")
    with pytest.raises(ValueError, match="rate must be"):
        store.create(rate=0)
    store.close()
