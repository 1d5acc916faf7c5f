"""Issue 11, async APIs, below the gateway: the queue store on a full disk (a real tmpfs) and a
Redis out of memory, `durability: fsync` (fsync calls counted with strace), the schema upgrade
that adds `webhook_result`, and the pure decisions of the webhook policy and the header allowlist.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cirrus.gateway.async_api import BadRequest, stored_headers, webhook_of
from cirrus.spec import QueueSpec
from cirrus.store.base import NewRequest, QueueStore, Status, StoreFull, StoreUnavailable
from cirrus.store.sqlite import SqliteQueueStore
from cirrus.webhooks import (
    WebhookRefused,
    address_refusal,
    check_addresses,
    check_at_accept,
    host_allowed,
    resolve,
)

T0 = 1_700_000_000.0
BODY = os.urandom(8 * 1024)


def request(id: str, api: str = "jobs", durability: str = "normal") -> NewRequest:
    return NewRequest(
        api=api,
        id=id,
        body=BODY,
        content_type="application/octet-stream",
        durability="fsync" if durability == "fsync" else "normal",
    )


@contextlib.contextmanager
def tiny_filesystem(directory: Path, size: str = "1m") -> Iterator[Path]:
    """A real filesystem of `size` at `directory` (tmpfs; needs root or CAP_SYS_ADMIN), unmounted after."""
    directory.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here: cannot make a small filesystem to fill")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (run as root to test a full disk): {result.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)  # something still holds a file


def fill(store: QueueStore, batch: int = 4) -> tuple[list[str], StoreFull]:
    """Submit batches until the store refuses one; returns the ids it accepted and its refusal."""
    accepted: list[str] = []
    for i in range(100_000):
        ids = [f"r{i}-{j}" for j in range(batch)]
        try:
            store.submit_many([request(id) for id in ids], T0 + i)
        except StoreFull as exc:
            assert store.get("jobs", ids[0]) is None  # the refused batch stored nothing
            return accepted, exc
        accepted += ids
    raise AssertionError("the store never filled up")


def test_sqlite_disk_full_is_store_full_and_loses_nothing_accepted(tmp_path: Path) -> None:
    with tiny_filesystem(tmp_path / "tiny") as tiny:
        filler = tiny / "filler"
        filler.write_bytes(b"\0" * 256 * 1024)
        store = SqliteQueueStore(tiny / "queue.db")
        try:
            accepted, refusal = fill(store)
            assert len(accepted) >= 20, accepted
            assert "is full" in str(refusal) and "free disk space" in str(refusal)
            assert isinstance(refusal.__cause__, sqlite3.OperationalError)
            # Other writes on the full disk are refused the same way, and reads go on.
            with pytest.raises(StoreFull):
                store.fail_all("jobs", "deleted", T0)
            for id in accepted:
                record = store.get("jobs", id)
                assert record is not None and record.status is Status.IN_QUEUE, id
            # Once there is space again, the same store takes writes again.
            filler.unlink()
            store.submit(request("after"), T0 + 1)
            assert store.counts("jobs").in_queue == len(accepted) + 1
            assert store.lease("jobs", "w", 1, 30, T0 + 2)[0].id == accepted[0]  # oldest first, as ever
        finally:
            store.close()
        # A fresh open (the daemon restarted) sees every accepted request; the file is intact.
        reopened = SqliteQueueStore(tiny / "queue.db")
        try:
            assert reopened.counts("jobs").in_queue == len(accepted)  # and the leased one
            assert reopened.get("jobs", "after") is not None
            assert reopened._conn().execute("PRAGMA integrity_check").fetchone() == ("ok",)
        finally:
            reopened.close()


def test_sqlite_store_opens_on_a_full_disk(tmp_path: Path) -> None:
    """A restart while the disk is full must not fail on the store's own bookkeeping."""
    with tiny_filesystem(tmp_path / "tiny") as tiny:
        store = SqliteQueueStore(tiny / "queue.db")
        accepted, _ = fill(store)
        store.close()  # its checkpoint may fail for want of space: the WAL is kept whole then
        reopened = SqliteQueueStore(tiny / "queue.db")
        try:
            assert reopened.counts("jobs").in_queue == len(accepted)
        finally:
            reopened.close()


def _redis_server_or_skip(tmp_path: Path) -> contextlib.AbstractContextManager[str]:
    import backends

    backends.module("redis")
    from redis_server import redis_url

    return redis_url(tmp_path / "redis")


