"""Schemathesis fuzzes the admin API from its own OpenAPI document: no request gets a 5xx.

The daemon publishes `GET /v1/openapi.json` (built by cirrus/admin_openapi.py from the models the
handlers validate with); schemathesis reads it from a running daemon, with the token, and sends
generated requests to every operation: valid ones, and invalid ones (wrong types, missing and
unknown fields, out-of-range numbers, bodies of the wrong media type), a bounded number of
examples each. Every answer must be a 2xx or 4xx that the document lists (status, media type and
schema), the daemon log must hold no traceback, and the daemon must still answer
`GET /v1/health` afterwards.

Path parameters are random names, so half the examples of each `{name}` operation are pointed at a
live API (`echo`) instead, to reach the code past "no API named ..." (revisions, rollback,
promote, logs, dead letters, jobs). Left out or bounded, on purpose:

- `POST /v1/shutdown`: it stops the daemon under test (test_e2e_lifecycle covers it).
- `DELETE /v1/apis/{name}` is not pointed at `echo`, which the other operations need alive.
- `GET /v1/apis/{name}/logs` on `echo` never asks `follow=true`: that answer streams until the
  client hangs up (following is tested in tests/test_runtime_node.py).
- `POST /v1/apis`: a deployment without a snapshot digest makes the daemon pack its `project_dir`
  (up to the 64 MiB snapshot cap), and a generated path could name any directory (`/`, `~`). So
  each generated `project_dir` that is a string is moved inside an empty directory before it is
  sent (its `/` and `.` become `_`; every other character, a NUL byte included, stays): no
  predictor file can exist there (`predictor.path` may not leave the project directory), a
  splitter has no code to pack, and the rest of the body (spec, digest, force, canary) goes as
  generated. The schema is not narrowed, so negative examples still send a `project_dir` of the
  wrong type, or none. (A generated spec seldom passes every validator of cirrus/spec.py, so the
  paths of a valid deploy are fuzzed in process in tests/test_admin_openapi.py.)
- No batch API is deployed: a valid generated job may ask for up to 1000 workers, and would make
  its generated `sink` directory wherever that names (jobs are fuzzed in process instead, over a
  fake runtime, in tests/test_admin_openapi.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from conftest import ECHO_PREDICTOR, Cirrus, module_daemon, write_project
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.modes import GenerationMode

from cirrus.admin_openapi import OPERATIONS
from cirrus.types import ApiStatusName

EXAMPLES_PER_OPERATION = 40  # per mode: ~19 operations x 2 modes x 40, ~1500 requests
LIVE_API = "echo"
SKIPPED = {("POST", "/v1/shutdown")}
NOT_LIVE = {("DELETE", "/v1/apis/{name}")}
# No 5xx; and every answer is one the document lists, with its media type and schema (so it cannot drift).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cirrus, dict[str, str], Path]]:
    home = tmp_path_factory.mktemp("attack-fuzz-admin") / "home"
    with module_daemon(home) as cirrus:
        cirrus.client().deploy(write_project(home.parent / "echo", ECHO_PREDICTOR, name=LIVE_API))
        cirrus.wait_for(LIVE_API, lambda s: s.status == ApiStatusName.LIVE)
        token = (home / "token").read_text().strip()
        empty = home.parent / "empty-project"
        empty.mkdir()
        yield cirrus, {"Authorization": f"Bearer {token}"}, empty


def _follows(case: schemathesis.Case) -> bool:
    return str((case.query or {}).get("follow", "false")).lower() in ("1", "true", "yes")


def _aim(case: schemathesis.Case, live: bool, empty_project: Path) -> None:
    """Point the case at the live API (when `live` and allowed), and any deploy at an empty project."""
    key = (case.operation.method.upper(), case.operation.path)
    streams = case.operation.path.endswith("/logs") and _follows(case)
    if live and "name" in (case.path_parameters or {}) and key not in NOT_LIVE and not streams:
        case.path_parameters = {**(case.path_parameters or {}), "name": LIVE_API}
    if key == ("POST", "/v1/apis") and isinstance(case.body, dict):
        for deployment in case.body.get("deployments") or []:
            if isinstance(deployment, dict) and isinstance(deployment.get("project_dir"), str):
                inside = deployment["project_dir"].replace("/", "_").replace(".", "_")
                deployment["project_dir"] = f"{empty_project}/{inside}"


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_schemathesis_finds_no_server_error_in_the_admin_api(
    admin: tuple[Cirrus, dict[str, str], Path], mode: GenerationMode
) -> None:
    cirrus, auth, empty_project = admin
    admin_url = cirrus.info.admin_url
    schema = schemathesis.openapi.from_url(f"{admin_url}/v1/openapi.json", headers=auth, timeout=10)
    documented = {(method, path) for path, item in schema.raw_schema["paths"].items() for method in item}
    assert documented == {(method.lower(), path) for method, path in OPERATIONS}, "the daemon serves another document"
    statuses: dict[str, dict[int, int]] = {}
    for method, path in sorted(OPERATIONS, key=lambda key: (key[1], key[0])):
        if (method, path) in SKIPPED:
            continue
        seen = statuses.setdefault(f"{method} {path}", {})
        _fuzz(schema[path][method], mode, auth, empty_project, seen)
        assert sum(seen.values()) >= EXAMPLES_PER_OPERATION // 4, (method, path, seen)
    print(
        f"schemathesis {mode.value}:\n" + "\n".join(f"  {op}: {dict(sorted(s.items()))}" for op, s in statuses.items())
    )
    every = [status for seen in statuses.values() for status in seen]
    if mode == GenerationMode.POSITIVE:
        assert any(200 <= status < 300 for status in every), statuses
    assert any(400 <= status < 500 for status in every), statuses
    health = httpx.get(f"{admin_url}/v1/health", headers=auth, timeout=10)
    assert health.status_code == 200, health.text
    assert cirrus.client().get(LIVE_API).name == LIVE_API
    assert "Traceback" not in cirrus.daemon_log(), cirrus.daemon_log()[-4000:]


def _fuzz(
    operation: Any, mode: GenerationMode, auth: dict[str, str], empty_project: Path, statuses: dict[int, int]
) -> None:
    @hypothesis.settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode), live=st.booleans())
    def fuzz(case: schemathesis.Case, live: bool) -> None:
        _aim(case, live, empty_project)
        case.headers = {**(case.headers or {}), **auth}  # fuzz the handlers, not only the token check
        response = case.call(timeout=10)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)
        assert response.status_code < 500, (
            f"{response.status_code} for {case.operation.method.upper()} {case.formatted_path} "
            f"query={case.query!r} body={case.body!r}: {response.text[:300]}"
        )

    fuzz()
