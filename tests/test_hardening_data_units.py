"""Issue 11, the data path without a daemon: the replica's authentication, response limit, deep JSON
and stream stall timeout on a real socket in this process, and the controller's side of a lost
connection and of launch secrets, over the fakes."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cirrus import settings
from cirrus.control.controller import Controller
from cirrus.control.store import Store
from cirrus.gateway.transport import ReplicaConnection, ReplicaGone, RequestTooLarge
from cirrus.predictor import JSON_TOO_DEEP, PayloadError, decode_payload, load_predictor
from cirrus.replica.server import ReplicaProtocol, RequestHandler
from cirrus.spec import Deployment, parse_specs
from cirrus.testing import FakeGateway, FakeRuntime
from cirrus.types import ReplicaState
from cirrus.wire import (
    AUTH_FRAME_BYTES,
    DEFAULT_MAX_BODY_BYTES,
    MAX_FRAME_BYTES,
    Auth,
    FrameBuffer,
    FrameTooLarge,
    Hello,
    InferRequest,
    InferResponse,
    ReplicaFailed,
    ReplicaLaunch,
    ReplicaReady,
    auth_mac,
    decode_startup,
    encode_frame,
    encode_launch,
    frame_limit,
)

SECRET = b"unit-test-secret-0123456789abcdef"
DEEP = b"[" * 1000 + b"]" * 1000  # 2 KB

PREDICTOR = """
import time
from pathlib import Path


class Predictor:
    def __init__(self, config):
        self.marker = Path(config["marker"])

    def predict(self, payload):
        with self.marker.open("a") as f:
            f.write("ran\\n")
        if isinstance(payload, dict) and "size" in payload:
            return b"x" * payload["size"]
        if isinstance(payload, dict) and "fail" in payload:
            raise ValueError(f"secret at {payload['fail']}")
        return {"echo": payload}


class Streamer:
    def __init__(self, config):
        self.marker = Path(config["marker"])

    def predict(self, payload):
        for i in range(payload.get("n", 10**9)):
            self.marker.write_text(str(i + 1))
            yield b"y" * payload.get("size", 1000)
"""


# --- the wire ---------------------------------------------------------------------------------------


def test_the_frame_limit_is_the_body_limit_plus_headroom() -> None:
    assert DEFAULT_MAX_BODY_BYTES == settings.DEFAULT_MAX_BODY_BYTES
    assert MAX_FRAME_BYTES == frame_limit(DEFAULT_MAX_BODY_BYTES) < 64 * 1024 * 1024  # not 1 GiB
    buffer = FrameBuffer(limit=100)
    with pytest.raises(FrameTooLarge, match="exceeds the limit of 100"):
        buffer.feed(struct.pack(">I", 101))


def test_auth_mac_depends_on_secret_and_nonce() -> None:
    assert auth_mac(SECRET, b"n1") != auth_mac(SECRET, b"n2")
    assert auth_mac(SECRET, b"n1") != auth_mac(b"other", b"n1")
    assert len(auth_mac(SECRET, b"n1")) == 32


def test_deep_json_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match=JSON_TOO_DEEP):
        decode_payload(DEEP, "application/json")
    assert decode_payload(b"[" * 50 + b"]" * 50, "application/json") is not None


# --- a replica's connection, in this process --------------------------------------------------------


class Replica:
    def __init__(self, tmp_path: Path, class_name: str = "Predictor", debug_errors: bool = False) -> None:
        (tmp_path / "predictor.py").write_text(textwrap.dedent(PREDICTOR))
        self.marker = tmp_path / "ran.txt"
        predictor = load_predictor(str(tmp_path), "predictor.py", class_name, {"marker": str(self.marker)})
        self.handler = RequestHandler(predictor, 1, debug_errors=debug_errors)
        self.connections: set[ReplicaProtocol] = set()
        self.address = ""
        self.port = 0

    def ran(self) -> int:
        return len(self.marker.read_text().splitlines()) if self.marker.exists() else 0

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Replica]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: ReplicaProtocol(self.handler, "r1", self.connections, SECRET), "127.0.0.1", 0
        )
        self.port = server.sockets[0].getsockname()[1]
        self.address = f"tcp:127.0.0.1:{self.port}"
        try:
            yield self
        finally:
            server.close()
            for connection in list(self.connections):
                if connection.transport is not None:
                    connection.transport.abort()
            self.handler.slots.shutdown()


def _request(body: bytes, request_no: int = 1, timeout_s: float = 5.0) -> InferRequest:
    return InferRequest(
        id=request_no, request_id=f"req-{request_no}", body=body, content_type="application/json", timeout_s=timeout_s
    )


async def _call(conn: ReplicaConnection, payload: Any, timeout_s: float = 5.0) -> InferResponse:
    _, future = conn.call(
        request_id="req", body=msgspec.json.encode(payload), content_type="application/json", timeout_s=timeout_s
    )
    return await asyncio.wait_for(future, 10)


def _raw_read_until_closed(sock: socket.socket, deadline_s: float) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes (True) or `deadline_s` passes (False)."""
    sock.settimeout(0.1)
    received = b""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