def test_redis_out_of_memory_is_store_full_and_loses_nothing_accepted(tmp_path: Path) -> None:
    import redis

    from cirrus.store.redis import RedisQueueStore

    with _redis_server_or_skip(tmp_path) as url:
        admin = redis.Redis.from_url(url)
        store = RedisQueueStore(url)
        try:
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory", used + 512 * 1024)
            accepted, refusal = fill(store)
            assert len(accepted) >= 10, accepted
            assert "out of memory" in str(refusal)
            for id in accepted:
                record = store.get("jobs", id)
                assert record is not None and record.status is Status.IN_QUEUE, id
            admin.config_set("maxmemory", 0)
            store.submit(request("after"), T0)
            assert store.counts("jobs").in_queue == len(accepted) + 1
        finally:
            store.close()
            admin.close()


def test_redis_fsync_needs_the_append_only_file(tmp_path: Path) -> None:
    import redis

    from cirrus.store.redis import RedisQueueStore

    with _redis_server_or_skip(tmp_path) as url:
        store = RedisQueueStore(url)  # the test server runs with appendonly yes
        try:
            store.submit(request("durable", durability="fsync"), T0)  # WAITAOF: on the server's disk now
        finally:
            store.close()
        admin = redis.Redis.from_url(url)
        admin.config_set("appendonly", "no")
        store = RedisQueueStore(url)
        try:
            with pytest.raises(StoreUnavailable, match="appendonly yes"):
                store.submit(request("refused", durability="fsync"), T0)
            assert store.get("jobs", "refused") is None  # refused before anything was written
            store.submit(request("normal"), T0)  # normal durability needs no AOF
        finally:
            store.close()
            admin.config_set("appendonly", "yes")
            admin.close()


_COUNT_FSYNCS = """
import sys
from cirrus.store.base import NewRequest
from cirrus.store.sqlite import SqliteQueueStore

store = SqliteQueueStore(sys.argv[1])
for i in range(20):
    request = NewRequest(api="a", id=str(i), body=b"{}", content_type="application/json", durability=sys.argv[2])
    store.submit(request, 1.0)
store.close()
"""


def _fsyncs(tmp_path: Path, durability: str) -> int:
    database = tmp_path / durability / "queue.db"
    database.parent.mkdir()
    trace = tmp_path / f"{durability}.strace"
    strace = ["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(trace)]
    result = subprocess.run(
        [*strace, sys.executable, "-c", _COUNT_FSYNCS, str(database), durability],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    return sum(1 for line in trace.read_text().splitlines() if "sync(" in line)


def test_sqlite_fsync_durability_syncs_every_commit_and_normal_does_not(tmp_path: Path) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: cannot count fsync calls")
    normal, fsync = _fsyncs(tmp_path, "normal"), _fsyncs(tmp_path, "fsync")
    assert fsync - normal >= 20, (normal, fsync)  # one more per commit
    assert normal < 20, normal  # NORMAL syncs at checkpoints only


def test_an_old_queue_file_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    store = SqliteQueueStore(path)
    store.submit(request("old"), T0)
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:  # as schema 1 left it
        db.execute("ALTER TABLE requests DROP COLUMN webhook_result")
        db.execute("PRAGMA user_version = 1")
        db.commit()
    store = SqliteQueueStore(path)
    try:
        assert store.record_webhook("jobs", "old", "delivered: HTTP 200")
        record = store.get("jobs", "old")
        assert record is not None and record.webhook_result == "delivered: HTTP 200"
        assert store._conn().execute("PRAGMA user_version").fetchone() == (2,)
    finally:
        store.close()


# --- the header allowlist and the webhook policy (pure) ---------------------------------------


def test_only_allowlisted_headers_are_stored() -> None:
    headers = [
        ("content-type", "application/json"),
        ("authorization", "Bearer secret"),
        ("cookie", "session=secret"),
        ("x-api-key", "secret"),
        ("x-secret", "secret"),
        ("x-trace", "t1"),
        ("user-agent", "ua"),
        ("accept", "*/*"),
        ("x-request-id", "rid"),
        ("x-trace", "t2"),
    ]
    assert stored_headers(headers, ["x-trace"]) == [
        ("content-type", "application/json"),
        ("x-trace", "t1"),
        ("user-agent", "ua"),
        ("accept", "*/*"),
        ("x-request-id", "rid"),
        ("x-trace", "t2"),
    ]
    assert stored_headers(headers, []) == [h for h in stored_headers(headers, ["x-trace"]) if h[0] != "x-trace"]


def test_hosts_match_names_and_subdomain_wildcards() -> None:
    patterns = ["hooks.example.com", "*.example.org"]
    assert host_allowed("hooks.example.com", patterns)
    assert host_allowed("HOOKS.example.com.", patterns)
    assert host_allowed("a.example.org", patterns) and host_allowed("a.b.example.org", patterns)
    assert not host_allowed("example.org", patterns)
    assert not host_allowed("evilexample.org", patterns)
    assert not host_allowed("hooks.example.com.evil.net", patterns)
    assert not host_allowed("other.example.com", patterns)
    assert host_allowed("anything.net", ["*"])


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "address"),  # reserved (Python files it under private too)
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "non-public"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("93.184.216.34", None),
        ("2606:2800:220:1:248:1893:25c8:1946", None),
    ],
)
def test_address_check(address: str, reason: str | None) -> None:
    found = address_refusal(ipaddress.ip_address(address))
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found, found


