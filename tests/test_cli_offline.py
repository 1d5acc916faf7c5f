"""The CLI and client without a real daemon: help, spec errors, clear "not running" errors, the light
`import cirrus`, and the daemon's life (up/down/predict) driven against a tiny fake daemon process."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cirrus.cli import app
from cirrus.client import CirrusError, Client, encode_payload
from cirrus.settings import Settings
from cirrus.types import DaemonInfo

COMMANDS = ["up", "down", "deploy", "get", "logs", "predict", "delete", "serve"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("CIRRUS_HOME", str(home))
    monkeypatch.setenv("CIRRUS_PYTHON", "/bin/false")  # nothing may start a real daemon by accident
    return home


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_help_lists_every_command() -> None:
    code, out, _ = run("--help")
    assert code == 0
    for command in COMMANDS:
        assert command in out
    for command in COMMANDS:
        assert run(command, "--help")[0] == 0, command


def test_deploy_of_a_bad_spec_prints_the_error_and_starts_nothing(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "predictor.py").write_text("class Predictor: ...\n")
    spec = "- name: iris\n  predictor: {path: predictor.py}\n  compute: {cpus: 1}\n"
    (project / "cirrus.yaml").write_text(spec)
    code, out, err = run("deploy", str(project))
    assert code == 1
    assert "compute.cpus: unknown field" in err
    assert "Traceback" not in out + err
    assert not home.exists()  # no daemon was started, not even its log


def test_get_without_a_daemon_says_how_to_start_one(home: Path) -> None:
    code, _, err = run("get")
    assert code == 1
    assert "the Cirrus daemon is not running; start it with `cirrus up`" in err


def test_a_stale_daemon_file_is_not_a_running_daemon(home: Path) -> None:
    port = free_port()
    home.mkdir()
    stale = DaemonInfo(
        pid=2**22 + 1,
        version="0",
        gateway_url=f"http://127.0.0.1:{port}",
        admin_url=f"http://127.0.0.1:{port}",
        started_at=0,
    )
    (home / "daemon.json").write_text(stale.model_dump_json())
    code, _, err = run("get", "iris")
    assert code == 1
    assert "not running" in err
    assert Client().ping() is None
    assert run("down")[1].strip() == "the Cirrus daemon is not running"


def test_bad_settings_and_payloads_are_clean_errors(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "payload is not valid JSON" in run("predict", "iris", "{oops")[2]
    assert "must look like 'Name: value'" in run("predict", "iris", "{}", "-H", "novalue")[2]
    monkeypatch.setenv("CIRRUS_PORT", "eighty")
    code, _, err = run("up")
    assert code == 1
    assert "CIRRUS_PORT='eighty' must be an integer" in err


def test_import_cirrus_is_light() -> None:
    heavy = ["httpx", "typer", "rich", "pydantic", "yaml", "torch"]
    code = f"import sys, cirrus; print([m for m in {heavy!r} if m in sys.modules]); print(cirrus.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "0.1.0"]


def test_lazy_exports() -> None:
    import cirrus

    assert cirrus.Client is Client
    assert cirrus.CirrusError is CirrusError
    with pytest.raises(AttributeError):
        _ = cirrus.NoSuchThing  # type: ignore[attr-defined]


def test_payload_encoding() -> None:
    assert encode_payload(b"\x00\x01") == (b"\x00\x01", "application/octet-stream")
    assert encode_payload("hi") == (b"hi", "text/plain; charset=utf-8")
    assert encode_payload({"x": [1, 2]}) == (b'{"x": [1, 2]}', "application/json")
    with pytest.raises(CirrusError, match="cannot be sent as JSON"):
        encode_payload({"x": object()})


# The daemon's life, against a fake daemon started the way `cirrus up` starts the real one.

FAKE_DAEMON = """
import json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = dict(zip(sys.argv[3::2], sys.argv[4::2]))  # argv: -m cirrus.daemon --home H --host ... (pairs)
home = args["--home"]
print("fake daemon starting", flush=True)

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def reply(self, status, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status); self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data))); self.end_headers(); self.wfile.write(data)
    def do_GET(self):
        if self.headers.get("authorization") != "Bearer s3cret":
            return self.reply(401, {"error": "bad token"})
        if self.path == "/v1/health": return self.reply(200, info)
        if self.path == "/v1/apis": return self.reply(200, {"apis": []})
        self.reply(404, {"error": "no API named 'x'"})
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/v1/shutdown":
            self.reply(200, {"stopping": True}); threading.Thread(target=admin.shutdown).start(); return
        if self.path == "/echo":
            return self.reply(200, {"got": json.loads(body), "ctype": self.headers["content-type"]})
        self.reply(422, {"detail": "bad input"})

admin = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
gateway = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=gateway.serve_forever, daemon=True).start()
info = {"pid": os.getpid(), "version": "0.1.0", "started_at": time.time(),
        "gateway_url": "http://127.0.0.1:%d" % gateway.server_port,
        "admin_url": "http://127.0.0.1:%d" % admin.server_port}
