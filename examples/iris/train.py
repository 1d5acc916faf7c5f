"""Train a small iris classifier and save it with joblib.

    python examples/iris/train.py                  # writes examples/iris/model.joblib
    python examples/iris/train.py --output /tmp/m.joblib
    CIRRUS_IRIS_MODEL=/tmp/m.joblib python examples/iris/train.py

Uses scikit-learn's bundled iris data set: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "model.joblib"


def train(output: Path) -> float:
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    iris = load_iris()
    x_train, x_test, y_train, y_test = train_test_split(
        iris.data, iris.target, test_size=0.25, random_state=0, stratify=iris.target
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(x_train, y_train)
    accuracy = float(model.score(x_test, y_test))
    output.parent.mkdir(parents=True, exist_ok=True)
    # Keep the class names with the model so the predictor needs nothing else.
    joblib.dump({"model": model, "labels": [str(name) for name in iris.target_names]}, output)
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(os.environ.get("CIRRUS_IRIS_MODEL", DEFAULT_OUTPUT)),
        help=f"where to write the model (default: $CIRRUS_IRIS_MODEL or {DEFAULT_OUTPUT})",
    )
    args = parser.parse_args()
    accuracy = train(args.output)
    print(f"test accuracy {accuracy:.3f}; saved {args.output}")


if __name__ == "__main__":
    main()