def test_a_connection_without_the_secret_is_closed_unanswered(tmp_path: Path) -> None:
    replica = Replica(tmp_path)

    async def main() -> None:
        async with replica.serving():
            loop = asyncio.get_running_loop()
            good = await ReplicaConnection.open(replica.address, SECRET)
            try:
                assert (await _call(good, {"a": 1})).status == 200
            finally:
                good.close()
            assert replica.ran() == 1
            with pytest.raises(ConnectionError, match="authentication"):
                await ReplicaConnection.open(replica.address, b"not the secret at all, no")

            def raw(first: bytes | None) -> tuple[list[Any], bool, float]:
                with socket.create_connection(("127.0.0.1", replica.port), timeout=5) as sock:
                    started = time.monotonic()
                    if first is not None:
                        sock.sendall(first)
                    data, closed = _raw_read_until_closed(sock, 5.0)
                    return FrameBuffer().feed(data), closed, time.monotonic() - started

            # A hand-made request as the first frame: closed, with nothing but the hello.
            frames, closed, _ = await loop.run_in_executor(None, raw, encode_frame(_request(b'{"x": 1}')))
            assert closed and [type(f) for f in frames] == [Hello]
            # An Auth with a wrong MAC, then a request in the same write.
            forged = encode_frame(Auth(mac=b"\0" * 32)) + encode_frame(_request(b"{}"))
            frames, closed, _ = await loop.run_in_executor(None, raw, forged)
            assert closed and [type(f) for f in frames] == [Hello]
            # A frame header over the pre-authentication limit.
            frames, closed, _ = await loop.run_in_executor(None, raw, struct.pack(">I", AUTH_FRAME_BYTES + 1))
            assert closed
            # Silence: closed after AUTH_TIMEOUT_S.
            frames, closed, took = await loop.run_in_executor(None, raw, None)
            assert closed and 1.5 < took < 4.0
            assert replica.ran() == 1  # the predictor never ran for any of them

    asyncio.run(main())


def test_a_response_over_the_body_limit_is_a_502_and_the_connection_stays(tmp_path: Path) -> None:
    replica = Replica(tmp_path)

    async def main() -> None:
        async with replica.serving():
            conn = await ReplicaConnection.open(replica.address, SECRET, max_body_bytes=10_000)
            lost: list[str] = []
            conn.on_lost = lost.append
            try:
                limit = frame_limit(10_000)  # the body limit plus headroom (for headers and the like)
                big = await _call(conn, {"size": limit + 1})
                assert big.status == 502
                error = msgspec.json.decode(big.body)["error"]
                assert f"response of {limit + 1} bytes exceeds the limit of {limit} bytes" in error
                fits = await _call(conn, {"size": limit - 1000})
                assert (fits.status, len(fits.body)) == (200, limit - 1000)
                with pytest.raises(RequestTooLarge):  # a request the replica would refuse: refused here
                    conn.call(request_id="r", body=b"z" * frame_limit(10_000), content_type="text/plain")
                assert (await _call(conn, {"size": 1})).status == 200
                assert not conn.closed and lost == []
            finally:
                conn.close()
            assert lost == []  # closed on purpose: not lost

    asyncio.run(main())


def test_a_lost_connection_fails_its_requests_once_and_reports_it(tmp_path: Path) -> None:
    replica = Replica(tmp_path)

    async def main() -> None:
        async with replica.serving():
            conn = await ReplicaConnection.open(replica.address, SECRET)
            lost: list[str] = []
            conn.on_lost = lost.append
            [server_side] = replica.connections
            assert server_side.transport is not None
            server_side.transport.write(struct.pack(">I", MAX_FRAME_BYTES + 1))  # garbage: a frame too large
            for _ in range(100):
                if conn.closed:
                    break
                await asyncio.sleep(0.01)
            assert conn.closed
            assert len(lost) == 1 and "bad frame" in lost[0] and "exceeds the limit" in lost[0]
            with pytest.raises(ReplicaGone):
                conn.call(request_id="r", body=b"{}", content_type="application/json")

    asyncio.run(main())