with open(os.path.join(home, "token"), "w") as f: f.write("s3cret")
with open(os.path.join(home, "daemon.json"), "w") as f: json.dump(info, f)
admin.serve_forever()
os.remove(os.path.join(home, "daemon.json"))
"""


def fake_python(tmp_path: Path, script: str) -> str:
    program = tmp_path / "program.py"
    program.write_text(textwrap.dedent(script))
    launcher = tmp_path / "fake-python"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} {program} "$@"\n')
    launcher.chmod(0o755)
    return str(launcher)


def test_up_get_predict_down_against_a_fake_daemon(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIRRUS_PYTHON", fake_python(tmp_path, FAKE_DAEMON))
    code, out, err = run("up")
    assert code == 0, err
    assert "Cirrus daemon started" in out
    pid = Client().daemon_info().pid
    assert run("up")[1].startswith(f"Cirrus daemon is already running (pid {pid})")
    assert json.loads(run("up", "-o", "json")[1])["pid"] == pid

    assert json.loads(run("get", "-o", "json")[1]) == []
    assert "no APIs deployed" in run("get")[1]
    code, _, err = run("get", "x")
    assert code == 1
    assert "no API named 'x' (HTTP 404)" in err

    code, out, _ = run("predict", "echo", '{"a": 1}', "-H", "X-Trace: 7")
    assert code == 0
    assert json.loads(out) == {"got": {"a": 1}, "ctype": "application/json"}
    code, _, err = run("predict", "other", "[]")
    assert code == 1
    assert "HTTP 422" in err and "bad input" in err

    code, out, _ = run("down")
    assert (code, out.strip()) == (0, "Cirrus daemon stopped")
    assert Client().ping() is None
    assert run("down")[1].strip() == "the Cirrus daemon is not running"


def test_up_reports_a_daemon_that_dies_while_starting(home: Path, tmp_path: Path) -> None:
    python = fake_python(tmp_path, "import sys\nprint('boom: address already in use', file=sys.stderr)\nsys.exit(3)\n")
    client = Client(Settings.from_env().with_overrides(python=python))
    with pytest.raises(CirrusError, match=r"exited with code 3(.|\n)*boom: address already in use"):
        client.up(timeout=20)


# Deploy waiting, against an in-memory admin API.


def mock_client(home: Path, api_states: list[dict[str, object]]) -> Client:
    home.mkdir(parents=True, exist_ok=True)
    info = DaemonInfo(
        pid=os.getpid(), version="0.1.0", gateway_url="http://gw", admin_url="http://admin", started_at=time.time()
    )
    (home / "daemon.json").write_text(info.model_dump_json())
    states = iter(api_states)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/health":
            return httpx.Response(200, json=info.model_dump(mode="json"))
        if request.method == "POST" and request.url.path == "/v1/snapshots":
            return httpx.Response(201, json={"digest": hashlib.sha256(request.content).hexdigest()})
        if request.method == "POST" and request.url.path == "/v1/apis":
            names = [d["spec"]["name"] for d in json.loads(request.content)["deployments"]]
            return httpx.Response(
                200,
                json={"results": [{"name": n, "action": "created", "revision": 1, "endpoint": f"/{n}"} for n in names]},
            )
        state = next(states)
        return httpx.Response(
            200,
            json={
                "name": "iris",
                "revision": 1,
                "replicas_ready": 0,
                "replicas_desired": 1,
                "endpoint": "/iris",
                **state,
            },
        )

    return Client(Settings.from_env(), transport=httpx.MockTransport(handler))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "predictor.py").write_text("class Predictor: ...\n")
    (tmp_path / "cirrus.yaml").write_text("- name: iris\n  predictor: {path: predictor.py}\n")
    return tmp_path


def test_deploy_waits_until_live(home: Path, project: Path) -> None:
    client = mock_client(home, [{"status": "starting"}, {"status": "live", "replicas_ready": 1}])
    results = client.deploy(project, timeout=10)
    assert [(r.name, r.action, r.revision) for r in results] == [("iris", "created", 1)]


def test_deploy_names_the_api_that_failed(home: Path, project: Path) -> None:
    failed = {
        "status": "error",
        "replicas": [{"id": "iris-1", "revision": 1, "state": "backoff", "last_error": "ModuleNotFoundError: torch"}],
    }
    client = mock_client(home, [{"status": "starting"}, failed])
    with pytest.raises(CirrusError, match="API 'iris' failed to start: ModuleNotFoundError: torch"):
        client.deploy(project, timeout=10)


def test_deploy_times_out_with_the_last_state(home: Path, project: Path) -> None:
    client = mock_client(home, [{"status": "starting"}] * 1000)
    with pytest.raises(CirrusError, match=r"timed out after 0.5s .*iris is starting \(0/1 replicas ready\)"):
        client.deploy(project, timeout=0.5)


def test_a_failed_deploy_names_only_the_new_revisions_errors(home: Path, project: Path) -> None:
    failed = {
        "status": "error",
        "revision": 1,
        "replicas": [
            {"id": "iris-old", "revision": 0, "state": "backoff", "last_error": "an old revision's ImportError"},
            {"id": "iris-new", "revision": 1, "state": "backoff", "last_error": "ModuleNotFoundError: torch"},
        ],
    }
    client = mock_client(home, [failed])
    with pytest.raises(CirrusError) as caught:
        client.deploy(project, timeout=10)
    assert "ModuleNotFoundError: torch" in str(caught.value)
    assert "old revision" not in str(caught.value)
