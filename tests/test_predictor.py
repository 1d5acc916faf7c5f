"""Loading a predictor from its file, injecting arguments by name, and payload/result encoding."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from cirrus.predictor import (
    Call,
    HTTPError,
    LoadedPredictor,
    PayloadError,
    PredictorLoadError,
    Response,
    decode_payload,
    encode_result,
    load_predictor,
    openapi_document,
)

Loader = Callable[..., LoadedPredictor]


@pytest.fixture
def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Loader]:
    """Write `source` to a fresh file under tmp_path and load its class; undo sys.path/sys.modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    modules: list[str] = []

    def loader(source: str, class_name: str = "Predictor", config: dict[str, Any] | None = None) -> LoadedPredictor:
        stem = f"p_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{stem}.py").write_text(textwrap.dedent(source))
        modules.append(f"cirrus_user_{stem}")
        return load_predictor(str(tmp_path), f"{stem}.py", class_name, config or {})

    yield loader
    for name in modules:
        sys.modules.pop(name, None)


def call(payload: Any = None, **kw: Any) -> Call:
    return Call(
        payload=payload,
        query_params=kw.get("query_params", {}),
        headers=kw.get("headers", {}),
        request_id=kw.get("request_id", "rid-1"),
    )


# --- loading and injection ------------------------------------------------------------------------


def test_config_and_injection_by_name(load: Loader) -> None:
    loaded = load(
        """
        class Predictor:
            def __init__(self, config):
                self.scale = config["scale"]

            async def pre_predict(self, payload, headers):
                return payload

            def predict(self, payload, request_id, query_params):
                return {"y": payload["x"] * self.scale, "id": request_id, "q": query_params}

            async def post_predict(self, response):
                pass
        """,
        config={"scale": 3},
    )
    assert loaded.instance.scale == 3
    assert loaded.predict.wants == ("payload", "request_id", "query_params")
    assert not loaded.predict.is_async
    assert loaded.pre_predict is not None and loaded.pre_predict.wants == ("payload", "headers")
    assert loaded.post_predict is not None and loaded.post_predict.wants == ("response",)
    c = call({"x": 2}, query_params={"a": "1"})
    assert loaded.predict.fn(**loaded.predict.kwargs(c)) == {"y": 6, "id": "rid-1", "q": {"a": "1"}}
    assert loaded.post_predict.kwargs(c, response="R") == {"response": "R"}


def test_no_config_no_arguments_and_optional_hooks(load: Loader) -> None:
    loaded = load(
        """
        class Predictor:
            def predict(self):
                return 1
        """
    )
    assert loaded.predict.wants == ()
    assert loaded.pre_predict is None and loaded.post_predict is None
    assert loaded.predict.fn(**loaded.predict.kwargs(call())) == 1


def test_async_predict_and_kwargs(load: Loader) -> None:
    loaded = load(
        """
        class Predictor:
            async def predict(self, payload, **rest):
                return sorted(rest)
        """
    )
    assert loaded.predict.is_async
    assert loaded.predict.wants == ("payload", "query_params", "headers", "request_id")
    result = asyncio.run(loaded.predict.fn(**loaded.predict.kwargs(call(1))))
    assert result == ["headers", "query_params", "request_id"]


def test_arguments_with_defaults_are_left_alone(load: Loader) -> None:
    loaded = load(
        """
        class Predictor:
            def predict(self, payload, temperature=0.5):
                return temperature
        """
    )
    assert loaded.predict.wants == ("payload",)


def test_unknown_argument_is_a_clear_error(load: Loader) -> None:
    with pytest.raises(PredictorLoadError) as info:
        load(
            """
            class Predictor:
                def predict(self, payload, features):
                    return payload
            """
        )
    message = str(info.value)
    assert "Predictor.predict() asks for 'features', which Cirrus cannot inject" in message
    assert "payload, query_params, headers, request_id" in message


