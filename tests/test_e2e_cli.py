"""The CLI end to end: real `cirrus` subprocesses against a real daemon and real replicas."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from conftest import ECHO_PREDICTOR, Cirrus, pid_alive, wait_gone, write_project


def test_deploy_predict_get_logs_delete(cirrus: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", ECHO_PREDICTOR, name="echo", predictor={"config": {"greeting": "hi"}})

    code, out, err = cirrus.cli("deploy", str(project))
    assert code == 0, err
    gateway = cirrus.gateway_url
    assert f"{gateway}/echo" in out
    assert "created" in out and "revision 1" in out
    assert "echo is live" in out

    code, out, err = cirrus.cli("predict", "echo", '{"x": [1, 2]}')
    assert code == 0, err
    assert json.loads(out) == {"greeting": "hi", "echo": {"x": [1, 2]}}

    code, out, err = cirrus.cli("get")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.strip().startswith("echo"))
    assert row.split()[:4] == ["echo", "realtime", "live", "1/1"]
    assert f"{gateway}/echo" in row

    code, out, err = cirrus.cli("get", "echo", "-o", "json")
    assert code == 0, err
    status = json.loads(out)
    assert status["name"] == "echo" and status["status"] == "live" and status["revision"] == 1
    [replica] = status["replicas"]
    assert replica["state"] == "ready" and replica["restarts"] == 0
    pid = replica["pid"]
    assert isinstance(pid, int) and pid_alive(pid)
    assert pid in cirrus.processes()

    code, out, err = cirrus.cli("get", "echo")  # the one-API view shows the replica table
    assert code == 0, err
    assert str(pid) in out and "ready" in out

    code, out, err = cirrus.cli("logs", "echo")
    assert code == 0, err
    assert "echo-print got {'x': [1, 2]}" in out
    assert "echo-log answering {'x': [1, 2]}" in out
    assert all(re.match(r"^\[echo-[0-9a-f]+\] ", line) for line in out.splitlines()), out

    code, out, err = cirrus.cli("delete", "echo")
    assert (code, out.strip()) == (0, "deleted echo"), err
    code, out, err = cirrus.cli("get", "echo")
    assert code == 1
    assert "no API named 'echo'" in err
    assert "Traceback" not in out + err
    assert not wait_gone({pid}), "the deleted API's replica still runs"
    code, out, _ = cirrus.cli("get", "-o", "json")
    assert (code, json.loads(out)) == (0, [])
    code, _, err = cirrus.cli("predict", "echo", "{}")
    assert code == 1 and "HTTP 404" in err


def test_up_and_down(cirrus: Cirrus) -> None:
    code, out, err = cirrus.cli("up")
    assert code == 0, err
    assert "Cirrus daemon started" in out
    info = cirrus.info
    assert f"gateway: {info.gateway_url}" in out and f"admin:   {info.admin_url}" in out
    assert httpx.get(f"{info.gateway_url}/healthz").json() == {"status": "ok", "apis": []}

    code, out, _ = cirrus.cli("up", "-o", "json")
    assert code == 0 and json.loads(out)["pid"] == info.pid  # idempotent: the same daemon
    code, out, _ = cirrus.cli("get")
    assert code == 0 and "no APIs deployed" in out

    code, out, err = cirrus.cli("down")
    assert (code, out.strip()) == (0, "Cirrus daemon stopped"), err
    assert not wait_gone({info.pid})
    assert not cirrus.processes()
    assert not cirrus.settings.daemon_file.exists()
    code, out, _ = cirrus.cli("down")
    assert (code, out.strip()) == (0, "the Cirrus daemon is not running")
    code, _, err = cirrus.cli("get")
    assert code == 1 and "not running" in err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _lines(stream: object) -> tuple[queue.Queue[str], threading.Thread]:
    """Lines of `stream` as they come, read by a thread that ends at EOF."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return lines, thread


def _wait_line(lines: queue.Queue[str], needle: str, timeout: float, seen: list[str]) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(
                f"no line with {needle!r} within {timeout}s; output so far:\n{''.join(seen)}"
            ) from None
        seen.append(line)
        if needle in line:
            return line


def test_serve_in_the_foreground_until_ctrl_c(cirrus: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", ECHO_PREDICTOR, name="dev")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cirrus.cli", "serve", str(project), "--port", str(port)],
        env=cirrus.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        lines, pump = _lines(proc.stdout)
        assert _wait_line(lines, "dev: ", 30, seen).strip() == f"dev: http://127.0.0.1:{port}/dev"
        _wait_line(lines, "Ctrl-C stops", 30, seen)
        deadline = time.monotonic() + 30
        while True:  # the replica starts after the daemon is up: wait for it to serve
            response = httpx.post(f"http://127.0.0.1:{port}/dev", json={"n": 1}, timeout=10)
            if response.status_code == 200 or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        assert response.status_code == 200, response.text
        assert response.json() == {"greeting": "hello", "echo": {"n": 1}}
        _wait_line(lines, "echo-print got {'n': 1}", 10, seen)  # replica logs stream to the terminal

        # The replica, and the template process it was forked from (same command line).
        replicas = {pid for pid, cmd in cirrus.processes().items() if "cirrus.replica" in cmd}
        assert 1 <= len(replicas) <= 2, cirrus.processes()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) in (0, 130), "".join(seen)
        pump.join(timeout=10)
        while not lines.empty():
            seen.append(lines.get())
        assert "stopping" in "".join(seen)
        assert "Traceback" not in "".join(seen)
        assert not wait_gone(replicas), "a replica outlived `cirrus serve`"
        assert not cirrus.processes()
        assert not cirrus.settings.daemon_file.exists()  # serve ran on CIRRUS_HOME, and said it left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
