"""`cirrus serve PATH`, the development loop, as real processes over real sockets.

An edit of the project rolls out a new revision under a request loop without one failed request;
what .cirrusignore leaves out changes nothing; a broken spec or predictor is logged and the old
revision serves on. The serve process is the daemon in the foreground: `cirrus get`, `predict`,
`logs` and `down` work against it, a second one on the same state directory is refused, and a
taken port is one clean line, as for `cirrus up`.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from conftest import Cirrus, write_project
from test_e2e_revisions import Traffic

VALUE = """
    VALUE = {value!r}


    class Predictor:
        def predict(self, payload):
            print(f"dev-print got {{payload!r}}", flush=True)
            return {{"value": VALUE}}
"""

IMPORT_ERROR = """
    import no_such_module_for_cirrus_reload


    class Predictor:
        def predict(self, payload):
            return {"value": "never"}
"""

SINGLE = {"min_replicas": 1, "max_replicas": 1}


class Output:
    """The lines a process prints (stdout and stderr together), as they come."""

    def __init__(self, stream: object) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.put(line)

    def wait_for(self, needle: str, timeout: float = 30) -> str:
        """The next line holding `needle`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {needle!r} in {timeout}s; so far:\n{self.text()}") from None
            self.seen.append(line)
            if needle in line:
                return line

    def none_for(self, needle: str, seconds: float) -> None:
        """No line holding `needle` comes within `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return
            self.seen.append(line)
            assert needle not in line, self.text()

    def text(self) -> str:
        return "".join(self.seen)

    def drain(self) -> str:
        self._thread.join(timeout=10)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.text()


@contextlib.contextmanager
def serving(cirrus: Cirrus, *args: str) -> Iterator[tuple[subprocess.Popen[str], Output]]:
    """`cirrus serve ARGS` running until it says it serves; SIGINT (Ctrl-C) at the end, unless it exited."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cirrus.cli", "serve", *args],
        env=cirrus.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(proc.stdout)
    try:
        output.wait_for("Ctrl-C stops")
        yield proc, output
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) in (0, 130), output.drain()
        own = output.drain().splitlines()  # a replica's lines start with "[its id]"; serve's own never traceback
        assert not any(line.startswith("Traceback") for line in own), output.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _post_until_served(url: str, timeout: float = 30) -> httpx.Response:
    """POST until the first replica answers (it starts after `serve` says it serves)."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(url, json={}, timeout=10)
        if response.status_code == 200 or time.monotonic() >= deadline:
            return response
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def test_edits_roll_out_under_traffic_and_broken_ones_keep_the_old_revision(cirrus: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", VALUE.format(value="one"), name="dev", autoscaling=SINGLE)
    (project / ".cirrusignore").write_text("scratch/\n")
    good_spec = (project / "cirrus.yaml").read_text()
    with serving(cirrus, str(project)) as (_, output):
        url = cirrus.url("dev")
        assert _post_until_served(url).json() == {"value": "one"}
        with Traffic(url) as traffic:
            traffic.wait_for_value("one")

            traffic.phase = "edit"
            _write(project / "predictor.py", VALUE.format(value="two"))
            assert "predictor.py" in output.wait_for("changed: ")
            output.wait_for("API dev: revision 2 serves")
            traffic.wait_for_value("two")

            traffic.phase = "ignored files"
            _write(project / "scratch" / "notes.txt", "not part of the API")
            _write(project / "__pycache__" / "predictor.cpython-311.pyc", "not either")
            output.none_for("changed: ", 2.0)

            traffic.phase = "import error"
            _write(project / "predictor.py", IMPORT_ERROR)
            failed = output.wait_for("API dev: revision 3 failed to start")
            assert "no_such_module_for_cirrus_reload" in failed
            traffic.wait_for_value("two")

            traffic.phase = "spec error"
            (project / "cirrus.yaml").write_text(good_spec.replace("kind: realtime", "kind: realtime\n  colour: red"))
            assert "the serving revisions keep serving" in output.wait_for("reload failed")
            output.wait_for("colour", timeout=5)  # the spec error's lines name the field
            traffic.wait_for_value("two")

            traffic.phase = "fixed"  # two files written at once: one reload
            _write(project / "predictor.py", VALUE.format(value="three"))
            (project / "cirrus.yaml").write_text(good_spec)
            assert "changed: cirrus.yaml, predictor.py; reloading" in output.wait_for("changed: ")
            output.wait_for("API dev: revision 4 serves")
            traffic.wait_for_value("three", timeout=30)
        assert traffic.failures() == [], traffic.failures()[:5]
        assert "revision 2 updated, rolling out" in output.text()


def test_the_cli_works_against_serve_on_its_home_and_ports(cirrus: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", VALUE.format(value="cli"), name="dev", autoscaling=SINGLE)
    home, port, admin_port = tmp_path / "serve-home", _free_port(), _free_port()
    where = ("--home", str(home))
    with serving(cirrus, str(project), *where, "--port", str(port), "--admin-port", str(admin_port)) as (proc, output):
        assert (home / "daemon.json").is_file()
        assert _post_until_served(f"http://127.0.0.1:{port}/dev").json() == {"value": "cli"}

        code, out, err = cirrus.cli("get", *where)
        assert code == 0, err
        assert "dev" in out and "live" in out and f"http://127.0.0.1:{port}/dev" in out
        code, out, err = cirrus.cli("predict", "dev", '{"n": 7}', *where)
        assert code == 0, err
        assert '"value": "cli"' in out
        deadline = time.monotonic() + 10
        while "dev-print got {'n': 7}" not in (logs := cirrus.cli("logs", "dev", *where))[1]:
            assert time.monotonic() < deadline, logs
            time.sleep(0.2)
        assert logs[0] == 0

        code, out, err = cirrus.cli("serve", str(project), *where, "--port", "0", "--admin-port", "0")
        assert code == 1
        assert err.strip().splitlines() == [
            f"error: a Cirrus daemon already runs with the state directory {home}: stop it (`cirrus down`) "
            "or give `cirrus serve` another --home"
        ], err

        code, out, err = cirrus.cli("down", *where)
        assert code == 0, err
        assert proc.wait(timeout=30) == 0, output.drain()
    assert not (home / "daemon.json").exists()


def test_a_taken_port_is_one_line_for_serve_as_for_up(cirrus: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", VALUE.format(value="x"), name="dev", autoscaling=SINGLE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        expected = f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pick another port"
        for flag in ("--port", "--admin-port"):
            code, out, err = cirrus.cli("serve", str(project), flag, str(port), timeout=30)
            assert (code, err.strip().splitlines()) == (1, [expected]), (flag, out, err)
        code, _, err = cirrus.cli("up", "--port", str(port), timeout=30)
        assert code == 1
        assert "Traceback" not in err
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use; pick another port" in err
    assert not cirrus.processes()
