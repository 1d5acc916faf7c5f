"""A toy batch predictor: word statistics of short texts, a batch at a time.

No model to download: `predict_batch` stands in for a model that likes batches (an embedding or
a classifier). `on_job_complete` runs once, after the last batch, with the job's summary.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

log = logging.getLogger("wordstats")


class Predictor:
    def __init__(self, config: dict[str, Any]) -> None:
        self.lowercase = bool(config.get("lowercase", True))

    def predict_batch(self, payloads: list[Any]) -> list[dict[str, Any]]:
        """One result per item, in order. Each item is {"id": ..., "text": ...} or a plain string."""
        results = []
        for item in payloads:
            text = item["text"] if isinstance(item, dict) else str(item)
            words = (text.lower() if self.lowercase else text).split()
            top = Counter(words).most_common(1)
            results.append({"words": len(words), "chars": len(text), "top_word": top[0][0] if top else None})
        return results

    def on_job_complete(self, job: dict[str, Any]) -> None:
        """Write a summary beside the results (when they go to a local directory)."""
        log.warning("job %s ended %s: %d items done", job["id"], job["status"], job["items_done"])
        if "://" not in job["sink"]:
            Path(job["sink"], "summary.json").write_text(json.dumps(job, indent=2) + "\n")
