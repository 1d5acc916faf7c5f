"""Iris classifier: a scikit-learn model behind a typed Cirrus API.

The pydantic annotations on `predict` give request validation (a 422 with details for a bad
payload) and an OpenAPI schema at `GET /iris/openapi.json`.
"""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

HERE = Path(__file__).resolve().parent


class IrisFeatures(BaseModel):
    sepal_length: float = Field(gt=0, description="cm", examples=[5.1])
    sepal_width: float = Field(gt=0, description="cm", examples=[3.5])
    petal_length: float = Field(gt=0, description="cm", examples=[1.4])
    petal_width: float = Field(gt=0, description="cm", examples=[0.2])


class IrisPrediction(BaseModel):
    label: str = Field(description="the most likely species")
    probabilities: dict[str, float] = Field(description="probability of each species")


class Predictor:
    def __init__(self, config: dict[str, Any]) -> None:
        import joblib

        path = Path(config.get("model_path", "model.joblib")).expanduser()
        if not path.is_absolute():
            path = HERE / path
        if not path.is_file():
            raise FileNotFoundError(
                f"iris model not found at {path}; train it first with: python examples/iris/train.py"
            )
        bundle = joblib.load(path)
        self.model = bundle["model"]
        self.labels: list[str] = list(bundle["labels"])

    def predict(self, payload: IrisFeatures) -> IrisPrediction:
        row = [[payload.sepal_length, payload.sepal_width, payload.petal_length, payload.petal_width]]
        probs = self.model.predict_proba(row)[0]
        probabilities = {
            self.labels[int(c)]: round(float(p), 6) for c, p in zip(self.model.classes_, probs, strict=True)
        }
        label = max(probabilities, key=probabilities.__getitem__)
        return IrisPrediction(label=label, probabilities=probabilities)
