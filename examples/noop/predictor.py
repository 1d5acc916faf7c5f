"""The smallest predictor: echoes `x`. Used to measure the platform's own overhead."""

from typing import Any


class Predictor:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def predict(self, payload: Any) -> dict[str, Any]:
        return {"y": payload["x"]}
