"""The spec's sections for what runs besides a predictor: `python:`, `kind: server`, `kind: task`."""

from __future__ import annotations

from typing import Any

import pytest

from cirrus.spec import SpecError, parse_specs

PREDICTOR = {"path": "p.py"}


def spec(**fields: Any) -> Any:
    return parse_specs({"name": "x", **fields}, "cirrus.yaml")[0]


def refused(**fields: Any) -> str:
    with pytest.raises(SpecError) as info:
        spec(**fields)
    return str(info.value)


def test_a_server_api_runs_an_app_or_a_command_and_no_predictor() -> None:
    app = spec(kind="server", server={"app": "main:app", "readiness": {"path": "/healthz"}})
    assert (app.server.app, app.server.readiness.path, app.predictor) == ("main:app", "/healthz", None)
    command = spec(kind="server", server={"command": ["python", "serve.py"]})
    assert command.server.command == ["python", "serve.py"]
    assert "exactly one of `app`" in refused(kind="server", server={"app": "a:b", "command": ["x"]})
    assert "exactly one of `app`" in refused(kind="server", server={})
    assert "is not `module:attribute`" in refused(kind="server", server={"app": "main"})
    assert "a server API needs `server`" in refused(kind="server")
    assert "remove predictor" in refused(kind="server", server={"app": "a:b"}, predictor=PREDICTOR)
    assert "`server` belongs to a web app API" in refused(predictor=PREDICTOR, server={"app": "a:b"})
    assert "readiness.path" in refused(kind="server", server={"app": "a:b", "readiness": {"path": "healthz"}})


def test_a_task_api_runs_a_predictor_or_a_command() -> None:
    run = spec(kind="task", predictor=PREDICTOR, task={"timeout_s": 60, "retries": 2})
    assert (run.task.timeout_s, run.task.retries) == (60, 2)
    assert spec(kind="task", task={"command": ["python", "train.py"]}).predictor is None
    assert spec(kind="task", predictor=PREDICTOR).task is None
    assert "needs a `predictor` with run(config)" in refused(kind="task")
    assert "remove batching" in refused(kind="task", predictor=PREDICTOR, batching={"max_batch_size": 4})
    assert "`task` belongs to a task API" in refused(predictor=PREDICTOR, task={"retries": 1})
    assert "task.retries" in refused(kind="task", predictor=PREDICTOR, task={"retries": -1})


def test_python_names_packages_or_a_requirements_file() -> None:
    env = spec(predictor=PREDICTOR, python={"packages": ["six==1.16.0"], "version": "3.11"})
    assert (env.python.packages, env.python.version) == (["six==1.16.0"], "3.11")
    assert spec(predictor=PREDICTOR, python={"requirements": "requirements.txt"}).python.requirements
    assert "give `requirements`" in refused(predictor=PREDICTOR, python={})
    assert "is not a requirement" in refused(predictor=PREDICTOR, python={"packages": ["--index-url=http://x"]})
    assert "python.version" in refused(predictor=PREDICTOR, python={"packages": ["six"], "version": "2.7"})
    assert "remove python" in refused(
        kind="splitter", apis=[{"name": "a", "weight": 100}], python={"packages": ["six"]}
    )
