"""The admin API's OpenAPI document (`GET /v1/openapi.json`) and the bad input it must answer with a 4xx.

The admin app runs in process over a real controller with a fake runtime (no replica processes),
so these tests take well under a second. The document must describe exactly the app's routes
(a new route without an entry in `cirrus.admin_openapi.OPERATIONS` fails here), with its body
schemas taken from the models the handlers validate with. The daemon's admin API is fuzzed from
this document in tests/test_attack_fuzz_admin.py; the requests below are the 5xx that review and
probing found, kept as regression tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import hypothesis
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from pydantic import TypeAdapter
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from cirrus.admin import build_admin_app
from cirrus.admin_openapi import (
    OPERATIONS,
    DeployRequest,
    KeyRequest,
    RollbackRequest,
    openapi_document,
)
from cirrus.control.controller import Controller
from cirrus.control.jobs import JobManager, JobStore
from cirrus.control.statedb import StateDB
from cirrus.control.store import Store
from cirrus.jobs import JobRequest
from cirrus.snapshots import SnapshotStore
from cirrus.spec import Deployment
from cirrus.store import open_store
from cirrus.testing import FakeGateway, FakeRuntime
from cirrus.types import DaemonInfo

TOKEN = "test-token"
REF = "#/components/schemas/{model}"
NO_USER = "~cirrus-no-such-user"
PREDICTOR = "class Predictor:\n    def predict(self, payload):\n        return payload\n"
BATCH_PREDICTOR = "class Predictor:\n    def predict_batch(self, payloads):\n        return payloads\n"


class Admin:
    def __init__(self, client: TestClient, project: Path, routes: list[Any]) -> None:
        self.http, self.project, self.routes = client, project, routes
        self.tmp = project.parent

    def deployment(self, name: str = "echo", **fields: Any) -> dict[str, Any]:
        spec = {"name": name, "predictor": {"path": "predictor.py"}, **fields.pop("spec", {})}
        return {"spec": spec, "project_dir": str(self.project), **fields}

    def document(self) -> dict[str, Any]:
        response = self.http.get("/v1/openapi.json")
        assert response.status_code == 200, response.text
        return dict(response.json())


@pytest.fixture
def admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Admin]:
    """The admin app over a controller with a fake runtime, an API `echo` and a batch API `crunch`."""
    monkeypatch.chdir(tmp_path)  # relative paths a request names stay in here
    project = tmp_path / "project"
    project.mkdir()
    (project / "predictor.py").write_text(PREDICTOR)
    (tmp_path / "batch").mkdir()
    (tmp_path / "batch" / "predictor.py").write_text(BATCH_PREDICTOR)
    state = StateDB(tmp_path / "state.db")
    queue = open_store(f"sqlite://{tmp_path / 'queue.db'}")
    controller = Controller(
        Store(state),
        FakeRuntime(tmp_path / "logs"),
        FakeGateway(),
        endpoint=lambda name: f"http://gateway/{name}",
        queue_store=queue,
        jobs=JobManager(JobStore(state), queue, tmp_path / "jobs"),
        snapshots=SnapshotStore(tmp_path / "snapshots"),
    )
    info = DaemonInfo(pid=1, version="0", gateway_url="http://gateway", admin_url="http://admin", started_at=0)
    app = build_admin_app(controller, token=TOKEN, info=lambda: info, shutdown=lambda: None)
    with TestClient(app, headers={"authorization": f"Bearer {TOKEN}"}) as client:
        admin = Admin(client, project, list(cast(Starlette, app).routes))
        batch = admin.deployment("crunch", spec={"kind": "batch"}, project_dir=str(tmp_path / "batch"))
        deployed = client.post("/v1/apis", json={"deployments": [admin.deployment(), batch]})
        assert deployed.status_code == 200, deployed.text
        yield admin
    queue.close()
    state.close()


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    return dict(document["components"]["schemas"][ref.rpartition("/")[2]]) if ref else schema


# --- the document ---------------------------------------------------------------------------------


def test_every_route_of_the_app_is_in_the_document(admin: Admin) -> None:
    document = admin.document()
    served = {
        (method.lower(), route.path, tuple(route.param_convertors))
        for route in admin.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }
    documented = {
        (method, path, tuple(p["name"] for p in operation["parameters"] if p["in"] == "path"))
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    assert served == documented
    assert {(method.lower(), path) for method, path in OPERATIONS} == {(m, p) for m, p, _ in served}
    operations = [op for item in document["paths"].values() for op in item.values()]
    assert len({op["operationId"] for op in operations}) == len(operations)
    for operation in operations:
        assert "401" in operation["responses"] and operation["summary"], operation
        assert any(status.startswith("2") for status in operation["responses"]), operation
    assert document["openapi"] == "3.1.0" and document["security"] == [{"token": []}]
    assert document["components"]["securitySchemes"]["token"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "the token in $CIRRUS_HOME/token",
    }


def test_a_route_without_an_entry_or_an_entry_without_a_route_is_refused(admin: Admin) -> None:
    async def endpoint(request: Any) -> Any: ...

    with pytest.raises(LookupError, match="POST /v1/new has no entry"):
        openapi_document([*admin.routes, Route("/v1/new", endpoint, methods=["POST"])], "0")
    without_promote = [r for r in admin.routes if getattr(r, "path", "") != "/v1/apis/{name}/promote"]
    with pytest.raises(LookupError, match="promote"):
        openapi_document(without_promote, "0")


def test_bodies_are_the_models_the_handlers_validate_with(admin: Admin) -> None:
    document = admin.document()
    schemas, paths = document["components"]["schemas"], document["paths"]

    def body(method: str, path: str) -> dict[str, Any]:
        return dict(paths[path][method]["requestBody"]["content"]["application/json"]["schema"])

    assert body("post", "/v1/apis") == {"$ref": REF.format(model="DeployRequest")}
    assert body("post", "/v1/apis/{name}/jobs") == {"$ref": REF.format(model="JobRequest")}
    assert body("post", "/v1/keys") == {"$ref": REF.format(model="KeyRequest")}
    assert body("post", "/v1/apis/{name}/rollback") == {"$ref": REF.format(model="RollbackRequest")}
    assert paths["/v1/keys"]["post"]["requestBody"]["required"] is False
    for model in (DeployRequest, KeyRequest, RollbackRequest, JobRequest):
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields), model
    deploy = schemas["DeployRequest"]["properties"]
    assert deploy["deployments"]["items"] == {"$ref": REF.format(model="Deployment")}
    assert {"force", "canary"} <= set(deploy)
    alone = TypeAdapter(list[Deployment]).json_schema(ref_template=REF)["$defs"]
    assert schemas["Deployment"] == alone["Deployment"]
    assert schemas["ApiSpec"]["properties"]["name"]["pattern"]  # the name rule the validator checks
    to = _resolve(document, schemas["RollbackRequest"]["properties"]["to"]["anyOf"][0])
    assert to["type"] == "integer" and to["minimum"] == 1
    snapshot = paths["/v1/snapshots"]["post"]["requestBody"]["content"]["application/gzip"]["schema"]
    assert snapshot == {"type": "string", "format": "binary"}


def test_query_parameters_are_documented(admin: Admin) -> None:
    paths = admin.document()["paths"]

    def query(path: str) -> dict[str, str]:
        return {p["name"]: p["schema"]["type"] for p in paths[path]["get"]["parameters"] if p["in"] == "query"}

    assert query("/v1/apis/{name}/logs") == {"lines": "integer", "follow": "boolean", "replica": "string"}
    assert query("/v1/apis/{name}/dead-letters") == {"limit": "integer"}
    assert query("/v1/jobs") == {"api": "string"}


def test_the_document_is_valid_openapi_and_needs_the_token(admin: Admin) -> None:
    document = admin.document()
    for name, schema in document["components"]["schemas"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise AssertionError(f"components.schemas.{name}: {exc.message}") from None
    schema = schemathesis.openapi.from_dict(document)
    operations = list(schema.get_all_operations())
    assert len(operations) == len(OPERATIONS)
    for result in operations:
        result.ok()  # raises where schemathesis cannot read an operation
    refused = admin.http.get("/v1/openapi.json", headers={"authorization": "Bearer wrong"})
    assert refused.status_code == 401


# --- bad input gets a 4xx that says what was wrong ------------------------------------------------


def _deploy(admin: Admin, top: dict[str, Any] | None = None, **fields: Any) -> tuple[str, str, Any]:
    """`POST /v1/apis` of `echo` with these deployment `fields` and `top`-level fields."""
    return ("POST", "/v1/apis", {"deployments": [admin.deployment(**fields)], **(top or {})})


CASES: list[tuple[str, Any, int, str]] = [
    # rollback to a revision past what SQLite holds: was OverflowError, a 500
    ("rollback-huge", ("POST", "/v1/apis/echo/rollback", {"to": 2**64}), 400, "to: Input should be less than"),
    ("rollback-bool", ("POST", "/v1/apis/echo/rollback", {"to": True}), 400, "to: Input should be a valid integer"),
    ("rollback-list", ("POST", "/v1/apis/echo/rollback", [1]), 400, "must be a JSON object"),
    # a NUL byte in project_dir: pathlib's ValueError was a 500
    ("deploy-nul-dir", lambda a: _deploy(a, project_dir=f"{a.project}\x00"), 400, "project_dir holds a NUL byte"),
    (
        "deploy-nul-predictor",
        lambda a: _deploy(a, spec={"predictor": {"path": "pre\x00dictor.py"}}),
        400,
        "predictor.path holds a NUL byte",
    ),
    # a model path under ~user of no such user: pathlib's RuntimeError was a 500
    (
        "deploy-no-user",
        lambda a: _deploy(a, spec={"models": [{"name": "m", "path": f"{NO_USER}/m"}]}),
        400,
        f"models.0.path: {NO_USER} is no known user's home",
    ),
    ("deploy-canary-bool", lambda a: _deploy(a, {"canary": True}), 400, "canary:"),
    ("deploy-canary-huge", lambda a: _deploy(a, {"canary": 10**400}), 400, "canary:"),
    ("deploy-canary-100", lambda a: _deploy(a, {"canary": 100}), 400, "less than 100"),
    ("deploy-force-text", lambda a: _deploy(a, {"force": "yes"}), 400, "force:"),
    ("deploy-typo", lambda a: _deploy(a, {"canery": 5}), 400, "canery: unknown field"),
    # job files: a NUL byte (ValueError) or ~user of no such user (RuntimeError) were 500s
    ("job-nul-items", ("POST", "/v1/apis/crunch/jobs", {"items_url": "a\x00", "batch_size": 1}), 400, "NUL byte"),
    (
        "job-no-user-items",
        ("POST", "/v1/apis/crunch/jobs", {"items_url": f"{NO_USER}/items.jsonl", "batch_size": 1}),
        400,
        "is not the home directory of a known user",
    ),
    (
        "job-nul-sink",
        ("POST", "/v1/apis/crunch/jobs", {"items": [1], "batch_size": 1, "sink": "out\x00"}),
        400,
        "NUL byte",
    ),
    (
        "job-no-user-sink",
        ("POST", "/v1/apis/crunch/jobs", {"items": [1], "batch_size": 1, "sink": f"file://{NO_USER}/out"}),
        400,
        "is not the home directory of a known user",
    ),
    # logs: a replica id or API name that would leave the logs directory
    ("logs-replica-path", ("GET", "/v1/apis/echo/logs?replica=../../../etc/x", None), 400, "replica must be"),
    ("logs-dot-dot", ("GET", "/v1/apis/%2E%2E/logs", None), 404, "no API named '..'"),
    ("key-list", ("POST", "/v1/keys", [1]), 400, "must be a JSON object"),
    ("key-rate", ("POST", "/v1/keys", {"rate": 0}), 400, "rate: Input should be greater than 0"),
]


@pytest.mark.parametrize(("request_", "status", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_4xx_that_says_what_was_wrong(admin: Admin, request_: Any, status: int, message: str) -> None:
    method, path, body = request_(admin) if callable(request_) else request_
    response = admin.http.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.text


def test_good_requests_still_work(admin: Admin) -> None:
    assert admin.http.post("/v1/apis/echo/rollback").status_code == 409  # no earlier revision
    forced = admin.http.post("/v1/apis", json={"deployments": [admin.deployment()], "force": True})
    assert forced.status_code == 200 and forced.json()["results"][0]["revision"] == 2, forced.text
    back = admin.http.post("/v1/apis/echo/rollback", json={"to": 1})
    assert back.status_code == 200 and back.json()["action"] == "updated", back.text
    key = admin.http.post("/v1/keys", json={"apis": ["echo"], "rate": 5, "name": "ci"})
    assert key.status_code == 201 and key.json()["record"]["apis"] == ["echo"], key.text
    assert admin.http.post("/v1/keys").status_code == 201  # an empty body: every default
    job = admin.http.post("/v1/apis/crunch/jobs", json={"items": [1, 2, 3], "batch_size": 2})
    assert job.status_code == 201 and job.json()["total_batches"] == 2, job.text


# A path segment: any text but a separator, and never `..`, so a generated path stays in the test's
# directory (a deploy packs its project directory; a job creates its sink).
SEGMENT = st.text(st.characters(exclude_characters="/"), max_size=12).filter(lambda s: s != "..")


@hypothesis.settings(
    max_examples=100,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    project=SEGMENT,
    predictor=st.one_of(st.just("predictor.py"), SEGMENT.map(lambda s: f"{s}.py")),
    model=st.one_of(SEGMENT, SEGMENT.map(lambda s: f"{NO_USER}{s}/m")),
    items=st.one_of(SEGMENT, SEGMENT.map(lambda s: f"file://{s}"), SEGMENT.map(lambda s: f"{NO_USER}{s}/x")),
    sink=st.one_of(SEGMENT.map(lambda s: f"sinks/{s}"), SEGMENT.map(lambda s: f"{NO_USER}{s}/out")),
)
def test_any_path_in_a_deploy_or_a_job_gets_an_answer(
    admin: Admin, project: str, predictor: str, model: str, items: str, sink: str
) -> None:
    """What the daemon fuzz rarely reaches (a generated spec seldom passes every validator): the
    paths a valid deploy or job names, as any text. The fix for each 5xx this found is above."""
    deployment = admin.deployment(
        spec={"predictor": {"path": predictor}, "models": [{"name": "m", "path": model}]},
        project_dir=f"{admin.project}{project}",
    )
    for method, path, body in [
        ("POST", "/v1/apis", {"deployments": [deployment]}),
        ("POST", "/v1/apis/crunch/jobs", {"items_url": f"{admin.tmp}/{items}", "batch_size": 1}),
        ("POST", "/v1/apis/crunch/jobs", {"items_url": items, "batch_size": 1}),
        ("POST", "/v1/apis/crunch/jobs", {"items": [1], "batch_size": 1, "sink": sink}),
    ]:
        response = admin.http.request(method, path, json=body)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert response.json()["error"], (body, response.text)
