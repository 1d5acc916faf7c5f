"""Models through the real daemon: `models:` in the spec, local paths handed to the predictor as
`model_path` / `models`, and clear errors for a missing model or an ambiguous `model_path`."""

from __future__ import annotations

import io
from pathlib import Path

from conftest import Cirrus, write_project

from cirrus.types import ApiStatusName

ONE_MODEL = """
class Predictor:
    def __init__(self, config, model_path):
        with open(model_path) as f:
            self.weights = f.read().strip()

    def predict(self, payload):
        return {"weights": self.weights}
"""

TWO_MODELS = """
import os


class Predictor:
    def __init__(self, models):
        self.models = {name: sorted(os.listdir(path)) if os.path.isdir(path) else open(path).read().strip()
                       for name, path in models.items()}

    def predict(self, payload):
        return self.models
"""

AMBIGUOUS = """
class Predictor:
    def __init__(self, model_path):
        self.path = model_path

    def predict(self, payload):
        return self.path
"""


def test_local_models_reach_the_predictor(daemon: Cirrus, tmp_path: Path) -> None:
    one = write_project(tmp_path / "one", ONE_MODEL, name="one", models=[{"name": "w", "path": "weights.txt"}])
    (one / "weights.txt").write_text("v1-weights\n")
    two = write_project(
        tmp_path / "two",
        TWO_MODELS,
        name="two",
        models=[{"name": "tokenizer", "path": "tok"}, {"name": "encoder", "path": str(tmp_path / "enc.bin")}],
    )
    (two / "tok").mkdir()
    (two / "tok" / "vocab.txt").write_text("a b c")
    (tmp_path / "enc.bin").write_text("encoder-weights")
    client = daemon.client()
    client.deploy(one)
    client.deploy(two)
    assert client.predict("one", {}).json() == {"weights": "v1-weights"}
    assert client.predict("two", {}).json() == {"tokenizer": ["vocab.txt"], "encoder": "encoder-weights"}
    status = client.get("two")
    assert [(m.name, m.state) for m in status.models] == [("tokenizer", "ready"), ("encoder", "ready")]
    code, out, _ = daemon.cli("get", "two")
    assert code == 0 and "model tokenizer" in out and "ready" in out


def test_model_errors_are_clear(daemon: Cirrus, tmp_path: Path) -> None:
    missing = write_project(tmp_path / "missing", ONE_MODEL, name="missing", models=[{"name": "w", "path": "nope.bin"}])
    code, _, err = daemon.cli("deploy", str(missing))
    assert code == 1
    assert "API 'missing': models.0.path:" in err and "nope.bin does not exist" in err
    assert daemon.client().get() == []  # nothing deployed

    ambiguous = write_project(
        tmp_path / "ambiguous",
        AMBIGUOUS,
        name="ambiguous",
        models=[{"name": "a", "path": "a.txt"}, {"name": "b", "path": "b.txt"}],
    )
    (ambiguous / "a.txt").write_text("a")
    (ambiguous / "b.txt").write_text("b")
    code, _, err = daemon.cli("deploy", str(ambiguous), "--timeout", "30")
    assert code == 1
    status = daemon.client().get("ambiguous")
    assert status.status is ApiStatusName.ERROR
    assert status.message is not None and "asks for model_path, but the API has 2 models" in status.message


S3_MODEL = """
import os


class Predictor:
    def __init__(self, model_path):
        self.path = model_path
        self.files = {name: open(os.path.join(model_path, name)).read() for name in sorted(os.listdir(model_path))}

    def predict(self, payload):
        return {"path": self.path, "files": self.files}
"""


