"""The queue store interface shared by the SQLite and Redis backends.

Delivery is at-least-once: a replica *leases* work for `lease_s` seconds and renews the lease while
it works; work whose lease expires (its replica died) goes back to the queue, and after
`max_attempts` deliveries it is failed with its last error (a dead letter). Completion is
exactly-once: only the current lease holder can complete or fail an item, so a result is
recorded (and visible) once even when a slow replica and its successor both finish.

Every method is synchronous and safe to call from several threads and processes at once;
callers on an event loop run them in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol

Durability = Literal["normal", "fsync"]


API_DELETED = "the API was deleted before this request finished"  # the error of its unfinished requests
CANCELLED = "cancelled by the operator"  # the error of a request `cancel` failed
REQUEUE_LIMIT = 1000  # `requeue` of every dead letter takes at most this many per call


class StoreUnavailable(Exception):
    """The store cannot take this write now (a full disk, Redis out of memory, a server that is
    down): nothing of the write was stored, and what was stored before is intact. Retry later."""


class StoreFull(StoreUnavailable):
    """The store is out of space: the disk (SQLite) or the server's `maxmemory` (Redis) is full."""


class Status(StrEnum):
    IN_QUEUE = "in_queue"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


def pending_statuses(status: Status | None) -> list[Status]:
    """What `list_requests(status=...)` lists: ValueError for a finished status."""
    if status is None:
        return [Status.IN_QUEUE, Status.IN_PROGRESS]
    if Status(status) not in (Status.IN_QUEUE, Status.IN_PROGRESS):
        raise ValueError(f"only pending requests are listed (in_queue, in_progress), not {status}")
    return [Status(status)]


@dataclass(frozen=True)
class NewRequest:
    api: str
    id: str  # chosen by the caller (the gateway: a uuid4 hex)
    body: bytes
    content_type: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    query_string: bytes = b""
    webhook: str | None = None
    max_attempts: int = 3
    # "fsync": on stable storage (it survives a power loss) when `submit` returns; "normal": it
    # survives the crash of any process, and a power loss may lose the last commits.
    durability: Durability = "normal"


@dataclass(frozen=True)
class Lease:
    """A request handed to one worker until `expires_at`."""

    api: str
    id: str
    body: bytes
    content_type: str
    headers: list[tuple[str, str]]
    query_string: bytes
    attempt: int  # 1 for the first delivery
    token: str  # identifies this delivery; complete/fail/renew need it
    expires_at: float
    webhook: str | None


@dataclass(frozen=True)
class RequestRecord:
    api: str
    id: str
    status: Status
    attempts: int
    max_attempts: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    result: bytes | None = None  # the response body, when completed
    result_type: str | None = None  # its content type
    result_status: int | None = None  # the predictor's HTTP status
    error: str | None = None  # the last error
    webhook: str | None = None
    webhook_result: str | None = None  # how the webhook call ended: delivered, refused, gave up
    # The request's input: loaded by the listings (`dead_letters`, `list_requests`) only, not by `get`.
    body: bytes | None = None
    content_type: str | None = None


LATENCY_WINDOW_S = 60.0  # `Backlog.latency_p50_s` looks at requests finished this recently
LATENCY_SAMPLE = 1000  # at most this many of them


@dataclass(frozen=True)
class Backlog:
    in_queue: int
    in_progress: int
    # For people (`cirrus get`), not compared: when the oldest queued request arrived, and the median
    # time from arrival to result of the requests completed in the last LATENCY_WINDOW_S.
    oldest_queued_at: float | None = field(default=None, compare=False)
    latency_p50_s: float | None = field(default=None, compare=False)


def median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@dataclass(frozen=True)
class Counts:
    """Requests of one API by stored status (a batch job's progress)."""

    in_queue: int
    in_progress: int  # an expired lease counts here until a `lease` call takes it back
    completed: int
    failed: int


class QueueStore(Protocol):
    def submit(self, request: NewRequest, now: float) -> None:
        """Store a request durably (it is on disk / in Redis when this returns, as its `durability`
        asks). Duplicate ids raise ValueError; a full store raises StoreFull, and a store that cannot
        write now StoreUnavailable (nothing of the request is stored then)."""
        ...

    def submit_many(self, requests: list[NewRequest], now: float) -> None:
        """`submit` for several requests in one transaction (the gateway batches its accepts): all
        of them are stored, or none."""
        ...

    def lease(self, api: str, worker: str, count: int, lease_s: float, now: float) -> list[Lease]:
        """Up to `count` queued requests of `api`, oldest first, leased to `worker`; expired leases
        are returned to the queue first (or failed, past max_attempts)."""
        ...

    def renew(self, leases: list[Lease], lease_s: float, now: float) -> list[str]:
        """Extend leases still held; returns the ids whose lease was lost (do not complete those)."""
        ...

    def complete(self, lease: Lease, result: bytes, result_type: str, result_status: int, now: float) -> bool:
        """Record the result if `lease` is still the current delivery; False if it was lost."""
        ...

    def fail(self, lease: Lease, error: str, retry: bool, now: float) -> bool:
        """Give up this delivery: back to the queue when `retry` and attempts remain, else failed."""
        ...

    def fail_all(self, api: str, error: str, now: float) -> int:
        """Fail every queued and leased request of `api` with `error` (dead letters); a worker that
        holds one of them can no longer complete it. Returns how many (the API was deleted)."""
        ...

    def record_webhook(self, api: str, id: str, outcome: str) -> bool:
        """Note how a finished request's webhook call ended; False if the request is gone."""
        ...

    def get(self, api: str, id: str) -> RequestRecord | None: ...

    def backlog(self, api: str, now: float, detail: bool = False) -> Backlog:
        """Queued and in-progress counts (the autoscaler's metric for async APIs); with `detail`, also
        the oldest queued request's arrival and the recent latency (more reads: for people)."""
        ...

    def dead_letters(self, api: str, limit: int = 100) -> list[RequestRecord]:
        """Failed requests, newest first, with their body."""
        ...

    def list_requests(self, api: str, status: Status | None = None, limit: int = 100) -> list[RequestRecord]:
        """Pending requests of `api` in `status` (IN_QUEUE or IN_PROGRESS; None: both), oldest first, with
        their body. Finished statuses raise ValueError (`dead_letters` lists the failed ones)."""
        ...

    def requeue(self, api: str, ids: list[str] | None, now: float) -> list[str]:
        """Dead letters back to the queue, as new (attempts 0; id, body, headers and webhook kept; error,
        result and finish time cleared). `ids`: those of them (others are skipped); None: every dead letter
        of `api`, oldest failure first, at most REQUEUE_LIMIT per call. Returns the ids requeued."""
        ...

    def cancel(self, api: str, id: str, now: float) -> tuple[bool, RequestRecord | None]:
        """Fail a queued or in-progress request with the error CANCELLED (a dead letter, so `requeue`
        takes it back); a lease on it is lost, so its worker can no longer complete it. Returns whether
        it was cancelled now and its record (None: no such request; a finished one is left as it is)."""
        ...

    def counts(self, api: str) -> Counts:
        """How many requests of `api` are in each status."""
        ...

    def purge(self, older_than: float) -> int:
        """Delete finished requests that finished before `older_than`; returns how many."""
        ...

    def close(self) -> None: ...
