"""The Redis queue store: the same contract as the SQLite store, for several hosts sharing one queue.

This module imports redis-py, so it is itself imported only when a `redis://` URL is configured.

Key layout (`{api}` is a literal Redis Cluster hash tag, so all keys of one API share a slot):

    cirrus:apis                  set     every API that ever had a request (purge walks it)
    cirrus:{api}:seq             string  arrival counter
    cirrus:{api}:r:<id>          hash    one request: its input, status, lease and result
    cirrus:{api}:queue           zset    queued requests, scored by created_at (oldest first; a
                                         retried request keeps its place, ahead of newer ones)
    cirrus:{api}:inflight        zset    leased requests, scored by lease expiry
    cirrus:{api}:done            zset    finished requests (completed or failed), by finish time
    cirrus:{api}:dead            zset    failed requests (dead letters), by finish time

A request's member in the sorted sets is `<seq as 16 digits>:<id>` (kept in its hash as `member`),
so that equal scores fall back to arrival order, as the SQLite store's `ORDER BY ..., seq` does.

Every state change is one Lua script, so it is atomic against every other client: a request is in
exactly one of queue / inflight / done at any time, and only the holder of the current lease token
can complete, fail or renew it. As in the SQLite store, a lease is held while its token matches:
`renew` and `complete` accept a lease whose time has run out as long as no `lease` call has taken it
back yet; each `lease` call first takes back its API's expired leases (at most RECLAIM_LIMIT).

Timestamps are formatted in Python (`repr(float)`) and passed to the scripts as strings; Lua only
compares and stores them, so no precision is lost.

Durability. "Nothing accepted is lost" holds across a Redis crash only when Redis runs with the
append-only file: `appendonly yes` and `appendfsync everysec` (a Redis process crash loses nothing,
an OS crash or power loss at most the last second) or `appendfsync always` (nothing, at the cost of
an fsync per write). RDB snapshots alone (`save ...`) lose everything since the last snapshot.
The test server (`tests/redis_server.py`) runs with `--appendonly yes` and the default
`appendfsync everysec`. When the server answers `CONFIG GET appendonly` with `no`, the store logs a
warning once at start.

How often Redis fsyncs is the server's configuration (`appendfsync`), not the client's: it cannot
be chosen per API. A request with `durability="fsync"` is therefore followed, on the same
connection, by `WAITAOF 1 0 <timeout>` (Redis 7.2+, Valkey), which returns once the server's own
append-only file holds the write on disk, so its 202 means what it means on SQLite with FULL.
A server without the append-only file cannot promise that: such a submit raises StoreUnavailable
(checked from `CONFIG GET appendonly` at start where the server allows CONFIG; else the WAITAOF
error says it after the write, and the request may then be stored although it was refused).
`WAITAOF` does not wait for replicas: they are asynchronous (see below).

Out of memory. With `maxmemory` set, a write past it fails with OOM (StoreFull) and nothing of it
is written, as long as the server evicts nothing: `maxmemory-policy noeviction` (the default) is
required, since any other policy deletes accepted requests to make room. The store logs a warning
at start when the server says it runs with another policy. An append-only file that cannot be
written (a full disk) makes the server refuse writes with MISCONF, also StoreFull.

The target is one Redis server. Replicas (with Sentinel) are asynchronous: a failover can lose the
last writes the old primary acknowledged, so they add availability, not durability. The hash tags keep each
API's scripts in one slot, but `submit_many` across APIs and the `cirrus:apis` set are cross-slot,
so Redis Cluster is not supported as is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from cirrus.store.base import (
    CANCELLED,
    LATENCY_SAMPLE,
    LATENCY_WINDOW_S,
    REQUEUE_LIMIT,
    Backlog,
    Counts,
    Lease,
    NewRequest,
    RequestRecord,
    Status,
    StoreFull,
    StoreUnavailable,
    median,
    pending_statuses,
)

log = logging.getLogger(__name__)

_Arg = bytes | str | int | float  # what a script takes as an argument

# How many expired leases one call reclaims, and how many finished requests one purge step deletes:
# bounds the time a single script blocks the server.
RECLAIM_LIMIT = 1000
PURGE_BATCH = 1000
FSYNC_TIMEOUT_S = 5.0  # how long a `durability="fsync"` submit waits for the server's fsync

# Lua helpers shared by the scripts. A request's member in its API's sorted sets is
# "<seq, 16 digits>:<id>", so that equal scores fall back to arrival order.
_MEMBER_ID = """
local function member_id(member) return string.sub(member, 18) end
"""

# KEYS: cirrus:apis, then per request: its hash, its API's queue, its API's seq counter.
# ARGV: now, then per request 8 fields: id api body content_type headers query_string webhook max_attempts.
# Returns 0, or the 1-based position of the first request whose id is already taken (nothing is written).
_SUBMIT = """
local n = (#KEYS - 1) / 3
local seen = {}
for i = 1, n do
  local key = KEYS[3 * i - 1]
  if seen[key] or redis.call('EXISTS', key) == 1 then
    return i
  end
  seen[key] = true
end
local now = ARGV[1]
for i = 1, n do
  local key, queue = KEYS[3 * i - 1], KEYS[3 * i]
  local seq = redis.call('INCR', KEYS[3 * i + 1])
  local a = 8 * (i - 1) + 1
  local member = string.format('%016d', seq) .. ':' .. ARGV[a + 1]
  redis.call('HSET', key,
    'body', ARGV[a + 3], 'content_type', ARGV[a + 4], 'headers', ARGV[a + 5], 'query_string', ARGV[a + 6],
    'max_attempts', ARGV[a + 8], 'attempts', 0, 'status', 'in_queue', 'created_at', now, 'member', member)
  if ARGV[a + 7] ~= '' then
    redis.call('HSET', key, 'webhook', ARGV[a + 7])
  end
  redis.call('ZADD', queue, now, member)
  redis.call('SADD', KEYS[1], ARGV[a + 2])
end
return 0
"""

# KEYS: queue, inflight, done, dead (of one API).
# ARGV: now, count, expires_at, worker, token prefix, request key prefix, reclaim limit.
# First returns expired leases to the queue (or fails them, past max_attempts), then leases up to
# `count` queued requests, oldest first. Returns a list of leases, each
# {id, attempt, token, body, content_type, headers, query_string, webhook}.
_LEASE = (
    _MEMBER_ID
    + """
local queue, inflight, done, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, count, expires_at, worker, token_prefix, prefix =
  ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local expired = redis.call('ZRANGEBYSCORE', inflight, '-inf', now, 'LIMIT', 0, tonumber(ARGV[7]))
for _, member in ipairs(expired) do
  local key = prefix .. member_id(member)
  redis.call('ZREM', inflight, member)
  local f = redis.call('HMGET', key, 'attempts', 'max_attempts', 'created_at', 'error')
  if f[1] then
    redis.call('HDEL', key, 'token', 'expires_at', 'worker')
    if tonumber(f[1]) >= tonumber(f[2]) then
      local why = 'lease expired after ' .. f[1] .. ' attempts: the replica died or hung'
      if f[4] then why = why .. ' (last error: ' .. f[4] .. ')' end
      redis.call('HSET', key, 'status', 'failed', 'finished_at', now, 'error', why)
      redis.call('ZADD', done, now, member)
      redis.call('ZADD', dead, now, member)
    else
      redis.call('HSET', key, 'status', 'in_queue')
      redis.call('ZADD', queue, f[3], member)
    end
  end
end
local out = {}
if count > 0 then
  local popped = redis.call('ZPOPMIN', queue, count)
  for i = 1, #popped, 2 do
    local member = popped[i]
    local id = member_id(member)
    local key = prefix .. id
    if redis.call('EXISTS', key) == 1 then
      local attempt = redis.call('HINCRBY', key, 'attempts', 1)
      local token = token_prefix .. '.' .. ((i + 1) / 2)
      redis.call('HSET', key, 'status', 'in_progress', 'token', token, 'expires_at', expires_at, 'worker', worker,
        'started_at', now)
      redis.call('ZADD', inflight, expires_at, member)
      local f = redis.call('HMGET', key, 'body', 'content_type', 'headers', 'query_string', 'webhook')
      out[#out + 1] = {id, attempt, token, f[1], f[2], f[3], f[4], f[5]}
    end
  end
end
return out
"""
)

# KEYS: queue, inflight (of one API). ARGV: now, request key prefix, limit.
# Returns {queued, in progress}; an expired lease counts as queued (the next lease takes it back)
# unless it has no attempt left. Reads only.
_BACKLOG = (
    _MEMBER_ID
    + """
local queued, leased = redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local requeued = 0
for _, member in ipairs(expired) do
  local f = redis.call('HMGET', ARGV[2] .. member_id(member), 'attempts', 'max_attempts')
  if f[1] and tonumber(f[1]) < tonumber(f[2]) then requeued = requeued + 1 end
end
return {queued + requeued, leased - #expired}
"""
)

# KEYS: per lease: its hash, its API's inflight zset. ARGV: expires_at, then per lease: id, token.
# Returns the ids whose lease is no longer held.
_RENEW = """
local lost = {}
for i = 1, #KEYS / 2 do
  local key, inflight = KEYS[2 * i - 1], KEYS[2 * i]
  local f = redis.call('HMGET', key, 'status', 'token', 'member')
  if f[1] == 'in_progress' and f[2] == ARGV[2 * i + 1] then
    redis.call('HSET', key, 'expires_at', ARGV[1])
    redis.call('ZADD', inflight, ARGV[1], f[3])
  else
    lost[#lost + 1] = ARGV[2 * i]
  end
end
return lost
"""

# KEYS: hash, inflight, done. ARGV: token, now, result, result_type, result_status. Returns 1 or 0 (lost).
_COMPLETE = """
local key, inflight, done = KEYS[1], KEYS[2], KEYS[3]
local f = redis.call('HMGET', key, 'status', 'token', 'member')
if f[1] ~= 'in_progress' or f[2] ~= ARGV[1] then
  return 0
end
redis.call('HDEL', key, 'token', 'expires_at', 'worker')
redis.call('HSET', key, 'status', 'completed', 'finished_at', ARGV[2],
  'result', ARGV[3], 'result_type', ARGV[4], 'result_status', ARGV[5])
redis.call('ZREM', inflight, f[3])
redis.call('ZADD', done, ARGV[2], f[3])
return 1
"""

# KEYS: hash, queue, inflight, done, dead. ARGV: token, now, error, retry (1/0). Returns 1 or 0 (lost).
_FAIL = """
local key, queue, inflight, done, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = ARGV[2]
local f = redis.call('HMGET', key, 'status', 'token', 'member', 'attempts', 'max_attempts', 'created_at')
if f[1] ~= 'in_progress' or f[2] ~= ARGV[1] then
  return 0
end
redis.call('HDEL', key, 'token', 'expires_at', 'worker')
redis.call('ZREM', inflight, f[3])
if ARGV[4] == '1' and tonumber(f[4]) < tonumber(f[5]) then
  redis.call('HSET', key, 'status', 'in_queue', 'error', ARGV[3])
  redis.call('ZADD', queue, f[6], f[3])
else
  redis.call('HSET', key, 'status', 'failed', 'finished_at', now, 'error', ARGV[3])
  redis.call('ZADD', done, now, f[3])
  redis.call('ZADD', dead, now, f[3])
end
return 1
"""

# KEYS: done, dead (of one API). ARGV: older_than (exclusive), batch size, request key prefix.
# Deletes one batch of requests that finished before older_than; returns how many.
_PURGE = (
    _MEMBER_ID
    + """
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(members) do
  redis.call('DEL', ARGV[3] .. member_id(member))
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
end
return #members
"""
)

# KEYS: queue, inflight, done, dead (of one API). ARGV: now, error, request key prefix, batch size.
# Fails one batch of the API's queued, then leased, requests; returns how many.
_FAIL_ALL = (
    _MEMBER_ID
    + """
local queue, inflight, done, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, error, prefix, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local n = 0
for _, set in ipairs({queue, inflight}) do
  local members = redis.call('ZRANGE', set, 0, limit - n - 1)
  for _, member in ipairs(members) do
    local key = prefix .. member_id(member)
    redis.call('ZREM', set, member)
    if redis.call('EXISTS', key) == 1 then
      redis.call('HDEL', key, 'token', 'expires_at', 'worker')
      redis.call('HSET', key, 'status', 'failed', 'finished_at', now, 'error', error)
      redis.call('ZADD', done, now, member)
      redis.call('ZADD', dead, now, member)
    end
    n = n + 1
  end
  if n >= limit then break end
end
return n
"""
)

# KEYS: queue, done, dead (of one API). ARGV: request key prefix, limit, then the ids (none: the oldest
# `limit` dead letters). Each failed one goes back to the queue, in its arrival place, as new; returns those ids.
_REQUEUE = (
    _MEMBER_ID
    + """
local queue, done, dead = KEYS[1], KEYS[2], KEYS[3]
local ids = {}
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ARGV == 2 then
  for _, member in ipairs(redis.call('ZRANGE', dead, 0, tonumber(ARGV[2]) - 1)) do ids[#ids + 1] = member_id(member) end
end
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local f = redis.call('HMGET', key, 'status', 'member', 'created_at')
  if f[1] == 'failed' then
    redis.call('ZREM', done, f[2])
    redis.call('ZREM', dead, f[2])
    redis.call('HDEL', key, 'started_at', 'finished_at', 'result', 'result_type', 'result_status', 'error',
      'webhook_result')
    redis.call('HSET', key, 'status', 'in_queue', 'attempts', 0)
    redis.call('ZADD', queue, f[3], f[2])
    out[#out + 1] = id
  end
end
return out
"""
)

# KEYS: hash, queue, inflight, done, dead. ARGV: now, error. Fails a queued or leased request (its lease
# is lost); returns 1, or 0 when it is missing or already finished.
_CANCEL = """
local key, queue, inflight, done, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local f = redis.call('HMGET', key, 'status', 'member')
if f[1] == 'in_queue' then
  redis.call('ZREM', queue, f[2])
elseif f[1] == 'in_progress' then
  redis.call('ZREM', inflight, f[2])
  redis.call('HDEL', key, 'token', 'expires_at', 'worker')
else
  return 0
end
redis.call('HSET', key, 'status', 'failed', 'finished_at', ARGV[1], 'error', ARGV[2])
redis.call('ZADD', done, ARGV[1], f[2])
redis.call('ZADD', dead, ARGV[1], f[2])
return 1
"""

# KEYS: the request's hash. ARGV: outcome. Returns 1, or 0 when the request is gone (purged).
_RECORD_WEBHOOK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'webhook_result', ARGV[1])
return 1
"""

_RECORD_FIELDS = (
    "status",
    "attempts",
    "max_attempts",
    "created_at",
    "started_at",
    "finished_at",
    "result",
    "result_type",
    "result_status",
    "error",
    "webhook",
    "webhook_result",
)


@contextlib.contextmanager
def _write_errors(url: str) -> Iterator[None]:
    """Redis's refusals to write, as the store's errors (nothing of the write was applied)."""
    try:
        yield
    except redis.OutOfMemoryError as exc:
        raise StoreFull(f"the Redis queue store at {url} is out of memory (maxmemory): {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as exc:
        raise StoreUnavailable(f"the Redis queue store at {url} cannot take writes now: {exc}") from exc
    except redis.ResponseError as exc:
        if str(exc).startswith("MISCONF"):  # it cannot persist (e.g. its disk is full): it refuses writes
            raise StoreFull(f"the Redis queue store at {url} cannot persist writes: {exc}") from exc
        raise


def _ts(value: float) -> str:
    """A timestamp as Redis should store and compare it: the shortest exact decimal form."""
    return repr(float(value))


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _float(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _int(value: bytes | None) -> int | None:
    return None if value is None else int(value)


class RedisQueueStore:
    """`QueueStore` on one Redis server; safe to share between threads (redis-py pools connections)
    and to use from several processes and hosts at once."""

    def __init__(self, url: str, *, namespace: str = "cirrus", fsync_timeout_s: float = FSYNC_TIMEOUT_S) -> None:
        self._redis: Any = redis.Redis.from_url(url, decode_responses=False)
        kwargs = self._redis.connection_pool.connection_kwargs
        self._url = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"  # for messages
        self._ns = namespace
        self._fsync_timeout_s = fsync_timeout_s
        self._appendonly: bool | None = None  # None: the server does not say (CONFIG disabled)
        self._submit = self._redis.register_script(_SUBMIT)
        self._lease = self._redis.register_script(_LEASE)
        self._backlog = self._redis.register_script(_BACKLOG)
        self._renew = self._redis.register_script(_RENEW)
        self._complete = self._redis.register_script(_COMPLETE)
        self._fail = self._redis.register_script(_FAIL)
        self._purge = self._redis.register_script(_PURGE)
        self._fail_all = self._redis.register_script(_FAIL_ALL)
        self._record_webhook = self._redis.register_script(_RECORD_WEBHOOK)
        self._requeue = self._redis.register_script(_REQUEUE)
        self._cancel = self._redis.register_script(_CANCEL)
        self._check_durability()

    # --- keys ----------------------------------------------------------------------------

    def _key(self, api: str, name: str) -> str:
        return f"{self._ns}:{{{api}}}:{name}"

    def _request_prefix(self, api: str) -> str:
        return self._key(api, "r:")

    def _request_key(self, api: str, id: str) -> str:
        return self._request_prefix(api) + id

    # --- writes --------------------------------------------------------------------------

    def submit(self, request: NewRequest, now: float) -> None:
        self.submit_many([request], now)

    def submit_many(self, requests: list[NewRequest], now: float) -> None:
        if not requests:
            return
        keys: list[str] = [f"{self._ns}:apis"]
        args: list[_Arg] = [_ts(now)]
        for request in requests:
            if request.max_attempts < 1:
                raise ValueError(f"request {request.id}: max_attempts must be at least 1, not {request.max_attempts}")
            keys += [
                self._request_key(request.api, request.id),
                self._key(request.api, "queue"),
                self._key(request.api, "seq"),
            ]
            args += [
                request.id,
                request.api,
                request.body,
                request.content_type,
                json.dumps(request.headers),
                request.query_string,
                request.webhook or "",
                request.max_attempts,
            ]
        with _write_errors(self._url):
            if any(request.durability == "fsync" for request in requests):
                duplicate = self._submit_fsynced(keys, args)
            else:
                duplicate = int(self._submit(keys=keys, args=args))
        if duplicate:
            request = requests[duplicate - 1]
            raise ValueError(f"a request with id {request.id!r} already exists for API {request.api!r}")

    def _submit_fsynced(self, keys: list[str], args: list[_Arg]) -> int:
        """The submit script, then WAITAOF on the same connection: on the server's disk on return."""
        if self._appendonly is False:
            raise StoreUnavailable(
                f"the Redis queue store at {self._url} runs without the append-only file, so it cannot "
                "fsync a request (queue.durability: fsync): run it with `appendonly yes`"
            )
        with self._redis.pipeline(transaction=False) as pipe:
            self._submit(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAITAOF", 1, 0, int(self._fsync_timeout_s * 1000))
            try:
                duplicate, (local, _) = pipe.execute()
            except redis.ResponseError as exc:
                if "appendonly" not in str(exc):
                    raise
                raise StoreUnavailable(
                    f"the Redis queue store at {self._url} cannot fsync a request (queue.durability: fsync): "
                    f"{exc} Run it with `appendonly yes`; the refused request may have been stored."
                ) from exc
        if int(local) < 1:
            raise StoreUnavailable(
                f"the Redis queue store at {self._url} did not fsync within {self._fsync_timeout_s:g}s "
                "(the request is stored, but may be lost in a power loss)"
            )
        return int(duplicate)

    def lease(self, api: str, worker: str, count: int, lease_s: float, now: float) -> list[Lease]:
        if count <= 0:
            return []
        expires_at = now + lease_s
        keys = [self._key(api, name) for name in ("queue", "inflight", "done", "dead")]
        args: list[_Arg] = [
            _ts(now),
            count,
            _ts(expires_at),
            worker,
            secrets.token_hex(16),
            self._request_prefix(api),
            RECLAIM_LIMIT,
        ]
        return [
            Lease(
                api=api,
                id=id.decode(),
                body=body,
                content_type=content_type.decode(),
                headers=[(name, value) for name, value in json.loads(headers)],
                query_string=query_string,
                attempt=int(attempt),
                token=token.decode(),
                expires_at=expires_at,
                webhook=_text(webhook),
            )
            for id, attempt, token, body, content_type, headers, query_string, webhook in self._lease(
                keys=keys, args=args
            )
        ]

    def renew(self, leases: list[Lease], lease_s: float, now: float) -> list[str]:
        if not leases:
            return []
        keys: list[str] = []
        args: list[_Arg] = [_ts(now + lease_s)]
        for lease in leases:
            keys += [self._request_key(lease.api, lease.id), self._key(lease.api, "inflight")]
            args += [lease.id, lease.token]
        return [id.decode() for id in self._renew(keys=keys, args=args)]

    def complete(self, lease: Lease, result: bytes, result_type: str, result_status: int, now: float) -> bool:
        keys = [
            self._request_key(lease.api, lease.id),
            self._key(lease.api, "inflight"),
            self._key(lease.api, "done"),
        ]
        args: list[_Arg] = [lease.token, _ts(now), result, result_type, result_status]
        return bool(self._complete(keys=keys, args=args))

    def fail(self, lease: Lease, error: str, retry: bool, now: float) -> bool:
        keys = [
            self._request_key(lease.api, lease.id),
            *(self._key(lease.api, name) for name in ("queue", "inflight", "done", "dead")),
        ]
        args = [lease.token, _ts(now), error, "1" if retry else "0"]
        return bool(self._fail(keys=keys, args=args))

    def fail_all(self, api: str, error: str, now: float) -> int:
        keys = [self._key(api, name) for name in ("queue", "inflight", "done", "dead")]
        failed = 0
        with _write_errors(self._url):
            while True:
                n = int(self._fail_all(keys=keys, args=[_ts(now), error, self._request_prefix(api), RECLAIM_LIMIT]))
                failed += n
                if n < RECLAIM_LIMIT:
                    return failed

    def requeue(self, api: str, ids: list[str] | None, now: float) -> list[str]:
        if ids is not None and not ids:
            return []
        keys = [self._key(api, name) for name in ("queue", "done", "dead")]
        args: list[_Arg] = [self._request_prefix(api), REQUEUE_LIMIT, *dict.fromkeys(ids or [])]
        with _write_errors(self._url):
            return [id.decode() for id in self._requeue(keys=keys, args=args)]

    def cancel(self, api: str, id: str, now: float) -> tuple[bool, RequestRecord | None]:
        keys = [self._request_key(api, id), *(self._key(api, name) for name in ("queue", "inflight", "done", "dead"))]
        with _write_errors(self._url):
            cancelled = bool(self._cancel(keys=keys, args=[_ts(now), CANCELLED]))
        return cancelled, self.get(api, id)

    def record_webhook(self, api: str, id: str, outcome: str) -> bool:
        return bool(self._record_webhook(keys=[self._request_key(api, id)], args=[outcome]))

    def purge(self, older_than: float) -> int:
        purged = 0
        for raw_api in sorted(self._redis.smembers(f"{self._ns}:apis")):
            api = raw_api.decode()
            keys = [self._key(api, "done"), self._key(api, "dead")]
            while True:
                n = int(self._purge(keys=keys, args=[_ts(older_than), PURGE_BATCH, self._request_prefix(api)]))
                purged += n
                if n < PURGE_BATCH:
                    break
        return purged

    # --- reads ---------------------------------------------------------------------------

    def get(self, api: str, id: str) -> RequestRecord | None:
        values = self._redis.hmget(self._request_key(api, id), _RECORD_FIELDS)
        return self._record(api, id, values)

    def backlog(self, api: str, now: float, detail: bool = False) -> Backlog:
        """An expired lease counts as queued (the next `lease` takes it back) unless it has no attempt left."""
        keys = [self._key(api, "queue"), self._key(api, "inflight")]
        queued, in_progress = self._backlog(keys=keys, args=[_ts(now), self._request_prefix(api), RECLAIM_LIMIT])
        if not detail:
            return Backlog(int(queued), int(in_progress))
        oldest = self._redis.zrange(self._key(api, "queue"), 0, 0, withscores=True)
        return Backlog(
            int(queued),
            int(in_progress),
            oldest_queued_at=float(oldest[0][1]) if oldest else None,
            latency_p50_s=self._latency_p50(api, now),
        )

    def _latency_p50(self, api: str, now: float) -> float | None:
        """The median arrival-to-result time of the requests completed in the last LATENCY_WINDOW_S."""
        members = self._redis.zrevrangebyscore(
            self._key(api, "done"), "+inf", _ts(now - LATENCY_WINDOW_S), start=0, num=LATENCY_SAMPLE
        )
        with self._redis.pipeline(transaction=False) as pipe:
            for member in members:
                key = self._request_key(api, member.decode().partition(":")[2])
                pipe.hmget(key, "status", "created_at", "finished_at")
            rows = pipe.execute()
        took = [
            float(finished) - float(created)
            for status, created, finished in rows
            if status == b"completed" and created is not None and finished is not None
        ]
        return median(took)

    def dead_letters(self, api: str, limit: int = 100) -> list[RequestRecord]:
        if limit <= 0:
            return []
        return self._listed(api, self._redis.zrevrange(self._key(api, "dead"), 0, limit - 1))

    def list_requests(self, api: str, status: Status | None = None, limit: int = 100) -> list[RequestRecord]:
        """In-progress requests are read in lease-expiry order (at most `limit`), then sorted by arrival."""
        if limit <= 0:
            return []
        sets, wanted = {Status.IN_QUEUE: "queue", Status.IN_PROGRESS: "inflight"}, pending_statuses(status)
        members = [m for s in wanted for m in self._redis.zrange(self._key(api, sets[s]), 0, limit - 1)]
        records = [r for r in self._listed(api, members) if r.status in wanted]
        return sorted(records, key=lambda r: r.created_at)[:limit]

    def _listed(self, api: str, members: list[bytes]) -> list[RequestRecord]:
        """The records (with their bodies) of these sorted-set members, in their order."""
        ids = [member.decode().partition(":")[2] for member in members]
        with self._redis.pipeline(transaction=False) as pipe:
            for id in ids:
                pipe.hmget(self._request_key(api, id), [*_RECORD_FIELDS, "body", "content_type"])
            rows = pipe.execute()
        records = (self._record(api, id, values) for id, values in zip(ids, rows, strict=True))
        return [record for record in records if record is not None]

    def counts(self, api: str) -> Counts:
        with self._redis.pipeline(transaction=True) as pipe:
            for name in ("queue", "inflight", "done", "dead"):
                pipe.zcard(self._key(api, name))
            queued, leased, done, dead = (int(n) for n in pipe.execute())
        return Counts(in_queue=queued, in_progress=leased, completed=done - dead, failed=dead)

    def close(self) -> None:
        self._redis.close()

    # --- helpers -------------------------------------------------------------------------

    @staticmethod
    def _record(api: str, id: str, values: Iterable[bytes | None]) -> RequestRecord | None:
        """A record from the values of _RECORD_FIELDS, or of those and body, content_type."""
        row = dict(zip([*_RECORD_FIELDS, "body", "content_type"], values, strict=False))
        if row["status"] is None:
            return None
        return RequestRecord(
            api=api,
            id=id,
            status=Status(row["status"].decode()),
            attempts=int(row["attempts"] or 0),
            max_attempts=int(row["max_attempts"] or 0),
            created_at=float(row["created_at"] or 0),
            started_at=_float(row["started_at"]),
            finished_at=_float(row["finished_at"]),
            result=row["result"],
            result_type=_text(row["result_type"]),
            result_status=_int(row["result_status"]),
            error=_text(row["error"]),
            webhook=_text(row["webhook"]),
            webhook_result=_text(row["webhook_result"]),
            body=row.get("body"),
            content_type=_text(row.get("content_type")),
        )

    def _check_durability(self) -> None:
        """Warn (once, in the log) when the server would lose accepted requests in a crash or evict them."""
        try:
            config = {**self._redis.config_get("appendonly"), **self._redis.config_get("maxmemory-policy")}
        except redis.RedisError:  # CONFIG is often disabled on managed Redis: nothing to check
            return
        # redis-py answers str or bytes, depending on its version
        found = {_str(name): _str(value) for name, value in config.items()}
        self._appendonly = found.get("appendonly") != "no"
        if not self._appendonly:
            log.warning(
                "Redis at %s runs without the append-only file: queued requests are lost if it crashes. "
                "Run it with `appendonly yes` and `appendfsync everysec` (or `always`).",
                self._url,
            )
        evicts = found.get("maxmemory-policy", "noeviction")
        if evicts != "noeviction":
            log.warning(
                "Redis at %s runs with maxmemory-policy %s: past maxmemory it deletes keys, queued requests "
                "included. Run it with `maxmemory-policy noeviction`.",
                self._url,
                evicts,
            )