def test_a_name_with_any_private_address_is_refused() -> None:
    public, private = ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.1")
    assert check_addresses("h", [public], allow_private=False) == [public]
    with pytest.raises(WebhookRefused, match=r"10\.0\.0\.1, a private address"):
        check_addresses("h", [public, private], allow_private=False)
    assert check_addresses("h", [private, public], allow_private=True) == [private, public]
    with pytest.raises(WebhookRefused, match="no address"):
        check_addresses("h", [], allow_private=True)


def test_webhooks_at_accept() -> None:
    def hook(url: str, spec: QueueSpec | None) -> str | None:
        return webhook_of([("x-cirrus-webhook", url)], b"", spec)

    off = QueueSpec()
    on = QueueSpec.model_validate({"webhooks": {"allowed_hosts": ["hooks.example.com", "127.0.0.1"]}})
    assert webhook_of([], b"", off) is None
    for spec in (None, off):
        with pytest.raises(BadRequest, match="this API does not send webhooks"):
            hook("https://hooks.example.com/x", spec)
    with pytest.raises(BadRequest, match="this API does not send webhooks"):
        webhook_of([], b"webhook=https%3A%2F%2Fhooks.example.com%2Fx", off)
    assert hook("https://hooks.example.com/x", on) == "https://hooks.example.com/x"
    assert webhook_of([], b"webhook=https%3A%2F%2Fhooks.example.com%2Fx", on) == "https://hooks.example.com/x"
    for bad, message in [
        ("https://evil.example.net/x", "not allowed"),
        ("https://hooks.example.com.evil.net/x", "not allowed"),
        ("ftp://hooks.example.com/x", "not an http"),
        ("https://hooks.example.com:99999/x", "not a URL"),
        ("http://127.0.0.1:8080/x", "loopback"),  # allowed by name, but an IP literal is checked at once
    ]:
        with pytest.raises(BadRequest, match=message):
            hook(bad, on)
    check_at_accept("http://127.0.0.1:8080/x", ["127.0.0.1"], allow_private=True)


def test_resolve_checks_the_resolved_addresses_and_pins_the_one_it_checked() -> None:
    asyncio.run(_resolve())


async def _resolve() -> None:
    with pytest.raises(WebhookRefused, match=r"resolves to (127.0.0.1|::1), a loopback address"):
        await resolve("http://localhost:8080/hook", ["localhost"], allow_private=False)
    target = await resolve("http://user:pw@localhost:8080/hook?a=1", ["localhost"], allow_private=True)
    assert target.addresses and all(address.is_loopback for address in target.addresses)
    assert target.url_for(ipaddress.ip_address("127.0.0.1")) == "http://user:pw@127.0.0.1:8080/hook?a=1"
    assert target.url_for(ipaddress.ip_address("::1")) == "http://user:pw@[::1]:8080/hook?a=1"
    assert target.headers == {"host": "localhost:8080"} and target.extensions == {}
    secure = await resolve("https://127.0.0.1/hook", ["127.0.0.1"], allow_private=True)
    assert secure.url_for(secure.addresses[0]) == "https://127.0.0.1/hook"
    assert secure.extensions == {"sni_hostname": "127.0.0.1"}
    with pytest.raises(WebhookRefused, match="not allowed"):
        await resolve("http://localhost:8080/hook", ["example.com"], allow_private=True)


def test_forward_headers_and_webhooks_specs_are_checked() -> None:
    with pytest.raises(ValueError, match="only X- headers"):
        QueueSpec.model_validate({"forward_headers": ["Authorization"]})
    with pytest.raises(ValueError, match="API key"):
        QueueSpec.model_validate({"forward_headers": ["X-API-Key"]})
    with pytest.raises(ValueError, match="not a host name"):
        QueueSpec.model_validate({"webhooks": {"allowed_hosts": ["https://hooks.example.com/"]}})
    with pytest.raises(ValueError, match="durability"):
        QueueSpec.model_validate({"durability": "always"})
    spec = QueueSpec.model_validate({"forward_headers": ["X-Trace"], "webhooks": {"allowed_hosts": ["A.example.com"]}})
    assert spec.forward_headers == ["x-trace"] and spec.webhooks is not None
    assert spec.webhooks.allowed_hosts == ["a.example.com"] and not spec.webhooks.allow_private
