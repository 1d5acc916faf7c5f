"""Async pre/post hooks around a quick predict: I/O does not hold the inference slot.

Request:  {"user_id": 42, "amount": 120.0}
Response: {"user_id": 42, "score": 0.6106, "approved": true, "features": {...}}

- `pre_predict` (async) simulates fetching the user's features from a feature store (50 ms of I/O)
  and returns the enriched payload, which replaces the payload passed to `predict`.
- `predict` (sync) is the model: fast, pure compute. Only this step holds an inference slot.
- `post_predict` (async) runs after the reply is sent; it records the response in memory and
  appends it to a JSONL file (config `log_path`).
"""

import asyncio
import hashlib
import json
import math
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

DEFAULT_LOG = Path(tempfile.gettempdir()) / "cirrus-hooks-example" / "predictions.jsonl"


class Predictor:
    def __init__(self, config: dict[str, Any]) -> None:
        self.fetch_delay_s = float(config.get("fetch_delay_s", 0.05))
        self.log_path = Path(config.get("log_path") or DEFAULT_LOG).expanduser()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.records: deque[dict[str, Any]] = deque(maxlen=int(config.get("keep_records", 10_000)))
        self._write_lock = threading.Lock()

    async def pre_predict(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Simulated feature-store lookup: 50 ms of waiting that holds no slot."""
        await asyncio.sleep(self.fetch_delay_s)
        user_id = payload.get("user_id", 0)
        digest = hashlib.sha256(str(user_id).encode()).digest()
        features = {
            "account_age_days": digest[0] * 4,
            "past_orders": digest[1] % 50,
            "chargebacks": digest[2] % 3,
        }
        return {**payload, "features": features}

    def predict(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The "model": a tiny logistic score. Quick, so the slot turns over fast."""
        f = payload["features"]
        amount = float(payload.get("amount", 0.0))
        z = 0.8 + 0.004 * f["account_age_days"] + 0.05 * f["past_orders"] - 1.5 * f["chargebacks"] - 0.002 * amount
        score = round(1.0 / (1.0 + math.exp(-z)), 4)
        return {
            "user_id": payload.get("user_id"),
            "score": score,
            "approved": score >= 0.5,
            "features": f,
        }

    async def post_predict(self, response: Any, payload: dict[str, Any]) -> None:
        """Record the response after the client has it (audit log, monitoring, ...)."""
        record = {"ts": time.time(), "request": payload, "response": response}
        self.records.append(record)
        await asyncio.to_thread(self._append, json.dumps(record, default=str) + "\n")

    def _append(self, line: str) -> None:
        with self._write_lock, self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(line)
