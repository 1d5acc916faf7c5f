"""What the runtime owns on its node: placement (`reserve`), the device environment a replica gets,
its logs (`logs`, following them), its address, and the fake runtime's stand-ins for all of these.

The local runtime's placement is checked without processes; the environment, addresses, exits and
logs with real replicas started through `LocalRuntime` (as tests/test_template.py does), each
printing what it sees to its own log, read back through `runtime.logs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import wait_gone

from cirrus.gateway.transport import ReplicaConnection
from cirrus.runtimes.base import ReplicaExit, Reservation, Runtime, Unplaceable
from cirrus.runtimes.local import LocalRuntime
from cirrus.runtimes.placement import Assignment, Inventory
from cirrus.spec import ComputeSpec
from cirrus.testing.fake_runtime import FakeRuntime
from cirrus.wire import ReplicaLaunch, ReplicaReady

WAIT_S = 30.0
SECRET = b"test-replica-secret-0123456789abcdef"  # the launch's; a connection must prove it knows it
API = "tiny"
DEVICE_VARIABLES = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CIRRUS_ACCELERATOR_NEURON", "NEURON_RT_VISIBLE_CORES")

# Prints the device environment it was started with, and each payload it is asked to predict.
PREDICTOR = f"""
    import os


    class Predictor:
        def __init__(self, config):
            for name in {DEVICE_VARIABLES!r}:
                print(f"env {{name}}={{os.environ.get(name, '<unset>')}}", flush=True)

        def predict(self, payload):
            print(f"predicted {{payload}}", flush=True)
            return payload
