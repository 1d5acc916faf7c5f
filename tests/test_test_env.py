"""The test environment itself: request logs parsed whatever Werkzeug colours, missing backends loud."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from backends import REDIS_SERVER_ENV, REQUIRE_ENV
from s3_server import Request, parse_request_log

ROOT = Path(__file__).resolve().parent.parent

# Werkzeug 3.1 styles a 206 magenta and bold, a 404 yellow, and leaves a 200 plain.
COLOURED_LOG = (
    " * Running on http://127.0.0.1:5000\n"
    '127.0.0.1 - - [29/Nov/2026 12:00:00] "GET /bucket/key HTTP/1.1" 200 -\n'
    '127.0.0.1 - - [29/Nov/2026 12:00:01] "\x1b[35m\x1b[1mGET /bucket/key HTTP/1.1\x1b[0m" 206 -\n'
    '127.0.0.1 - - [29/Nov/2026 12:00:02] "\x1b[33mHEAD /bucket/gone?x=1 HTTP/1.1\x1b[0m" 404 -\n'
)


def test_coloured_request_lines_are_parsed() -> None:
    assert parse_request_log(COLOURED_LOG) == [
        Request("GET", "/bucket/key", 200),
        Request("GET", "/bucket/key", 206),
        Request("HEAD", "/bucket/gone?x=1", 404),
    ]


def _pytest(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    test = "tests/test_store.py::test_submit_then_get_and_lease_round_trip"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=ROOT,
        env={**os.environ, REDIS_SERVER_ENV: "/nonexistent/redis-server", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_missing_backend_is_loud_and_fails_when_required() -> None:
    relaxed = _pytest({REQUIRE_ENV: "0"})
    assert relaxed.returncode == 0, relaxed.stdout
    assert "BACKENDS NOT TESTED" in relaxed.stdout
    assert "redis: 1 test(s) skipped" in relaxed.stdout
    assert "/nonexistent/redis-server is not an executable" in relaxed.stdout

    strict = _pytest({REQUIRE_ENV: "1"})
    assert strict.returncode != 0, strict.stdout
    assert "every backend must be tested" in strict.stdout
