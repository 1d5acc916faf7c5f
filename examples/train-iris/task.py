"""Train the iris classifier of examples/iris and write it where the run's config says.

    cirrus deploy examples/train-iris
    cirrus tasks submit train-iris --config '{"output": "/tmp/iris/model.joblib"}' --wait
    cirrus tasks submit train-iris --config '{"output": "s3://my-bucket/iris/model.joblib"}'

The model is the joblib bundle examples/iris/predictor.py loads ({"model", "labels"}), so the
realtime example serves it with `config.model_path` pointing at the file. `output` is a local path
or any fsspec URL (s3:// needs the s3 extra: pip install 'cirrus-serve[s3]'; an S3-compatible
server is reached through $CIRRUS_S3_ENDPOINT_URL). Uses scikit-learn's bundled data: no downloads.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any


class TrainIris:
    def run(self, config: dict[str, Any]) -> dict[str, Any]:
        output = config.get("output")
        if not isinstance(output, str) or not output:
            raise ValueError(
                'give the model\'s destination: --config \'{"output": "/path/or/s3://bucket/model.joblib"}\''
            )
        c = float(config.get("c", 1.0))
        model, labels, accuracy = train(c=c, test_size=float(config.get("test_size", 0.25)))
        import joblib

        buffer = io.BytesIO()
        joblib.dump({"model": model, "labels": labels}, buffer)  # the bundle examples/iris loads
        write(output, buffer.getvalue())
        print(f"test accuracy {accuracy:.3f}; wrote {len(buffer.getvalue())} bytes to {output}", flush=True)
        return {"accuracy": accuracy, "output": output}


def train(c: float, test_size: float) -> tuple[Any, list[str], float]:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    iris = load_iris()
    x_train, x_test, y_train, y_test = train_test_split(
        iris.data, iris.target, test_size=test_size, random_state=0, stratify=iris.target
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
    model.fit(x_train, y_train)
    return model, [str(name) for name in iris.target_names], float(model.score(x_test, y_test))


def write(output: str, data: bytes) -> None:
    """Write `data` to a local path (atomically) or an fsspec URL."""
    if "://" not in output or output.startswith("file://"):
        path = Path(output.removeprefix("file://")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        return
    import fsspec

    options: dict[str, Any] = {}
    endpoint = os.environ.get("CIRRUS_S3_ENDPOINT_URL")
    if output.startswith("s3://") and endpoint:
        options["endpoint_url"] = endpoint
    with fsspec.open(output, "wb", **options) as handle:
        handle.write(data)