def test_response_is_injectable_only_after_predict(load: Loader) -> None:
    with pytest.raises(PredictorLoadError, match="asks for 'response'"):
        load(
            """
            class Predictor:
                def predict(self, response):
                    return 1
            """
        )


@pytest.mark.parametrize("hook", ["pre_predict", "post_predict"])
def test_sync_hooks_are_rejected(load: Loader, hook: str) -> None:
    with pytest.raises(PredictorLoadError, match=f"Predictor.{hook} must be `async def`"):
        load(
            f"""
            class Predictor:
                def {hook}(self, payload):
                    return payload

                def predict(self, payload):
                    return payload
            """
        )


def test_missing_predict_class_and_file(load: Loader, tmp_path: Path) -> None:
    with pytest.raises(PredictorLoadError, match="has no predict method"):
        load("class Predictor:\n    pass\n")
    with pytest.raises(PredictorLoadError, match="defines no class named 'Model'"):
        load("class Predictor:\n    def predict(self): ...\n", class_name="Model")
    with pytest.raises(PredictorLoadError, match="defines no class named 'Predictor'"):
        load("Predictor = 3\n")
    with pytest.raises(PredictorLoadError, match="is not a method"):
        load("class Predictor:\n    predict = 3\n")
    with pytest.raises(PredictorLoadError, match="does not exist"):
        load_predictor(str(tmp_path), "absent.py", "Predictor", {})


def test_errors_of_the_users_code_propagate(load: Loader) -> None:
    with pytest.raises(ZeroDivisionError):
        load("class Predictor:\n    def __init__(self):\n        1 / 0\n    def predict(self): ...\n")
    with pytest.raises(SyntaxError):
        load("class Predictor(:\n")


def test_sibling_modules_are_importable(load: Loader, tmp_path: Path) -> None:
    helper = f"helper_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{helper}.py").write_text("VALUE = 41\n")
    try:
        loaded = load(f"import {helper}\nclass Predictor:\n    def predict(self):\n        return {helper}.VALUE + 1\n")
        assert loaded.predict.fn() == 42
    finally:
        sys.modules.pop(helper, None)


# --- pydantic models and OpenAPI ------------------------------------------------------------------

TYPED = """
from __future__ import annotations

from pydantic import BaseModel, Field


class Features(BaseModel):
    text: str = Field(description="what to classify")
    top_k: int = 1


class Label(BaseModel):
    name: str
    score: float


class Prediction(BaseModel):
    labels: list[Label]


class Predictor:
    '''Classifies sentiment.'''

    def predict(self, payload: Features) -> Prediction:
        return Prediction(labels=[Label(name=payload.text, score=1.0)])
"""


def test_pydantic_annotations_are_found(load: Loader) -> None:
    loaded = load(TYPED)
    assert loaded.predict.payload_model.__name__ == "Features"
    assert loaded.predict.return_model.__name__ == "Prediction"


def test_openapi_document_with_models(load: Loader) -> None:
    doc = openapi_document("sentiment", load(TYPED))
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "sentiment"
    assert doc["info"]["description"] == "Classifies sentiment."
    post = doc["paths"]["/sentiment"]["post"]
    assert post["operationId"] == "predict_sentiment"
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Features"}
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Prediction"}
    assert "422" in post["responses"]
    schemas = doc["components"]["schemas"]
    assert set(schemas) == {"Features", "Label", "Prediction"}
    assert schemas["Features"]["required"] == ["text"]
    assert schemas["Features"]["properties"]["text"]["description"] == "what to classify"
    assert schemas["Prediction"]["properties"]["labels"]["items"] == {"$ref": "#/components/schemas/Label"}
    json.dumps(doc)  # serialisable as it is


def test_openapi_document_without_models(load: Loader) -> None:
    doc = openapi_document("my-api", load("class Predictor:\n    def predict(self, payload):\n        return 1\n"))
    post = doc["paths"]["/my-api"]["post"]
    assert post["operationId"] == "predict_my_api"
    assert post["requestBody"]["content"]["application/json"]["schema"] == {}
    assert "422" not in post["responses"]
    assert doc["components"]["schemas"] == {}
    assert doc["info"]["description"] == ""


