"""The node's own defences: private state, templates that come back, bounded logs, a corrupt state file.

Real processes: a daemon started the way `cirrus up` starts it, or a `LocalRuntime` driven directly
(as tests/test_template.py does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ECHO_PREDICTOR, Cirrus, pid_alive, write_project
from test_template import PREDICTOR, World, run

from cirrus.logs import read_logs
from cirrus.runtimes.local import TEMPLATE_RESTARTS
from cirrus.types import ApiStatusName


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The umask most users have: files 0644, directories 0755 unless the daemon sees to it."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --- private state ------------------------------------------------------------------------------


def _check_private(home: Path) -> None:
    """The home is 0700 and nothing in it (logs included, recursively) is open to group or others."""
    assert _mode(home) == 0o700
    loose = []
    for path in [home, *home.rglob("*")]:
        parts = path.relative_to(home).parts
        if path.is_symlink() or (parts[:1] == ("snapshots",) and len(parts) > 1):
            continue  # snapshots are read-only (0444/0555) inside snapshots/, which is 0700 (checked below)
        if _mode(path) & 0o077:
            loose.append(f"{path.relative_to(home)} {_mode(path):04o}")
    assert not loose, f"readable by others: {loose}"
    assert _mode(home / "snapshots") == 0o700


def test_a_new_state_directory_and_every_file_in_it_are_private(
    cirrus: Cirrus, tmp_path: Path, loose_umask: None
) -> None:
    client = cirrus.client()
    client.up()
    client.deploy(write_project(tmp_path / "project", ECHO_PREDICTOR))
    assert client.predict("echo", {"n": 1}).status_code == 200
    home = cirrus.home
    for name in ("state.db", "queue.db", "daemon.log", "daemon.json", "token"):
        assert _mode(home / name) == 0o600, name
    logs = list((home / "logs" / "echo").glob("*.log"))
    assert logs and all(_mode(path) == 0o600 for path in logs)
    _check_private(home)


def test_a_state_directory_open_to_others_is_tightened(cirrus: Cirrus, tmp_path: Path, loose_umask: None) -> None:
    home = cirrus.home
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    (home / "node.yaml").write_text("{}\n")
    os.chmod(home / "node.yaml", 0o644)
    client = cirrus.client()
    client.up()
    client.deploy(write_project(tmp_path / "project", ECHO_PREDICTOR))
    assert "was readable by others (mode 0755); it is 0700 now" in cirrus.daemon_log()
    assert _mode(home / "node.yaml") == 0o600
    _check_private(home)


# --- a corrupt state file ---------------------------------------------------------------------------


def test_a_corrupt_state_database_is_a_clear_error(cirrus: Cirrus) -> None:
    cirrus.home.mkdir(mode=0o700)
    db = cirrus.home / "state.db"
    db.write_bytes(b"this is not an SQLite database, it was overwritten by mistake\n" * 100)
    code, out, err = cirrus.cli("up")
    shown = " ".join((out + err).split())  # the terminal may wrap it
    assert code != 0
    assert f"state database {db} is corrupt: file is not a database" in shown
    assert f"mv {db} {db}.bak" in shown
    assert "Traceback" not in out + err
    assert "Traceback" not in cirrus.daemon_log()
    assert db.read_bytes().startswith(b"this is not an SQLite database")  # left as it was
    db.rename(db.with_name("state.db.bak"))
    code, _, err = cirrus.cli("up")  # what the message says works
    assert code == 0, err


# --- templates come back ------------------------------------------------------------------------


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def test_a_dead_template_is_replaced_and_forks_the_next_replica(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cirrus.runtime")

    async def test(world: World) -> None:
        first = await world.prepare()
        await world.start("r0")
        await world.events.ready_or_exited("r0")
        os.kill(first, signal.SIGKILL)
        await world.events.until(lambda: "r0" in world.events.exited, "the orphaned replica to exit")
        replica = await world.start("r1")
        await world.events.ready_or_exited("r1")
        second = world.runtime.template_pid("tiny", 1)
        assert second is not None and second != first
        world.pids.add(second)
        assert _parent(replica) == second
        assert f"forked from template pid {second}" in world.log("r1")
        assert world.module_runs() == [first, second]  # the new template imported it, not the replica
        assert (await world.call("r1", "hi"))["echo"] == "hi"
        # the orphan's log says what happened to it
        assert f"the template this replica was forked from (pid {first}) killed by signal 9" in world.log("r0")

    run(tmp_path, test)
    restarts = [r.getMessage() for r in caplog.records if "starting another" in r.getMessage()]
    assert len(restarts) == 1, restarts
    assert "killed by signal 9 (SIGKILL)" in restarts[0]


def test_a_template_that_keeps_dying_is_given_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def test(world: World) -> None:
        await world.prepare()
        killed: list[int] = []
        for _ in range(TEMPLATE_RESTARTS + 1):
            template = world.runtime._templates[("tiny", 1)]
            assert await template.ready
            assert template.pid is not None
            world.pids.add(template.pid)
            killed.append(template.pid)
            os.kill(template.pid, signal.SIGKILL)
            await template.finished(10.0)
        assert ("tiny", 1) not in world.runtime._templates
        assert not any(pid_alive(pid) for pid in killed)
        await world.start("r0")  # fresh, not forked
        await world.events.ready_or_exited("r0")
        assert "forked" not in world.log("r0")

    run(tmp_path, test)
    given_up = [r.getMessage() for r in caplog.records if "not starting another" in r.getMessage()]
    assert len(given_up) == 1, given_up


# --- bounded logs -----------------------------------------------------------------------------------


LOUD_PREDICTOR = PREDICTOR.replace(
    "        def predict(self, payload):\n",
    "        def predict(self, payload):\n"
    "            for _ in range(payload.get('lines', 0)):\n"
    "                print('x' * 99, flush=True)\n"
    "            print(f\"marker {payload.get('marker')}\", flush=True)\n",
)


def test_replica_logs_are_rotated_and_written_on_after(tmp_path: Path) -> None:
    limit = 64 * 1024

    async def test(world: World) -> None:
        world.runtime.log_max_bytes = limit
        await world.prepare()
        await world.start("r0")
        await world.events.ready_or_exited("r0")
        await world.call("r0", {"lines": 3000, "marker": "before"})  # ~300 KiB
        path = world.runtime.log_path("tiny", "r0")
        assert path.stat().st_size > limit
        assert await world.runtime.rotate_logs() == [path]
        previous = path.with_name("r0.log.1")
        assert 0 < previous.stat().st_size <= limit
        assert "marker before" in previous.read_text()
        await world.call("r0", {"marker": "after"})
        data = path.read_bytes()
        assert b"\0" not in data and len(data) < 1024, "the replica wrote past a hole: not O_APPEND"
        assert b"marker after" in data
        tail = [line async for line in world.runtime.logs("tiny", "r0", 5, False)]
        assert tail[-1] == b"[r0] marker after\n"
        assert await world.runtime.rotate_logs() == []

    run(tmp_path, test, source=LOUD_PREDICTOR)


def test_the_daemon_rotates_its_own_log_and_replica_logs(tmp_path: Path, cirrus: Cirrus) -> None:
    limit = 16 * 1024
    small = Cirrus(cirrus.home, CIRRUS_LOG_MAX_BYTES=str(limit))
    client = small.client()
    try:
        client.up()
        client.deploy(write_project(tmp_path / "project", ECHO_PREDICTOR))
        status = small.wait_for("echo", lambda s: s.status == ApiStatusName.LIVE)
        replica_log = small.home / "logs" / "echo" / f"{status.replicas[0].id}.log"
        daemon_log = small.settings.daemon_log
        with daemon_log.open("ab") as log:  # as if it had run for months
            log.write(b"an old line of the daemon\n" * 2000)
        assert client.predict("echo", {"pad": "y" * 40_000}).status_code == 200
        deadline = time.monotonic() + 15
        while not (
            daemon_log.with_name("daemon.log.1").exists() and replica_log.with_name(replica_log.name + ".1").exists()
        ):
            assert time.monotonic() < deadline, "the logs were not rotated"
            time.sleep(0.2)
        assert client.predict("echo", {"n": "after rotation"}).status_code == 200
        assert replica_log.stat().st_size < limit
        code, out, err = small.cli("logs", "echo")
        assert code == 0, err
        assert "after rotation" in out
        client.down()
        assert daemon_log.stat().st_size < limit
        assert b"\0" not in daemon_log.read_bytes()
        assert "stopping" in daemon_log.read_text()  # it went on writing to the truncated file
    finally:
        small.shutdown()


def test_reading_logs_does_not_block_the_event_loop(tmp_path: Path) -> None:
    """A log file whose reading blocks (here a FIFO nobody writes to for 1.5 s) holds up the reader,
    not the event loop that the gateway and the admin API share."""
    folder = tmp_path / "logs" / "tiny"
    folder.mkdir(parents=True)
    fifo = folder / "stuck.log"
    os.mkfifo(fifo)

    def unblock() -> None:
        with contextlib.suppress(OSError), open(fifo, "w") as writer:
            writer.write("finally\n")

    async def main() -> list[float]:
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        [line async for line in read_logs(tmp_path / "logs", "tiny", None, 10, False)]
        await asyncio.sleep(0.05)  # the ticker sees how long it waited
        ticking.cancel()
        return gaps

    timer = threading.Timer(1.5, unblock)
    timer.start()
    try:
        gaps = asyncio.run(main())
    finally:
        timer.join()
    assert max(gaps) < 0.5, f"the event loop stood still for {max(gaps):.2f}s"


def test_a_spawned_replica_gets_its_launch_and_secret_through_a_pipe_not_its_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIRRUS_FORK_REPLICAS", "0")  # fresh interpreters: the path with a command line
    cirrus = Cirrus(tmp_path / "home")
    try:
        cirrus.up()
        project = write_project(tmp_path / "project", ECHO_PREDICTOR)
        code, out, err = cirrus.cli("deploy", str(project))
        assert code == 0, out + err
        status = cirrus.wait_for("echo", lambda s: s.status == ApiStatusName.LIVE)
        [pid] = [r.pid for r in status.replicas if r.pid is not None]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--launch-fd" in argv and b"--launch" not in argv
        assert not any(b"secret" in arg or b"{" in arg for arg in argv)
        assert cirrus.client().predict("echo", {"x": 1}).status_code == 200
    finally:
        cirrus.shutdown()