@pytest.mark.parametrize("debug", [False, True])
def test_a_500_says_only_that_the_predictor_failed(tmp_path: Path, debug: bool) -> None:
    replica = Replica(tmp_path, debug_errors=debug)

    async def main() -> dict[str, Any]:
        async with replica.serving():
            conn = await ReplicaConnection.open(replica.address, SECRET)
            try:
                response = await _call(conn, {"fail": "/home/alice/.aws"})
            finally:
                conn.close()
        assert response.status == 500
        body: dict[str, Any] = msgspec.json.decode(response.body)
        return body

    body = asyncio.run(main())
    if debug:
        assert body["error"] == "the predictor raised ValueError: secret at /home/alice/.aws"
    else:
        assert body == {"error": "the predictor failed; see the replica log (request id req)", "request_id": "req"}


def test_deep_json_is_400_at_once(tmp_path: Path) -> None:
    replica = Replica(tmp_path)

    async def main() -> list[InferResponse]:
        async with replica.serving():
            conn = await ReplicaConnection.open(replica.address, SECRET)
            try:
                futures = [
                    conn.call(request_id=f"d{i}", body=DEEP, content_type="application/json", timeout_s=30)[1]
                    for i in range(12)
                ]
                return await asyncio.wait_for(asyncio.gather(*futures), 5)
            finally:
                conn.close()

    started = time.monotonic()
    responses = asyncio.run(main())
    assert time.monotonic() - started < 5
    assert {r.status for r in responses} == {400}
    assert {msgspec.json.decode(r.body)["error"] for r in responses} == {JSON_TOO_DEEP}
    assert replica.ran() == 0


def test_a_stream_without_credit_stops_after_timeout_s_and_frees_the_slot(tmp_path: Path) -> None:
    replica = Replica(tmp_path, class_name="Streamer")

    async def main() -> None:
        async with replica.serving():
            conn = await ReplicaConnection.open(replica.address, SECRET)
            try:
                request_no, head = conn.call(request_id="s", body=b"{}", content_type="application/json", timeout_s=1)
                assert (await asyncio.wait_for(head, 5)).stream
                queue = conn.stream(request_no)
                chunks = []
                started = time.monotonic()
                while True:  # read what the window allows, and grant no credit
                    chunk = await asyncio.wait_for(queue.get(), 5)
                    chunks.append(chunk)
                    if chunk.last:
                        break
                assert 0.8 < time.monotonic() - started < 3
                assert len(chunks) == 9  # the window (8), then the end
                assert chunks[-1].error is not None and "read nothing for 1s" in chunks[-1].error
                conn.end_stream(request_no)
                # The slot is free: a new stream starts at once.
                request_no, head = conn.call(
                    request_id="t", body=b'{"n": 1}', content_type="application/json", timeout_s=1
                )
                assert (await asyncio.wait_for(head, 2)).stream
            finally:
                conn.close()

    asyncio.run(main())


def _spawn_replica(tmp_path: Path, launch: ReplicaLaunch) -> tuple[subprocess.Popen[bytes], bytes]:
    """`python -m cirrus.replica --launch-fd N` (as the runtime may start one, the secret off argv):
    the process and its start-up report."""
    launch_read, launch_write = os.pipe()
    status_read, status_write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cirrus.replica", "--launch-fd", str(launch_read), "--status-fd", str(status_write)],
        pass_fds=(launch_read, status_write),
        cwd=tmp_path,
    )
    os.close(launch_read)
    os.close(status_write)
    with os.fdopen(launch_write, "wb") as pipe:
        pipe.write(encode_launch(launch).encode())
    with os.fdopen(status_read, "rb") as status:
        return proc, status.readline()


def test_a_replica_reads_its_launch_from_a_descriptor_and_needs_a_secret(tmp_path: Path) -> None:
    (tmp_path / "predictor.py").write_text(textwrap.dedent(PREDICTOR))
    launch = ReplicaLaunch(
        api="a",
        replica_id="a-1",
        revision=1,
        project_dir=str(tmp_path),
        predictor_path="predictor.py",
        class_name="Predictor",
        config={"marker": str(tmp_path / "ran.txt")},
        inference_slots=1,
        secret=SECRET,
    )
    proc, line = _spawn_replica(tmp_path, launch)
    try:
        report = decode_startup(line)
        assert isinstance(report, ReplicaReady)
        assert SECRET.hex() not in " ".join(proc.args) and "secret" not in " ".join(proc.args)

        async def call() -> InferResponse:
            conn = await ReplicaConnection.open(report.address, SECRET)
            try:
                return await _call(conn, {"a": 1})
            finally:
                conn.close()

        assert asyncio.run(call()).status == 200
    finally:
        proc.terminate()
        assert proc.wait(10) == 0

    proc, line = _spawn_replica(tmp_path, msgspec.structs.replace(launch, secret=b""))
    assert proc.wait(10) == 1
    report = decode_startup(line)
    assert isinstance(report, ReplicaFailed) and "without a secret" in report.error