def test_s3_models_are_fetched_once_into_the_cache(tmp_path: Path) -> None:
    from s3_server import s3_server

    with s3_server(tmp_path / "moto") as s3:
        fs = s3.filesystem()
        fs.mkdir("models")
        fs.pipe({"models/minilm/v1/config.json": b'{"dim": 384}', "models/minilm/v1/weights.bin": b"w" * 3_000_000})
        cirrus = Cirrus(tmp_path / "home", CIRRUS_S3_ENDPOINT_URL=s3.endpoint_url)
        try:
            cirrus.up()
            client = cirrus.client()
            project = write_project(
                tmp_path / "project",
                S3_MODEL,
                name="remote",
                models=[{"name": "minilm", "path": "s3://models/minilm/v1/"}],
            )
            code, _, err = cirrus.cli("deploy", str(project), "--timeout", "60")
            assert code == 0, err
            # a progress bar per fetched model on a terminal; piped, a plain line per step, no bar or spinner
            assert "model minilm (remote) 100% of 3.0 MB ready" in err.splitlines(), err
            assert "\x1b" not in err and "━" not in err, err
            answer = client.predict("remote", {}).json()
            assert answer["files"] == {"config.json": '{"dim": 384}', "weights.bin": "w" * 3_000_000}
            cache = cirrus.settings.models_dir
            assert Path(answer["path"]).is_relative_to(cache)  # the replica reads the cached copy
            [model] = client.get("remote").models
            assert (model.state, model.total_bytes) == ("ready", 3_000_012)

            broken = write_project(
                tmp_path / "broken", S3_MODEL, name="broken", models=[{"name": "gone", "path": "s3://models/nothing/"}]
            )
            code, _, err = cirrus.cli("deploy", str(broken), "--timeout", "30")
            assert code == 1 and "could not be fetched" in err
            status = client.get("broken")
            assert status.status is ApiStatusName.ERROR
            assert status.message is not None and "model 'gone' could not be fetched" in status.message
            assert [m.state for m in status.models] == ["failed"]
        finally:
            assert cirrus.shutdown() == {}


def test_the_deploy_view_shows_a_bar_per_fetched_model() -> None:
    from rich.console import Console
    from rich.spinner import Spinner

    from cirrus.cli_views import waiting_view
    from cirrus.types import ApiStatus, ModelStatus

    def render(*models: ModelStatus) -> str:
        console = Console(width=120, no_color=True, record=True, file=io.StringIO())
        console.print(
            waiting_view(Spinner("dots", "waiting"), [ApiStatus.model_construct(name="api", models=list(models))])
        )
        return console.export_text()

    local = ModelStatus(name="tok", source="/models/tok", state="ready")
    assert render(local).strip().endswith("waiting")  # nothing fetched: the spinner alone
    half = ModelStatus(name="big", source="s3://b/big/", state="fetching", done_bytes=1_000_000, total_bytes=2_000_000)
    text = render(local, half)
    assert "model big (api)" in text and "50%" in text and "1.0 MB/2.0 MB" in text and "fetching" in text
    assert "tok" not in text
    done = half.model_copy(update={"state": "ready", "done_bytes": 2_000_000})
    assert "100%" in render(done) and "ready" in render(done)


RELOADED_MODEL = """
import os


class Predictor:
    def __init__(self, model_path):
        with open(os.path.join(model_path, "weights.txt")) as f:
            self.weights = f.read()

    def predict(self, payload):
        return {"weights": self.weights}
"""


def test_a_new_model_version_in_the_store_is_picked_up_without_dropping_a_request(tmp_path: Path) -> None:
    import threading
    import time

    from s3_server import s3_server

    with s3_server(tmp_path / "moto") as s3:
        fs = s3.filesystem()
        fs.mkdir("live")
        fs.pipe({"live/model/weights.txt": b"v1"})
        cirrus = Cirrus(tmp_path / "home", CIRRUS_S3_ENDPOINT_URL=s3.endpoint_url)
        try:
            cirrus.up()
            client = cirrus.client()
            project = write_project(
                tmp_path / "project",
                RELOADED_MODEL,
                name="live",
                models=[{"name": "weights", "path": "s3://live/model/", "reload_s": 1}],
            )
            client.deploy(project)
            assert client.predict("live", {}).json() == {"weights": "v1"}

            answers: list[tuple[int, str]] = []
            stop = threading.Event()

            def load() -> None:
                requests = cirrus.client()
                while not stop.is_set():
                    response = requests.predict("live", {}, timeout=30)
                    answers.append((response.status_code, response.text))

            loader = threading.Thread(target=load)
            loader.start()
            try:
                time.sleep(0.5)
                fs.pipe({"live/model/weights.txt": b"v2-new"})
                deadline = time.monotonic() + 60
                while not (answers and '"v2-new"' in answers[-1][1]):
                    assert time.monotonic() < deadline, f"never reloaded: {answers[-1:]}"
                    time.sleep(0.1)
                time.sleep(0.5)  # requests go on after the swap
            finally:
                stop.set()
                loader.join(60)
            assert not loader.is_alive()
            failed = [answer for answer in answers if answer[0] != 200]
            assert failed == [] and len(answers) > 10
            assert {text for _, text in answers} <= {'{"weights":"v1"}', '{"weights":"v2-new"}'}
            status = client.get("live")
            assert status.revision == 2 and [m.state for m in status.models] == ["ready"]
        finally:
            assert cirrus.shutdown() == {}
