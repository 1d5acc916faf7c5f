"""examples/train-iris end to end: its task trains the iris model and writes it to a path (then the
realtime iris example serves it and answers) or to an s3:// URL (a real S3 API, moto's server)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import Cirrus

from cirrus.tasks import TaskStatus

pytest.importorskip("sklearn")
pytest.importorskip("joblib")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SETOSA = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
VIRGINICA = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}


def test_the_trained_model_is_served_by_the_iris_example(daemon: Cirrus, tmp_path: Path) -> None:
    client = daemon.client()
    client.deploy(EXAMPLES / "train-iris", wait=True, timeout=60)
    model = tmp_path / "models" / "iris.joblib"
    code, stdout, stderr = daemon.cli(
        "tasks", "submit", "train-iris", "--config", json.dumps({"output": str(model)}), "--wait"
    )
    assert code == 0, stdout + stderr
    run = client.tasks("train-iris")[0]
    assert run.status is TaskStatus.SUCCEEDED and model.is_file()
    assert "test accuracy 0.9" in client.task_logs(run.id)
    # The realtime example, pointed at the model the task wrote.
    iris = tmp_path / "iris"
    shutil.copytree(EXAMPLES / "iris", iris, ignore=shutil.ignore_patterns("*.joblib", "__pycache__"))
    spec = yaml.safe_load((iris / "cirrus.yaml").read_text())
    spec[0]["predictor"]["config"]["model_path"] = str(model)
    spec[0]["autoscaling"] = {"min_replicas": 1, "max_replicas": 1}
    (iris / "cirrus.yaml").write_text(yaml.safe_dump(spec))
    client.deploy(iris, wait=True, timeout=120)
    assert client.predict("iris", SETOSA).json()["label"] == "setosa"
    assert client.predict("iris", VIRGINICA).json()["label"] == "virginica"
    # Without an output, the run fails saying what to give.
    failed = client.wait_task(client.submit_task("train-iris", retries=0).id, timeout=60)
    assert failed.status is TaskStatus.FAILED and "give the model's destination" in (failed.reason or "")


def test_the_task_writes_the_model_to_an_s3_url(tmp_path: Path) -> None:
    from s3_server import s3_server

    with s3_server(tmp_path / "moto") as s3:
        fs = s3.filesystem()
        fs.mkdir("trained")
        cirrus = Cirrus(tmp_path / "home", CIRRUS_S3_ENDPOINT_URL=s3.endpoint_url)
        try:
            cirrus.up()
            client = cirrus.client()
            client.deploy(EXAMPLES / "train-iris", wait=True, timeout=60)
            run = client.submit_task("train-iris", {"output": "s3://trained/iris/model.joblib", "c": 0.5})
            ended = client.wait_task(run.id, timeout=120)
            assert ended.status is TaskStatus.SUCCEEDED, (ended, client.task_logs(run.id))
        finally:
            leftovers = cirrus.shutdown()
        assert not leftovers
        import joblib

        bundle = joblib.load(io.BytesIO(fs.cat("trained/iris/model.joblib")))
        assert bundle["labels"] == ["setosa", "versicolor", "virginica"]
        row = [list(VIRGINICA.values())]
        assert bundle["labels"][int(bundle["model"].predict(row)[0])] == "virginica"