# --- decode_payload -------------------------------------------------------------------------------


def test_decode_json() -> None:
    assert decode_payload(b'{"a": [1, 2.5, null]}', "application/json") == {"a": [1, 2.5, None]}
    assert decode_payload(b"[1]", "Application/JSON; charset=utf-8") == [1]
    assert decode_payload(b'"x"', "application/problem+json") == "x"
    assert decode_payload(b"", "application/json") is None


def test_decode_text() -> None:
    assert decode_payload("héllo".encode(), "text/plain; charset=utf-8") == "héllo"
    assert decode_payload(b"a,b\n", "text/csv") == "a,b\n"


def test_decode_bytes() -> None:
    assert decode_payload(b"\x00\x01", "application/octet-stream") == b"\x00\x01"
    assert decode_payload(b"\x89PNG", "image/png") == b"\x89PNG"
    assert decode_payload(b"{}", "") == b"{}"


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"{not json", "application/json", "malformed JSON body"),
        (b'{"a": 1} trailing', "application/json", "malformed JSON body"),
        (b"\xff\xfe", "text/plain", "text body is not valid UTF-8"),
    ],
)
def test_decode_malformed(body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        decode_payload(body, content_type)


# --- encode_result --------------------------------------------------------------------------------


class Out(BaseModel):
    label: str
    score: float


def test_encode_plain_values() -> None:
    assert encode_result({"a": 1}) == (200, "application/json", b'{"a":1}', [])
    assert encode_result([1, "x", None]) == (200, "application/json", b'[1,"x",null]', [])
    assert encode_result(None) == (200, "application/json", b"null", [])
    assert encode_result("héllo") == (200, "text/plain; charset=utf-8", "héllo".encode(), [])
    assert encode_result(b"\x00") == (200, "application/octet-stream", b"\x00", [])
    assert encode_result(bytearray(b"ab"))[2] == b"ab"
    assert encode_result(memoryview(b"cd"))[2] == b"cd"


def test_encode_pydantic_model() -> None:
    status, content_type, body, _ = encode_result(Out(label="pos", score=0.5))
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"label": "pos", "score": 0.5}
    assert json.loads(encode_result({"items": [Out(label="a", score=1)]})[2]) == {
        "items": [{"label": "a", "score": 1.0}]
    }


def test_encode_numpy() -> None:
    assert json.loads(encode_result(np.arange(6).reshape(2, 3))[2]) == [[0, 1, 2], [3, 4, 5]]
    assert json.loads(encode_result({"v": np.array([0.5], dtype=np.float32)})[2]) == {"v": [0.5]}
    assert json.loads(encode_result({"n": np.int64(7), "f": np.float64(0.25)})[2]) == {"n": 7, "f": 0.25}


def test_encode_unserialisable_value_names_its_type() -> None:
    with pytest.raises(TypeError, match="cannot serialise a object as JSON"):
        encode_result({"x": object()})


def test_encode_response() -> None:
    assert encode_result(Response({"a": 1}, status=201, headers={"X-Trace": "t"})) == (
        201,
        "application/json",
        b'{"a":1}',
        [("X-Trace", "t")],
    )
    assert encode_result(Response("hi", headers={"Content-Type": "text/html"})) == (200, "text/html", b"hi", [])
    assert encode_result(Response(b"\x01", media_type="image/png")) == (200, "image/png", b"\x01", [])
    assert encode_result(Response(Out(label="x", score=1), status=202))[:3] == (
        202,
        "application/json",
        b'{"label":"x","score":1.0}',
    )
    assert encode_result(Response()) == (200, "application/octet-stream", b"", [])


def test_response_and_http_error() -> None:
    with pytest.raises(ValueError, match="not an HTTP status code"):
        Response(status=99)
    error = HTTPError(400, "bad input")
    assert (error.status, error.message, str(error)) == (400, "bad input", "bad input")