# --- the controller ---------------------------------------------------------------------------------


class World:
    def __init__(self, tmp_path: Path, debug_errors: bool = False) -> None:
        self.tmp_path = tmp_path
        self.runtime = FakeRuntime(tmp_path / "logs")
        self.gateway = FakeGateway()
        self.store = Store(tmp_path / "state.db")
        self.controller = Controller(
            self.store, self.runtime, self.gateway, endpoint=lambda n: n, debug_errors=debug_errors
        )

    def deploy(self, **fields: Any) -> None:
        project = self.tmp_path / "project"
        project.mkdir(exist_ok=True)
        (project / "predictor.py").write_text("class Predictor:\n    def predict(self, payload):\n        return 1\n")
        [spec] = parse_specs({"name": "api", "predictor": {"path": "predictor.py"}, **fields})
        self.controller.deploy([Deployment(spec=spec, project_dir=str(project))])

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)
        self.controller.reconcile()
        for _ in range(20):
            await asyncio.sleep(0)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.store.close()


def test_each_launch_has_its_own_secret_and_the_gateway_gets_it(world: World) -> None:
    async def main() -> None:
        world.deploy(autoscaling={"min_replicas": 2, "max_replicas": 2})
        await world.settle()
        for replica_id in world.runtime.running():
            world.runtime.make_ready(replica_id)
        await world.settle()
        launches = {launch.replica_id: launch for launch in world.runtime.launches}
        assert set(world.gateway.secrets) == set(world.runtime.running())
        for replica_id, secret in world.gateway.secrets.items():
            assert secret == launches[replica_id].secret and len(secret) == 32
        assert len(set(world.gateway.secrets.values())) == 2
        assert not any(launch.debug_errors for launch in launches.values())

    asyncio.run(main())


def test_a_lost_connection_restarts_the_replica_with_the_reason(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cirrus.control.controller.LOST_GRACE_S", 0.0)

    async def main() -> None:
        world.deploy()
        await world.settle()
        [replica_id] = world.runtime.running()
        world.runtime.make_ready(replica_id)
        await world.settle()
        first_secret = world.gateway.secrets[replica_id]
        assert world.controller.apis["api"].replicas[replica_id].state is ReplicaState.READY

        world.gateway.lose("api", replica_id, "bad frame from the replica: frame of 9 bytes exceeds the limit")
        await world.settle()
        await asyncio.sleep(0.01)
        await world.settle()
        assert world.runtime.stops == [replica_id]
        replica = world.controller.apis["api"].replicas[replica_id]
        assert replica.state is ReplicaState.BACKOFF and replica.restarts == 1
        assert replica.last_error is not None and "lost its connection to the gateway: bad frame" in replica.last_error
        replica.next_start_at = 0.0
        await world.settle()
        assert world.runtime.running() == [replica_id]
        assert world.runtime.launches[-1].secret != first_secret  # a new launch, a new secret

    asyncio.run(main())


def test_a_replica_that_exits_is_not_blamed_on_its_connection(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cirrus.control.controller.LOST_GRACE_S", 0.05)

    async def main() -> None:
        world.deploy()
        await world.settle()
        [replica_id] = world.runtime.running()
        world.runtime.make_ready(replica_id)
        await world.settle()
        world.gateway.lose("api", replica_id)  # the connection goes first, the exit is reported after
        world.runtime.crash(replica_id, signal=9)
        await asyncio.sleep(0.1)
        await world.settle()
        replica = world.controller.apis["api"].replicas[replica_id]
        assert world.runtime.stops == []
        assert replica.last_error is not None and "SIGKILL" in replica.last_error

    asyncio.run(main())


@pytest.mark.parametrize(("daemon_default", "spec_value", "expected"), [(True, None, True), (True, False, False)])
def test_debug_errors_from_the_spec_or_the_daemon(
    tmp_path: Path, daemon_default: bool, spec_value: bool | None, expected: bool
) -> None:
    world = World(tmp_path, debug_errors=daemon_default)

    async def main() -> None:
        world.deploy(**({} if spec_value is None else {"debug_errors": spec_value}))
        await world.settle()
        assert [launch.debug_errors for launch in world.runtime.launches] == [expected]

    try:
        asyncio.run(main())
    finally:
        world.store.close()
