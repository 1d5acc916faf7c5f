"""The queue store conformance suite: every test runs against every backend (see store_backends.py).

Time is injected (`now`), so leases expire by argument, not by sleeping.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from collections import Counter
from pathlib import Path

import pytest
from store_backends import StoreTarget, store_fixtures

from cirrus.store.base import CANCELLED, Backlog, Counts, Lease, NewRequest, QueueStore, Status

store_target, store = store_fixtures()

T0 = 1_700_000_000.0
API = "echo"


def request(
    id: str,
    api: str = API,
    body: bytes = b'{"x": 1}',
    max_attempts: int = 3,
    headers: list[tuple[str, str]] | None = None,
    query_string: bytes = b"",
    webhook: str | None = None,
) -> NewRequest:
    return NewRequest(
        api=api,
        id=id,
        body=body,
        content_type="application/json",
        headers=headers or [],
        query_string=query_string,
        webhook=webhook,
        max_attempts=max_attempts,
    )


def lease_one(store: QueueStore, now: float, worker: str = "w1", lease_s: float = 30.0, api: str = API) -> Lease:
    leases = store.lease(api, worker, 1, lease_s, now)
    assert len(leases) == 1, leases
    return leases[0]


# --- submit / get ------------------------------------------------------------------------


def test_submit_then_get_and_lease_round_trip(store: QueueStore) -> None:
    new = request(
        "r1",
        headers=[("x-trace", "abc"), ("x-trace", "def")],
        query_string=b"a=1&b=2",
        webhook="http://127.0.0.1:9/hook",
    )
    store.submit(new, T0)

    record = store.get(API, "r1")
    assert record is not None
    assert (record.api, record.id, record.status) == (API, "r1", Status.IN_QUEUE)
    assert (record.attempts, record.max_attempts, record.created_at) == (0, 3, T0)
    assert record.started_at is None and record.finished_at is None
    assert record.result is None and record.error is None
    assert record.webhook == "http://127.0.0.1:9/hook"
    assert store.get(API, "nope") is None
    assert store.get("other-api", "r1") is None

    lease = lease_one(store, T0 + 1, lease_s=30)
    assert (lease.api, lease.id, lease.body, lease.content_type) == (API, "r1", b'{"x": 1}', "application/json")
    assert lease.headers == [("x-trace", "abc"), ("x-trace", "def")]
    assert lease.query_string == b"a=1&b=2"
    assert lease.webhook == "http://127.0.0.1:9/hook"
    assert lease.attempt == 1
    assert lease.expires_at == T0 + 31
    assert len(lease.token) >= 16

    record = store.get(API, "r1")
    assert record is not None
    assert (record.status, record.attempts, record.started_at) == (Status.IN_PROGRESS, 1, T0 + 1)


def test_duplicate_id_is_refused(store: QueueStore) -> None:
    store.submit(request("r1", body=b"first"), T0)
    with pytest.raises(ValueError):
        store.submit(request("r1", body=b"second"), T0 + 1)
    # submit_many is one transaction: a duplicate in the batch stores nothing of it
    with pytest.raises(ValueError):
        store.submit_many([request("r2"), request("r1", body=b"third"), request("r3")], T0 + 2)
    assert store.get(API, "r2") is None and store.get(API, "r3") is None
    with pytest.raises(ValueError):
        store.submit_many([request("r4"), request("r4")], T0 + 3)
    assert store.get(API, "r4") is None
    assert lease_one(store, T0 + 4).body == b"first"
    assert store.lease(API, "w1", 10, 30, T0 + 4) == []


def test_survives_reopening(store_target: StoreTarget) -> None:
    first = store_target.open()
    first.submit_many([request(f"r{i}") for i in range(3)], T0)
    first.close()
    second = store_target.open()
    try:
        assert [lease.id for lease in second.lease(API, "w1", 10, 30, T0)] == ["r0", "r1", "r2"]
    finally:
        second.close()


def _submit_and_die(target: StoreTarget) -> None:
    queue = target.open()
    queue.submit(request("accepted"), T0)
    os._exit(0)  # no close, no flush: what submit stored must already be durable


def test_submit_is_durable_when_the_process_dies(store_target: StoreTarget, store: QueueStore) -> None:
    child = multiprocessing.get_context("spawn").Process(target=_submit_and_die, args=(store_target,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    record = store.get(API, "accepted")
    assert record is not None and record.status is Status.IN_QUEUE


def test_large_bodies_round_trip(store: QueueStore) -> None:
    body = os.urandom(1024 * 1024)
    result = os.urandom(1024 * 1024)
    store.submit(request("big", body=body), T0)
    lease = lease_one(store, T0)
    assert lease.body == body
    assert store.complete(lease, result, "application/octet-stream", 200, T0 + 1)
    record = store.get(API, "big")
    assert record is not None and record.result == result


# --- leasing -----------------------------------------------------------------------------


def test_lease_is_fifo_and_bounded_by_count(store: QueueStore) -> None:
    for i in range(5):
        store.submit(request(f"r{i}"), T0 + i)
    store.submit_many([request(f"b{i}") for i in range(4)], T0 + 10)  # same time: batch order

    first = store.lease(API, "w1", 2, 30, T0 + 20)
    assert [lease.id for lease in first] == ["r0", "r1"]
    rest = store.lease(API, "w1", 100, 30, T0 + 20)
    assert [lease.id for lease in rest] == ["r2", "r3", "r4", "b0", "b1", "b2", "b3"]
    assert len({lease.token for lease in first + rest}) == 9
    assert store.lease(API, "w1", 10, 30, T0 + 20) == []
    assert store.lease(API, "w1", 0, 30, T0 + 20) == []


def test_other_apis_are_never_leased(store: QueueStore) -> None:
    store.submit_many([request("a1", api="alpha"), request("b1", api="beta"), request("a2", api="alpha")], T0)
    leases = store.lease("alpha", "w1", 10, 1000, T0)
    assert [(lease.api, lease.id) for lease in leases] == [("alpha", "a1"), ("alpha", "a2")]
    assert store.lease("gamma", "w1", 10, 30, T0) == []
    # beta's lease expires; leasing alpha must neither take it nor hand it out
    beta = lease_one(store, T0, api="beta", lease_s=5)
    assert store.lease("alpha", "w2", 10, 30, T0 + 100) == []
    again = lease_one(store, T0 + 100, api="beta", worker="w2")
    assert (again.id, again.attempt) == ("b1", 2)
    assert not store.complete(beta, b"late", "text/plain", 200, T0 + 100)


def test_two_workers_never_share_a_lease(store_target: StoreTarget, store: QueueStore) -> None:
    store.submit_many([request(f"r{i}") for i in range(10)], T0)
    other = store_target.open()  # a second instance, as a replica would have
    try:
        a = store.lease(API, "worker-a", 4, 30, T0)
        b = other.lease(API, "worker-b", 4, 30, T0)
        c = store.lease(API, "worker-a", 4, 30, T0)
    finally:
        other.close()
    ids = [lease.id for lease in a + b + c]
    assert sorted(ids) == sorted(f"r{i}" for i in range(10))
    assert len(ids) == 10


def test_threads_racing_lease_each_item_exactly_once(store: QueueStore) -> None:
    store.submit_many([request(f"r{i:03d}") for i in range(500)], T0)
    start = threading.Barrier(8)
    got: list[list[str]] = [[] for _ in range(8)]
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            start.wait()
            while leases := store.lease(API, f"thread-{n}", 1, 60, T0):
                got[n].extend(lease.id for lease in leases)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    counts = Counter(id_ for ids in got for id_ in ids)
    assert len(counts) == 500
    assert set(counts.values()) == {1}


def _lease_until_empty(target: StoreTarget, worker: str, start: threading.Barrier, out: Path) -> None:
    queue = target.open()
    try:
        start.wait(60)
        ids: list[str] = []
        while leases := queue.lease(API, worker, 1, 60, T0):
            ids.extend(lease.id for lease in leases)
        out.write_text(json.dumps(ids))
    finally:
        queue.close()


def test_processes_racing_lease_each_item_exactly_once(store_target: StoreTarget, tmp_path: Path) -> None:
    total, workers = 2000, 4
    setup = store_target.open()
    try:
        for start_at in range(0, total, 500):
            setup.submit_many([request(f"r{i:04d}") for i in range(start_at, start_at + 500)], T0)
    finally:
        setup.close()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(workers)
    outs = [tmp_path / f"worker-{n}.json" for n in range(workers)]
    procs = [
        ctx.Process(target=_lease_until_empty, args=(store_target, f"proc-{n}", start, outs[n])) for n in range(workers)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0] * workers
    per_worker = [json.loads(out.read_text()) for out in outs]
    counts = Counter(id_ for ids in per_worker for id_ in ids)
    assert len(counts) == total
    assert set(counts.values()) == {1}


# --- renew, expiry, completion -----------------------------------------------------------


def test_renew_keeps_the_lease(store: QueueStore) -> None:
    store.submit(request("r1"), T0)
    lease = lease_one(store, T0, lease_s=10)
    assert store.renew([lease], 10, T0 + 8) == []  # now held until T0 + 18
    assert store.lease(API, "w2", 1, 10, T0 + 15) == []
    assert store.backlog(API, T0 + 15) == Backlog(in_queue=0, in_progress=1)
    assert store.complete(lease, b"ok", "text/plain", 200, T0 + 16)
    record = store.get(API, "r1")
    assert record is not None and (record.status, record.attempts) == (Status.COMPLETED, 1)


def test_expired_lease_returns_to_the_queue_and_its_stale_holder_loses(store: QueueStore) -> None:
    store.submit(request("r1"), T0)
    stale = lease_one(store, T0, worker="w1", lease_s=10)
    current = lease_one(store, T0 + 11, worker="w2", lease_s=10)
    assert (current.id, current.attempt) == ("r1", 2)
    assert current.token != stale.token

    assert store.renew([stale, current], 10, T0 + 12) == ["r1"]  # only the stale one is lost
    assert not store.complete(stale, b"stale", "text/plain", 200, T0 + 12)
    assert not store.fail(stale, "stale error", True, T0 + 12)
    record = store.get(API, "r1")
    assert record is not None
    assert (record.status, record.attempts, record.result, record.error) == (Status.IN_PROGRESS, 2, None, None)

    assert store.complete(current, b"fresh", "text/plain", 200, T0 + 13)
    assert not store.complete(stale, b"stale", "text/plain", 200, T0 + 14)
    record = store.get(API, "r1")
    assert record is not None and (record.status, record.result) == (Status.COMPLETED, b"fresh")


def test_complete_records_the_result_exactly_once(store: QueueStore) -> None:
    store.submit(request("r1"), T0)
    lease = lease_one(store, T0 + 1)
    assert store.complete(lease, b'{"label": "pos"}', "application/json", 201, T0 + 2)
    record = store.get(API, "r1")
    assert record is not None
    assert record.status is Status.COMPLETED
    assert (record.result, record.result_type, record.result_status) == (b'{"label": "pos"}', "application/json", 201)
    assert (record.started_at, record.finished_at, record.attempts) == (T0 + 1, T0 + 2, 1)

    assert not store.complete(lease, b"again", "text/plain", 200, T0 + 3)
    assert not store.fail(lease, "too late", True, T0 + 3)
    assert store.renew([lease], 30, T0 + 3) == ["r1"]
    record = store.get(API, "r1")
    assert record is not None and (record.result, record.finished_at) == (b'{"label": "pos"}', T0 + 2)
    assert store.lease(API, "w2", 10, 30, T0 + 1000) == []
    assert store.backlog(API, T0 + 1000) == Backlog(in_queue=0, in_progress=0)


def test_fail_with_retry_requeues_until_max_attempts(store: QueueStore) -> None:
    store.submit(request("r1", max_attempts=3), T0)
    for attempt in (1, 2, 3):
        lease = lease_one(store, T0 + attempt)
        assert lease.attempt == attempt
        assert store.fail(lease, f"boom {attempt}", True, T0 + attempt)
        record = store.get(API, "r1")
        assert record is not None and record.error == f"boom {attempt}"
        if attempt < 3:
            assert (record.status, record.finished_at) == (Status.IN_QUEUE, None)
    record = store.get(API, "r1")
    assert record is not None and record.status is Status.FAILED
    assert (record.attempts, record.finished_at) == (3, T0 + 3)
    assert store.lease(API, "w1", 10, 30, T0 + 10) == []
    assert [dead.id for dead in store.dead_letters(API)] == ["r1"]


def test_fail_without_retry_fails_at_once(store: QueueStore) -> None:
    store.submit(request("r1", max_attempts=5), T0)
    lease = lease_one(store, T0)
    assert store.fail(lease, "bad input", False, T0 + 1)
    record = store.get(API, "r1")
    assert record is not None
    assert (record.status, record.attempts, record.error, record.finished_at) == (Status.FAILED, 1, "bad input", T0 + 1)
    assert store.lease(API, "w1", 10, 30, T0 + 2) == []


def test_lease_expiring_past_max_attempts_fails_the_request(store: QueueStore) -> None:
    store.submit(request("r1", max_attempts=2), T0)
    first = lease_one(store, T0, lease_s=10)
    second = lease_one(store, T0 + 20, lease_s=10)
    assert (first.attempt, second.attempt) == (1, 2)
    assert store.lease(API, "w1", 10, 10, T0 + 40) == []
    record = store.get(API, "r1")
    assert record is not None
    assert (record.status, record.attempts) == (Status.FAILED, 2)
    assert record.error is not None and "lease expired after 2 attempts" in record.error
    assert not store.complete(second, b"late", "text/plain", 200, T0 + 41)
    assert [dead.id for dead in store.dead_letters(API)] == ["r1"]


def test_dead_letters_are_newest_first_per_api_and_limited(store: QueueStore) -> None:
    store.submit_many([request(f"r{i}", max_attempts=1) for i in range(4)] + [request("x", api="other")], T0)
    store.submit(request("ok"), T0)
    for i in range(4):
        assert store.fail(lease_one(store, T0 + i), f"error {i}", True, T0 + i)
    assert store.fail(lease_one(store, T0, api="other"), "elsewhere", False, T0)
    assert store.complete(lease_one(store, T0 + 5), b"fine", "text/plain", 200, T0 + 5)

    dead = store.dead_letters(API)
    assert [record.id for record in dead] == ["r3", "r2", "r1", "r0"]
    assert [record.error for record in dead] == ["error 3", "error 2", "error 1", "error 0"]
    assert all(record.status is Status.FAILED for record in dead)
    assert [record.id for record in store.dead_letters(API, limit=2)] == ["r3", "r2"]
    assert [record.id for record in store.dead_letters("other")] == ["x"]
    assert store.dead_letters("nobody") == []


def test_backlog_counts_queued_and_in_progress(store: QueueStore) -> None:
    assert store.backlog(API, T0) == Backlog(in_queue=0, in_progress=0)
    store.submit_many([request(f"r{i}") for i in range(5)] + [request("x", api="other")], T0)
    assert store.backlog(API, T0) == Backlog(in_queue=5, in_progress=0)
    short = store.lease(API, "w1", 2, 10, T0)
    long = store.lease(API, "w1", 1, 100, T0)
    assert store.backlog(API, T0 + 1) == Backlog(in_queue=2, in_progress=3)
    assert store.complete(long[0], b"ok", "text/plain", 200, T0 + 2)
    assert store.backlog(API, T0 + 2) == Backlog(in_queue=2, in_progress=2)
    # expired leases will be delivered again: they count as queued, not in progress
    assert store.backlog(API, T0 + 50) == Backlog(in_queue=4, in_progress=0)
    assert len(short) == 2
    assert store.backlog("other", T0 + 50) == Backlog(in_queue=1, in_progress=0)


def test_backlog_in_detail_has_the_oldest_arrival_and_the_recent_latency(store: QueueStore) -> None:
    empty = store.backlog(API, T0, detail=True)
    assert (empty.oldest_queued_at, empty.latency_p50_s) == (None, None)
    store.submit(request("a"), T0)
    store.submit(request("b"), T0 + 1)
    store.submit(request("c"), T0 + 2)
    assert store.backlog(API, T0 + 3, detail=True).oldest_queued_at == T0
    assert store.backlog(API, T0 + 3).oldest_queued_at is None  # the autoscaler's cheap reading
    assert store.complete(lease_one(store, T0 + 3), b"ok", "text/plain", 200, T0 + 4)  # a: 4 s
    assert store.complete(lease_one(store, T0 + 4), b"ok", "text/plain", 200, T0 + 7)  # b: 6 s
    backlog = store.backlog(API, T0 + 8, detail=True)
    assert backlog == Backlog(in_queue=1, in_progress=0)
    assert backlog.oldest_queued_at == T0 + 2
    assert backlog.latency_p50_s == pytest.approx(5.0)
    assert store.backlog(API, T0 + 7 + 61, detail=True).latency_p50_s is None  # out of the last minute


def test_counts_by_stored_status(store: QueueStore) -> None:
    assert store.counts(API) == Counts(in_queue=0, in_progress=0, completed=0, failed=0)
    store.submit_many([request(f"r{i}", max_attempts=1) for i in range(6)] + [request("x", api="other")], T0)
    done, dead, expired, held = store.lease(API, "w1", 4, 10, T0)
    assert store.complete(done, b"ok", "text/plain", 200, T0 + 1)
    assert store.fail(dead, "no", False, T0 + 1)
    assert store.renew([held], 100, T0 + 1) == []
    # the expired lease counts as in progress until a `lease` call takes it back
    assert store.counts(API) == Counts(in_queue=2, in_progress=2, completed=1, failed=1)
    assert store.lease(API, "w2", 1, 10, T0 + 50)[0].id == "r4"  # r2 had its one attempt: failed
    assert store.counts(API) == Counts(in_queue=1, in_progress=2, completed=1, failed=2)
    assert store.counts("other") == Counts(in_queue=1, in_progress=0, completed=0, failed=0)
    assert expired.id == "r2"


def test_purge_removes_only_finished_requests_older_than_the_cutoff(store: QueueStore) -> None:
    store.submit_many([request(name, max_attempts=1) for name in ("done-old", "failed-old", "done-new")], T0)
    store.submit_many([request("leased"), request("waiting")], T0)
    assert store.complete(lease_one(store, T0 + 1), b"ok", "text/plain", 200, T0 + 1)
    assert store.fail(lease_one(store, T0 + 2), "no", False, T0 + 2)
    assert store.complete(lease_one(store, T0 + 10), b"ok", "text/plain", 200, T0 + 10)
    store.submit(request("later"), T0 + 11)
    leased = store.lease(API, "w1", 1, 1000, T0 + 11)
    assert [lease.id for lease in leased] == ["leased"]

    assert store.purge(T0 + 5) == 2
    assert store.get(API, "done-old") is None and store.get(API, "failed-old") is None
    for kept in ("done-new", "leased", "waiting", "later"):
        assert store.get(API, kept) is not None, kept
    assert store.dead_letters(API) == []
    assert store.purge(T0 + 5) == 0
    assert store.purge(T0 + 1_000_000) == 1  # done-new; queued and in-progress work is never purged
    assert store.backlog(API, T0 + 12) == Backlog(in_queue=2, in_progress=1)


# --- a deleted API, webhook outcomes, durability ---------------------------------------------


def test_fail_all_dead_letters_every_unfinished_request_of_one_api(store: QueueStore) -> None:
    store.submit_many([request(f"r{i}") for i in range(5)] + [request("x", api="other")], T0)
    done, held = store.lease(API, "w1", 2, 30, T0 + 1)
    assert store.complete(done, b"ok", "text/plain", 200, T0 + 2)

    assert store.fail_all(API, "the API was deleted", T0 + 3) == 4  # 3 queued, 1 leased
    assert store.lease(API, "w2", 10, 30, T0 + 4) == []
    assert not store.complete(held, b"late", "text/plain", 200, T0 + 5)  # its holder lost it
    assert store.renew([held], 30, T0 + 5) == [held.id]
    for name in ("r1", "r2", "r3", "r4"):
        record = store.get(API, name)
        assert record is not None, name
        assert (record.status, record.error, record.finished_at) == (Status.FAILED, "the API was deleted", T0 + 3)
    done_record = store.get(API, "r0")
    assert done_record is not None and done_record.status is Status.COMPLETED  # finished work is kept as it was
    assert {r.id for r in store.dead_letters(API)} == {"r1", "r2", "r3", "r4"}
    assert store.counts(API) == Counts(in_queue=0, in_progress=0, completed=1, failed=4)
    assert store.backlog(API, T0 + 5) == Backlog(in_queue=0, in_progress=0)
    assert store.counts("other") == Counts(in_queue=1, in_progress=0, completed=0, failed=0)  # untouched
    assert store.fail_all(API, "again", T0 + 6) == 0
    # an API deployed again under the name starts from an empty queue and works as before
    store.submit(request("new"), T0 + 7)
    assert lease_one(store, T0 + 8, worker="w3").id == "new"


def test_fail_all_handles_more_than_one_batch(store: QueueStore) -> None:
    store.submit_many([request(f"r{i}") for i in range(2500)], T0)
    store.lease(API, "w1", 700, 30, T0 + 1)
    assert store.fail_all(API, "deleted", T0 + 2) == 2500
    assert store.counts(API) == Counts(in_queue=0, in_progress=0, completed=0, failed=2500)


def test_record_webhook_keeps_the_outcome_on_the_request(store: QueueStore) -> None:
    store.submit(request("r1", webhook="https://hooks.example.com/x"), T0)
    assert store.complete(lease_one(store, T0 + 1), b"ok", "text/plain", 200, T0 + 2)
    record = store.get(API, "r1")
    assert record is not None and record.webhook_result is None
    assert store.record_webhook(API, "r1", "delivered: HTTP 204")
    record = store.get(API, "r1")
    assert record is not None and record.webhook_result == "delivered: HTTP 204"
    assert record.status is Status.COMPLETED and record.result == b"ok"
    assert not store.record_webhook(API, "gone", "refused")
    assert store.get(API, "gone") is None


def test_fsync_durability_round_trips_on_every_backend(store: QueueStore) -> None:
    """`durability="fsync"` changes when submit returns (after the disk has it), not what is stored."""
    fsynced = NewRequest(api=API, id="f1", body=b"{}", content_type="application/json", durability="fsync")
    store.submit_many([fsynced, request("n1")], T0)
    store.submit(NewRequest(api=API, id="f2", body=b"{}", content_type="application/json", durability="fsync"), T0)
    assert [lease.id for lease in store.lease(API, "w1", 10, 30, T0 + 1)] == ["f1", "n1", "f2"]
    with pytest.raises(ValueError):
        store.submit(fsynced, T0 + 2)  # duplicates are refused as before


# --- queue tools: listing, requeue, cancel -------------------------------------------------------


def test_listings_carry_the_body_and_get_does_not(store: QueueStore) -> None:
    store.submit(request("r1", body=b'{"big": 1}', max_attempts=1), T0)
    assert store.fail(lease_one(store, T0 + 1), "boom", False, T0 + 2)
    (dead,) = store.dead_letters(API)
    assert (dead.body, dead.content_type) == (b'{"big": 1}', "application/json")
    record = store.get(API, "r1")
    assert record is not None and (record.body, record.content_type) == (None, None)


def test_list_requests_is_oldest_first_by_status(store: QueueStore) -> None:
    store.submit_many([request(f"r{i}") for i in range(4)] + [request("x", api="other")], T0)
    store.submit(request("early"), T0 - 10)
    leased = lease_one(store, T0 + 1)  # "early": the oldest
    assert store.complete(lease_one(store, T0 + 2), b"ok", "text/plain", 200, T0 + 3)  # r0

    queued = store.list_requests(API, Status.IN_QUEUE)
    assert [r.id for r in queued] == ["r1", "r2", "r3"]
    assert all(r.status is Status.IN_QUEUE and r.body == b'{"x": 1}' for r in queued)
    assert [r.id for r in store.list_requests(API, Status.IN_PROGRESS)] == [leased.id] == ["early"]
    assert [r.id for r in store.list_requests(API)] == ["early", "r1", "r2", "r3"]
    assert [r.id for r in store.list_requests(API, limit=2)] == ["early", "r1"]
    assert [r.id for r in store.list_requests("other")] == ["x"]
    assert store.list_requests("nobody") == []
    with pytest.raises(ValueError, match="only pending requests"):
        store.list_requests(API, Status.FAILED)


def test_requeued_dead_letter_runs_again_as_new(store: QueueStore) -> None:
    new = request("r1", max_attempts=2, headers=[("x-trace", "t")], query_string=b"q=1", webhook="http://h/x")
    store.submit(new, T0)
    store.submit(request("ok"), T0 + 0.5)
    for attempt in (1, 2):
        assert store.fail(lease_one(store, T0 + attempt), f"boom {attempt}", True, T0 + attempt)
    assert store.requeue(API, ["ok", "r1", "nope", "r1"], T0 + 10) == ["r1"]

    record = store.get(API, "r1")
    assert record is not None
    assert (record.status, record.attempts, record.max_attempts) == (Status.IN_QUEUE, 0, 2)
    assert (record.error, record.finished_at, record.created_at) == (None, None, T0)
    assert store.dead_letters(API) == []
    assert store.counts(API) == Counts(in_queue=2, in_progress=0, completed=0, failed=0)
    lease = lease_one(store, T0 + 11)  # its arrival place: ahead of "ok"
    assert (lease.id, lease.attempt, lease.body) == ("r1", 1, b'{"x": 1}')
    assert (lease.headers, lease.query_string, lease.webhook) == ([("x-trace", "t")], b"q=1", "http://h/x")
    assert store.complete(lease, b"fine", "text/plain", 200, T0 + 12)
    record = store.get(API, "r1")
    assert record is not None and (record.status, record.result, record.attempts) == (Status.COMPLETED, b"fine", 1)
    assert store.purge(T0 + 11.5) == 0  # its old failure no longer counts


def test_requeue_of_every_dead_letter_is_per_api(store: QueueStore) -> None:
    store.submit_many([request(f"r{i}", max_attempts=1) for i in range(3)] + [request("x", api="other")], T0)
    for i in range(3):
        assert store.fail(lease_one(store, T0 + i), "boom", False, T0 + i)
    assert store.fail(lease_one(store, T0, api="other"), "boom", False, T0)
    assert store.requeue(API, None, T0 + 10) == ["r0", "r1", "r2"]  # oldest failure first
    assert store.requeue(API, None, T0 + 11) == []
    assert store.requeue(API, [], T0 + 11) == []
    assert [r.id for r in store.dead_letters("other")] == ["x"]
    assert store.backlog(API, T0 + 12) == Backlog(in_queue=3, in_progress=0)


def test_cancel_fails_a_queued_request_and_it_is_never_leased(store: QueueStore) -> None:
    store.submit_many([request("r1"), request("r2")], T0)
    cancelled, record = store.cancel(API, "r1", T0 + 1)
    assert cancelled and record is not None
    assert (record.status, record.error, record.finished_at) == (Status.FAILED, CANCELLED, T0 + 1)
    assert [lease.id for lease in store.lease(API, "w1", 10, 30, T0 + 2)] == ["r2"]
    assert [r.id for r in store.dead_letters(API)] == ["r1"]
    assert store.cancel(API, "nope", T0 + 3) == (False, None)
    assert store.requeue(API, ["r1"], T0 + 4) == ["r1"]  # a cancelled request is a dead letter
    assert lease_one(store, T0 + 5).id == "r1"


def test_cancel_of_a_leased_request_takes_the_lease_away(store: QueueStore) -> None:
    store.submit(request("r1"), T0)
    lease = lease_one(store, T0 + 1)
    cancelled, record = store.cancel(API, "r1", T0 + 2)
    assert cancelled and record is not None and (record.status, record.error) == (Status.FAILED, CANCELLED)
    assert store.renew([lease], 30, T0 + 3) == ["r1"]
    assert not store.complete(lease, b"late", "text/plain", 200, T0 + 3)
    assert not store.fail(lease, "late", True, T0 + 3)
    record = store.get(API, "r1")
    assert record is not None and (record.status, record.result, record.error) == (Status.FAILED, None, CANCELLED)
    assert store.backlog(API, T0 + 100) == Backlog(in_queue=0, in_progress=0)
    assert store.lease(API, "w2", 10, 30, T0 + 100) == []


def test_cancel_leaves_a_finished_request_as_it_is(store: QueueStore) -> None:
    store.submit(request("r1"), T0)
    assert store.complete(lease_one(store, T0 + 1), b"done", "text/plain", 200, T0 + 2)
    cancelled, record = store.cancel(API, "r1", T0 + 3)
    assert not cancelled and record is not None
    assert (record.status, record.result, record.finished_at) == (Status.COMPLETED, b"done", T0 + 2)
