"""Holds each request for 50 ms on the slot's thread: a stand-in for a model with a fixed cost."""

import time
from typing import Any


class Predictor:
    def __init__(self, config: dict[str, Any]) -> None:
        self.delay_s = float(config.get("delay_s", 0.05))

    def predict(self, payload: Any) -> dict[str, Any]:
        time.sleep(self.delay_s)
        return {"y": payload["x"]}
