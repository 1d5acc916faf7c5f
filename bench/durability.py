#!/usr/bin/env python3
"""What `queue.durability: fsync` costs: accepts per second into the queue store, normal vs fsync.

It drives the store as the gateway's group commit does (`cirrus/gateway/accept.py`): one writer
thread, each transaction a `submit_many` of `--batch` requests (1: a lone client, one commit per
request; larger: what concurrency brings, one commit per batch), for `--duration` seconds per
cell, and prints accepts/s and commits/s for each durability and batch size. The SQLite file goes
in `--dir` (default: a temporary directory under `$CIRRUS_HOME`, or `~/.cirrus`, so that it
measures the disk the daemon writes to); `--redis-url` adds a Redis server the script does not
start (its `appendonly` and `appendfsync` decide what fsync costs there: see docs/architecture.md).

    python bench/durability.py                          # SQLite, batches 1, 16, 256, 3 s each
    python bench/durability.py --batch 1 --duration 1   # a quick look
    python bench/durability.py --redis-url redis://127.0.0.1:6379/15   # also Redis (db 15 is flushed!)

Figures depend on the disk above all (an fsync costs microseconds on tmpfs or a write-back cache,
milliseconds on a real SSD, more on network disks): run it on the machine you deploy to.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Literal

from cirrus.store import open_store
from cirrus.store.base import NewRequest, QueueStore

Durability = Literal["normal", "fsync"]
BODY = b'{"x": 1}'


def measure(store: QueueStore, durability: Durability, batch: int, duration_s: float) -> tuple[float, float]:
    """(accepts/s, commits/s) of `duration_s` of back-to-back `submit_many` calls of `batch` requests."""
    api = f"bench-{durability}-{batch}"
    accepted = commits = 0
    started = time.perf_counter()
    deadline = started + duration_s
    while time.perf_counter() < deadline:
        requests = [
            NewRequest(api=api, id=uuid.uuid4().hex, body=BODY, content_type="application/json", durability=durability)
            for _ in range(batch)
        ]
        store.submit_many(requests, time.time())
        accepted += batch
        commits += 1
    elapsed = time.perf_counter() - started
    return accepted / elapsed, commits / elapsed


def run(name: str, store: QueueStore, batches: list[int], duration_s: float) -> None:
    print(f"\n{name}\n")
    print("| batch | normal accepts/s | fsync accepts/s | fsync/normal | fsync commits/s |")
    print("|---:|---:|---:|---:|---:|")
    for batch in batches:
        normal, _ = measure(store, "normal", batch, duration_s)
        fsync, commits = measure(store, "fsync", batch, duration_s)
        print(f"| {batch} | {normal:,.0f} | {fsync:,.0f} | {fsync / normal:.2f} | {commits:,.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,16,256", help="requests per transaction, comma-separated")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per cell")
    parser.add_argument("--dir", type=Path, help="where the SQLite file goes (default: under $CIRRUS_HOME)")
    parser.add_argument("--redis-url", help="also measure this Redis server (its database is flushed)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]

    home = Path(os.environ.get("CIRRUS_HOME", Path.home() / ".cirrus"))
    home.mkdir(parents=True, exist_ok=True)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench-durability-", dir=home))
    try:
        store = open_store(f"sqlite://{directory.resolve() / 'queue.db'}")
        try:
            run(f"SQLite in {directory} (WAL; normal: synchronous=NORMAL, fsync: FULL)", store, batches, args.duration)
        finally:
            store.close()
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    if args.redis_url:
        import redis

        redis.Redis.from_url(args.redis_url).flushdb()
        store = open_store(args.redis_url)
        try:
            run(f"Redis at {args.redis_url} (fsync: WAITAOF 1 0 after each batch)", store, batches, args.duration)
        finally:
            store.close()
            redis.Redis.from_url(args.redis_url).flushdb()


if __name__ == "__main__":
    main()
