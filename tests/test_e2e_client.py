"""The Python client end to end: deploy, get, predict, logs, delete against a real daemon."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ECHO_PREDICTOR, Cirrus, pid_alive, replica_pids, wait_gone, write_project

from cirrus import CirrusError, Client
from cirrus.types import ApiStatusName, ReplicaState


def test_deploy_get_predict_logs_delete(daemon: Cirrus, tmp_path: Path) -> None:
    project = write_project(
        tmp_path / "project", ECHO_PREDICTOR, name="echo", predictor={"config": {"greeting": "hey"}}
    )
    client = Client(daemon.settings)
    try:
        [result] = client.deploy(project)
        assert (result.name, result.action, result.revision) == ("echo", "created", 1)
        assert result.endpoint == f"{daemon.gateway_url}/echo"

        [listed] = client.get()
        assert (listed.name, listed.status, listed.replicas_ready, listed.replicas_desired) == (
            "echo",
            ApiStatusName.LIVE,
            1,
            1,
        )
        status = client.get("echo")
        [replica] = status.replicas
        assert replica.state is ReplicaState.READY and replica.pid is not None and pid_alive(replica.pid)

        response = client.predict("echo", {"q": "what"})
        assert response.status_code == 200
        assert response.json() == {"greeting": "hey", "echo": {"q": "what"}}
        assert response.headers["x-request-id"]
        assert client.predict("echo", "plain text").json()["echo"] == "plain text"

        # Deploying the same thing again changes nothing.
        [again] = client.deploy(project)
        assert (again.action, again.revision) == ("unchanged", 1)
        assert replica_pids(client.get("echo")) == {replica.pid}

        logs = client.logs("echo")
        assert f"[{replica.id}] echo-print got {{'q': 'what'}}" in logs
        assert "echo-log answering {'q': 'what'}" in logs
        assert len(client.logs("echo", lines=2).splitlines()) == 2
        assert client.get("echo").requests_last_minute == 2

        client.delete("echo")
        with pytest.raises(CirrusError, match="no API named 'echo'") as excinfo:
            client.get("echo")
        assert excinfo.value.status == 404
        assert client.get() == []
        assert not wait_gone({replica.pid}), "the deleted API's replica still runs"
        assert client.predict("echo", {}).status_code == 404
        with pytest.raises(CirrusError) as excinfo:
            client.delete("echo")
        assert excinfo.value.status == 404
    finally:
        client.close()


def test_deploy_starts_the_daemon_and_down_stops_everything(cirrus: Cirrus, tmp_path: Path) -> None:
    project = write_project(tmp_path / "project", ECHO_PREDICTOR, name="first")
    with Client(cirrus.settings) as client:
        assert client.ping() is None
        client.deploy(project)  # no daemon yet: deploy starts one
        info = client.ping()
        assert info is not None
        pids = replica_pids(client.get("first"))
        assert len(pids) == 1 and pids <= set(cirrus.processes())
        assert client.predict("first", [1]).json()["echo"] == [1]

        assert client.down() is True
        assert not wait_gone(pids | {info.pid}), "processes outlived `down`"
        assert client.ping() is None
        assert client.down() is False
        with pytest.raises(CirrusError, match="not running"):
            client.get()