"""


def compute(**fields: Any) -> ComputeSpec:
    fields.setdefault("cpu", 0)
    return ComputeSpec.model_validate(fields)


def capacity(cpu: float = 4, gpus: int = 2, neuron: int = 0) -> Inventory:
    return Inventory(cpu=cpu, mem=None, gpus=(1.0,) * gpus, accelerators={"neuron": (1.0,) * neuron} if neuron else {})


def reserved(runtime: LocalRuntime | FakeRuntime, replica_id: str, request: ComputeSpec) -> Reservation:
    result = runtime.reserve(replica_id, request)
    assert isinstance(result, Reservation), result
    return result


def unplaceable(runtime: LocalRuntime | FakeRuntime, replica_id: str, request: ComputeSpec) -> Unplaceable:
    result = runtime.reserve(replica_id, request)
    assert isinstance(result, Unplaceable), result
    return result


def test_both_runtimes_satisfy_the_protocol(tmp_path: Path) -> None:
    runtimes: list[Runtime] = [LocalRuntime(tmp_path), FakeRuntime(tmp_path)]  # mypy checks the rest
    assert all(callable(r.reserve) and callable(r.logs) for r in runtimes)


# --- LocalRuntime.reserve, without processes ---------------------------------------------------


def test_reserve_places_on_the_inventory_and_says_why_not(tmp_path: Path) -> None:
    runtime = LocalRuntime(tmp_path / "logs", inventory=capacity(cpu=4, gpus=2, neuron=2))
    first = reserved(runtime, "a", compute(cpu=1, gpu=1, accelerators={"neuron": 1}))
    assert first.devices == {"gpu": "0", "neuron": "0"}
    assert first.detail == Assignment(cpu=1, gpus=((0, 1.0),), accelerators={"neuron": ((0, 1.0),)})
    assert reserved(runtime, "b", compute(gpu=0.5)).devices == {"gpu": "1:0.5"}
    assert reserved(runtime, "c", compute(cpu=1, gpu=0.5)).devices == {"gpu": "1:0.5"}
    busy = unplaceable(runtime, "d", compute(gpu=0.25))
    assert busy.reason == "needs gpu: 0.25 on one device, 0 free" and not busy.never_fits
    assert unplaceable(runtime, "d", compute(cpu=3)).reason == "needs cpu: 3, 2 free"
    never = unplaceable(runtime, "d", compute(gpu=3))
    assert never.reason == "never fits: needs gpu: 3, the node has 2" and never.never_fits
    assert reserved(runtime, "d", compute(cpu=2)).devices == {}
    assert len(runtime.held()) == 4


def test_unreserve_frees_and_reserving_again_replaces(tmp_path: Path) -> None:
    runtime = LocalRuntime(tmp_path / "logs", inventory=capacity(gpus=1))
    assert reserved(runtime, "a", compute(gpu=1)).devices == {"gpu": "0"}
    assert unplaceable(runtime, "b", compute(gpu=1)).reason == "needs gpu: 1, 0 free"
    runtime.unreserve("a")
    runtime.unreserve("a")  # holding none: no effect
    runtime.unreserve("never-reserved")
    assert runtime.held() == []
    assert reserved(runtime, "b", compute(gpu=1)).devices == {"gpu": "0"}
    # "b" reserving again (not running) gives up what it held first: it does not block itself
    assert reserved(runtime, "b", compute(gpu=0.5)).devices == {"gpu": "0:0.5"}
    assert reserved(runtime, "c", compute(gpu=0.5)).devices == {"gpu": "0:0.5"}


def test_stop_of_a_replica_never_started_frees_its_reservation(tmp_path: Path) -> None:
    runtime = LocalRuntime(tmp_path / "logs", inventory=capacity(gpus=1))
    reserved(runtime, "a", compute(gpu=1))
    asyncio.run(runtime.stop("a", 1.0))
    assert runtime.held() == []


def test_without_an_inventory_everything_fits_and_holds_no_devices(tmp_path: Path) -> None:
    runtime = LocalRuntime(tmp_path / "logs")
    for replica_id in ("a", "b", "c"):
        assert reserved(runtime, replica_id, compute(cpu=64, gpu=8)) == Reservation(devices={}, detail=None)
    assert runtime.held() == []


def test_model_cache_dir_is_the_one_given(tmp_path: Path) -> None:
    assert LocalRuntime(tmp_path / "logs", models_dir=tmp_path / "models").model_cache_dir() == tmp_path / "models"
    assert LocalRuntime(tmp_path / "logs").model_cache_dir() is None


# --- LocalRuntime.logs, over log files -----------------------------------------------------------


async def collect(chunks: AsyncIterator[bytes]) -> list[str]:
    return [chunk.decode() async for chunk in chunks]


def write_logs(logs_dir: Path, api: str, logs: dict[str, list[str]]) -> None:
    """Log files written oldest first (in the order given), as the runtime names them."""
    folder = logs_dir / api
    folder.mkdir(parents=True, exist_ok=True)
    for age, (replica_id, lines) in enumerate(reversed(list(logs.items()))):
        path = folder / f"{replica_id}.log"
        path.write_text("".join(f"{line}\n" for line in lines))
        then = time.time() - 10 * (age + 1)
        os.utime(path, (then, then))


def test_logs_are_the_newest_lines_over_the_api_oldest_file_first(tmp_path: Path) -> None:
    runtime = LocalRuntime(tmp_path)
    write_logs(tmp_path, API, {"r-old": ["o1", "o2", "o3"], "r-new": ["n1", "n2"]})
    write_logs(tmp_path, "other", {"x": ["x1"]})
    (tmp_path / API / "templates").mkdir()
    (tmp_path / API / "templates" / "revision-1.log").write_text("template line\n")

    assert asyncio.run(collect(runtime.logs(API, None, 3, False))) == ["[r-old] o3\n", "[r-new] n1\n", "[r-new] n2\n"]
    assert asyncio.run(collect(runtime.logs(API, None, 100, False))) == [
        "[r-old] o1\n",
        "[r-old] o2\n",
        "[r-old] o3\n",
        "[r-new] n1\n",
        "[r-new] n2\n",
    ]
    assert asyncio.run(collect(runtime.logs(API, "r-old", 2, False))) == ["[r-old] o2\n", "[r-old] o3\n"]
    assert asyncio.run(collect(runtime.logs(API, None, 0, False))) == []
    assert asyncio.run(collect(runtime.logs(API, "nobody", 5, False))) == []
    everything = asyncio.run(collect(runtime.logs(None, None, 100, False)))  # every API, by name
    assert everything == ["[x] x1\n", "[r-old] o1\n", "[r-old] o2\n", "[r-old] o3\n", "[r-new] n1\n", "[r-new] n2\n"]
    assert runtime.has_logs(API) and runtime.has_logs("other") and not runtime.has_logs("missing")
    assert asyncio.run(collect(runtime.logs("missing", None, 10, False))) == []


async def stop_following(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)  # an async generator's
    if aclose is not None:
        await aclose()


async def next_chunks(chunks: AsyncIterator[bytes], count: int) -> list[str]:
    return [(await asyncio.wait_for(anext(chunks), WAIT_S)).decode() for _ in range(count)]


def append(path: Path, text: str) -> None:
    with path.open("a") as handle:
        handle.write(text)


def test_following_gives_the_tail_then_lines_appended_later(tmp_path: Path) -> None:
    runtime = LocalRuntime(tmp_path, log_poll_s=0.01)
    write_logs(tmp_path, API, {"r0": ["a", "b", "c"]})
    r0 = tmp_path / API / "r0.log"
    append(r0, "half a li")  # a line still being written comes once it is whole

    async def test() -> None:
        chunks = runtime.logs(API, None, 2, True)
        try:
            assert await next_chunks(chunks, 2) == ["[r0] b\n", "[r0] c\n"]
            append(r0, "ne\nd\n")
            assert await next_chunks(chunks, 2) == ["[r0] half a line\n", "[r0] d\n"]
            write_logs(tmp_path, API, {"r1": ["started later"]})  # a replica that starts while followed
            assert await next_chunks(chunks, 1) == ["[r1] started later\n"]
        finally:
            await stop_following(chunks)

    asyncio.run(test())


def test_following_one_replica_skips_the_others(tmp_path: Path) -> None:
    runtime = LocalRuntime(tmp_path, log_poll_s=0.01)

    async def test() -> None:
        chunks = runtime.logs(API, "r1", 5, True)  # r1 has no log yet
        waiting = asyncio.ensure_future(next_chunks(chunks, 1))
        try:
            await asyncio.sleep(0.05)
            write_logs(tmp_path, API, {"r0": ["not this"], "r1": ["this"]})
            assert await waiting == ["[r1] this\n"]
        finally:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            await stop_following(chunks)

    asyncio.run(test())


# --- LocalRuntime with real replicas ---------------------------------------------------------------


class Node:
    """A LocalRuntime on a tiny project; records its events and what it held when each exit came."""

    def __init__(self, tmp_path: Path, inventory: Inventory | None, fork: str) -> None:
        self.project = tmp_path / "project"
        self.project.mkdir()
        (self.project / "predictor.py").write_text(textwrap.dedent(PREDICTOR))
        self.runtime = LocalRuntime(
            tmp_path / "logs", env={"CIRRUS_FORK_REPLICAS": fork}, inventory=inventory, log_poll_s=0.01
        )
        self.runtime.subscribe(self)
        self.ready: dict[str, ReplicaReady] = {}
        self.exited: dict[str, ReplicaExit] = {}
        self.held_at_exit: dict[str, list[Assignment]] = {}
        self.pids: set[int] = set()

    def replica_ready(self, replica_id: str, report: ReplicaReady) -> None:
        self.ready[replica_id] = report

    def replica_exited(self, replica_id: str, exit: ReplicaExit) -> None:
        self.exited[replica_id] = exit
        self.held_at_exit[replica_id] = self.runtime.held()

    def launch(self, replica_id: str) -> ReplicaLaunch:
        return ReplicaLaunch(
            api=API,
            replica_id=replica_id,
            revision=1,
            project_dir=str(self.project),
            predictor_path="predictor.py",
            class_name="Predictor",
            config={},
            inference_slots=1,
            secret=SECRET,
        )

    async def start(self, replica_id: str) -> ReplicaReady:
        if self.runtime.fork_replicas:
            await self.runtime.prepare(self.launch("template"), {"CIRRUS_API": API})
            template_pid = self.runtime.template_pid(API, 1)
            if template_pid is not None:
                self.pids.add(template_pid)
        pid = await self.runtime.start(self.launch(replica_id), {"CIRRUS_API": API, "CIRRUS_REPLICA_ID": replica_id})
        assert pid is not None
        self.pids.add(pid)
        await self.until(lambda: replica_id in self.ready or replica_id in self.exited, f"{replica_id} to start")
        assert replica_id in self.ready, self.exited[replica_id].describe()
        return self.ready[replica_id]

    async def until(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.005)

    async def seen_env(self, replica_id: str) -> dict[str, str]:
        lines = await collect(self.runtime.logs(API, replica_id, 1000, False))
        prefix = f"[{replica_id}] env "
        pairs = [line.removeprefix(prefix).rstrip("\n").split("=", 1) for line in lines if line.startswith(prefix)]
        return {name: value for name, value in pairs if value != "<unset>"}


def on_node(tmp_path: Path, test: Callable[[Node], Awaitable[None]], inventory: Inventory | None, fork: str) -> None:
    node = Node(tmp_path, inventory, fork)

    async def main() -> None:
        try:
            await test(node)
        finally:
            await node.runtime.close()

    asyncio.run(main())
    leftovers = wait_gone(node.pids, 5.0)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes outlived close(): {sorted(leftovers)}"


@pytest.mark.parametrize("fork", ["1", "0"], ids=["forked", "fresh"])
def test_a_started_replica_sees_only_its_reserved_devices(tmp_path: Path, fork: str) -> None:
    async def test(node: Node) -> None:
        reserved(node.runtime, "r0", compute(gpu=1))
        reserved(node.runtime, "r1", compute(gpu=1, accelerators={"neuron": 2}))
        await node.start("r1")
        assert await node.seen_env("r1") == {
            "CUDA_VISIBLE_DEVICES": "1",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CIRRUS_ACCELERATOR_NEURON": "0,1",
            "NEURON_RT_VISIBLE_CORES": "0,1",
        }
        reserved(node.runtime, "r2", compute(cpu=1))
        await node.start("r2")
        assert await node.seen_env("r2") == {"CUDA_VISIBLE_DEVICES": ""}  # no GPU held: it sees none

    on_node(tmp_path, test, capacity(cpu=4, gpus=2, neuron=2), fork)


def test_without_a_reservation_a_replica_gets_no_device_environment(tmp_path: Path) -> None:
    inherited = {name: os.environ[name] for name in DEVICE_VARIABLES if name in os.environ}

    async def test(node: Node) -> None:
        await node.start("bare")  # never reserved
        reserved(node.runtime, "unlimited", compute(gpu=1))  # no inventory: no devices
        await node.start("unlimited")
        assert await node.seen_env("bare") == inherited
        assert await node.seen_env("unlimited") == inherited

    on_node(tmp_path, test, None, "0")


def test_reservations_are_freed_on_stop_and_on_exit(tmp_path: Path) -> None:
    async def test(node: Node) -> None:
        runtime = node.runtime
        reserved(runtime, "r0", compute(gpu=1))
        pid = (await node.start("r0")).pid
        with pytest.raises(RuntimeError, match="is running"):
            runtime.reserve("r0", compute(gpu=0.5))
        runtime.unreserve("r0")  # no effect on a running replica
        assert unplaceable(runtime, "r1", compute(gpu=1)).reason == "needs gpu: 1, 0 free"

        os.kill(pid, signal.SIGKILL)  # it exits on its own
        await node.until(lambda: "r0" in node.exited, "r0 to exit")
        assert node.held_at_exit["r0"] == []  # freed before the exit was reported
        assert reserved(runtime, "r1", compute(gpu=1)).devices == {"gpu": "0"}

        await node.start("r1")
        await runtime.stop("r1", 10.0)
        assert node.exited["r1"].code == 0 and node.held_at_exit["r1"] == []
        assert reserved(runtime, "r0", compute(gpu=1)).devices == {"gpu": "0"}  # the restart gets it again

    on_node(tmp_path, test, capacity(gpus=1), "0")


def test_a_start_that_fails_frees_its_reservation(tmp_path: Path) -> None:
    async def test(node: Node) -> None:
        runtime = node.runtime
        runtime.python = str(tmp_path / "no-such-python")
        reserved(runtime, "r0", compute(gpu=1))
        with pytest.raises(OSError):
            await runtime.start(node.launch("r0"), {})
        assert runtime.held() == []

    on_node(tmp_path, test, capacity(gpus=1), "0")


def test_address_and_followed_logs_of_a_running_replica(tmp_path: Path) -> None:
    async def test(node: Node) -> None:
        runtime = node.runtime
        assert runtime.address("r0") is None
        report = await node.start("r0")
        assert runtime.address("r0") == report.address

        chunks = runtime.logs(API, "r0", 0, True)
        following = asyncio.ensure_future(next_chunks(chunks, 1))
        try:
            await asyncio.sleep(0.05)  # the follow has started and read to the end
            connection = await ReplicaConnection.open(report.address, SECRET)
            try:
                body = msgspec.json.encode({"say": "hello"})
                _, reply = connection.call(request_id="req-1", body=body, content_type="application/json")
                response = await asyncio.wait_for(reply, WAIT_S)
            finally:
                connection.close()
            assert response.status == 200, response.body
            assert msgspec.json.decode(response.body) == {"say": "hello"}
            assert await following == ["[r0] predicted {'say': 'hello'}\n"]
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            await stop_following(chunks)

        await runtime.stop("r0", 10.0)
        assert runtime.address("r0") is None
        assert runtime.has_logs(API)

    on_node(tmp_path, test, None, "0")


# --- FakeRuntime ---------------------------------------------------------------------------------


def fake_launch(replica_id: str) -> ReplicaLaunch:
    return ReplicaLaunch(
        api=API,
        replica_id=replica_id,
        revision=1,
        project_dir="/nowhere",
        predictor_path="predictor.py",
        class_name="Predictor",
        config={},
        inference_slots=1,
        secret=SECRET,
    )


def test_fake_reserve_over_an_inventory_with_the_local_rules() -> None:
    runtime = FakeRuntime(inventory=capacity(gpus=1))

    async def test() -> None:
        first = reserved(runtime, "a", compute(gpu=0.5))
        assert first.devices == {"gpu": "0:0.5"}
        assert reserved(runtime, "b", compute(gpu=0.5)).devices == {"gpu": "0:0.5"}
        assert unplaceable(runtime, "c", compute(gpu=0.5)).reason == "needs gpu: 0.5 on one device, 0 free"
        assert unplaceable(runtime, "c", compute(gpu=2)).never_fits
        assert runtime.reservations == {"a": first, "b": runtime.reservations["b"]}
        assert runtime.reserved == ["a", "b"]

        await runtime.start(fake_launch("a"), {"CIRRUS_REPLICA_ID": "a"})
        assert runtime.envs["a"] == {
            "CIRRUS_REPLICA_ID": "a",
            "CUDA_VISIBLE_DEVICES": "0",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        }
        runtime.unreserve("a")  # running: no effect
        runtime.unreserve("b")  # never started: freed
        assert list(runtime.reservations) == ["a"]
        runtime.crash("a")
        assert runtime.reservations == {}

        reserved(runtime, "c", compute(gpu=1))
        await runtime.start(fake_launch("c"), {})
        await runtime.stop("c", 1.0)
        assert runtime.reservations == {}

        reserved(runtime, "d", compute(gpu=1))
        runtime.start_error = OSError("no more processes")
        with pytest.raises(OSError):
            await runtime.start(fake_launch("d"), {})
        assert runtime.reservations == {}

    asyncio.run(test())


def test_fake_without_an_inventory_always_fits_and_sets_no_devices() -> None:
    runtime = FakeRuntime()

    async def test() -> None:
        assert reserved(runtime, "a", compute(gpu=8)) == Reservation()
        await runtime.start(fake_launch("a"), {"X": "1"})
        assert runtime.envs["a"] == {"X": "1"}
        assert runtime.address("a") is None
        report = runtime.make_ready("a")
        assert runtime.address("a") == report.address
        assert runtime.model_cache_dir() is None

    asyncio.run(test())


def test_fake_logs_serve_what_the_test_wrote() -> None:
    runtime = FakeRuntime()
    assert not runtime.has_logs(API)
    for i in range(3):
        runtime.write_log(API, "r0", f"zero {i}")
    runtime.write_log(API, "r1", "one")
    runtime.write_log("other", "x", "elsewhere")
    assert runtime.has_logs(API)

    assert asyncio.run(collect(runtime.logs(API, None, 2, False))) == ["[r0] zero 2\n", "[r1] one\n"]
    assert asyncio.run(collect(runtime.logs(API, "r0", 10, False))) == [f"[r0] zero {i}\n" for i in range(3)]
    assert asyncio.run(collect(runtime.logs(API, None, 0, False))) == []

    async def follow() -> None:
        chunks = runtime.logs(API, "r1", 1, True)
        assert await next_chunks(chunks, 1) == ["[r1] one\n"]
        waiting = asyncio.ensure_future(next_chunks(chunks, 1))
        try:
            for _ in range(3):
                await asyncio.sleep(0)  # the follower waits for the next line
            runtime.write_log(API, "r0", "not followed")
            runtime.write_log("other", "r1", "another API")
            runtime.write_log(API, "r1", "later")
            assert await waiting == ["[r1] later\n"]
        finally:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            await stop_following(chunks)

    asyncio.run(follow())
