"""The OpenAI-compatible protocol as data (cirrus/protocols/openai.py): request validation and its
error bodies, the predictor's reply shapes, response bodies, base64 vectors and SSE chunks."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import textwrap
from typing import Any

import pytest

from cirrus.predictor import HTTPError, PredictorLoadError, encode_json
from cirrus.protocols.openai import (
    DONE,
    BadReply,
    OpenAIError,
    StreamShaper,
    as_openai_error,
    chat_response,
    embeddings_of,
    embeddings_response,
    encode_vector,
    joined,
    parse_request,
    reply_of,
)


def rejected(operation: str, body: Any) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        parse_request(operation, body)
    assert caught.value.status == 400
    return caught.value


def test_a_chat_request_is_validated_and_its_params_are_what_was_given() -> None:
    request = parse_request(
        "chat",
        {
            "model": "bot",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            ],
            "temperature": 0.2,
            "stop": ["\n"],
            "stream": True,
            "stream_options": {"include_usage": True},
            "logit_bias": {"50256": -100},  # unknown to Cirrus: passed through
        },
    )
    assert request.message_dicts() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
    ]
    assert request.params() == {"temperature": 0.2, "stop": ["\n"], "logit_bias": {"50256": -100}}
    assert request.stream and request.include_usage


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "bot"}, "messages", "Field required"),
        ({"model": "bot", "messages": []}, "messages", "at least 1"),
        ({"model": "bot", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "user"),
        ({"model": "bot", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "n=1"),
        ({"model": "bot", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature", ""),
        (
            {"model": "bot", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
            "only text content parts",
        ),
    ],
)
def test_invalid_chat_requests_name_the_field(body: dict[str, Any], param: str, words: str) -> None:
    error = rejected("chat", body)
    assert error.param == param and error.message.startswith(f"{param}: ") and words in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_completion_prompts_and_embedding_inputs() -> None:
    assert parse_request("completions", {"model": "m", "prompt": ["once"]}).prompt == "once"
    assert "one prompt per request" in rejected("completions", {"model": "m", "prompt": ["a", "b"]}).message
    assert "token-id" in rejected("completions", {"model": "m", "prompt": [1, 2]}).message
    assert parse_request("embeddings", {"model": "m", "input": "one"}).input == ["one"]
    assert parse_request("embeddings", {"model": "m", "input": ["a", "b"]}).input == ["a", "b"]
    assert "token-id" in rejected("embeddings", {"model": "m", "input": [[1, 2]]}).message
    assert rejected("embeddings", {"model": "m", "input": "x", "dimensions": 8}).param == "dimensions"
    assert rejected("embeddings", {"model": "m", "input": "x", "encoding_format": "hex"}).param == "encoding_format"
    assert "JSON object" in rejected("embeddings", ["not", "an", "object"]).message


def test_replies_in_every_shape() -> None:
    assert reply_of("hi", "chat").content == "hi"
    reply = reply_of(
        {"content": "hi", "finish_reason": "length", "usage": {"prompt_tokens": 2, "completion_tokens": 1}}, "chat"
    )
    assert (reply.finish_reason, reply.usage) == (
        "length",
        {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    )
    pieces = joined(
        ["a", "b", {"finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}], "chat"
    )
    assert pieces.content == "ab" and pieces.usage is not None and pieces.usage["total_tokens"] == 3
    with pytest.raises(BadReply, match="returned a list"):
        reply_of(["no"], "chat")
    with pytest.raises(BadReply, match="finish_reason"):
        reply_of({"content": "x", "finish_reason": "tired"}, "chat")
    with pytest.raises(BadReply, match="yielded a int"):
        joined(["a", 3], "complete")


def test_embeddings_answers_and_base64_vectors() -> None:
    vectors, tokens = embeddings_of({"data": [[1.0, 2.0], [3.0, 4.0]], "tokens": [1, 2]}, 2)
    assert tokens == [1, 2]
    body = embeddings_response("m", vectors, tokens, "float")
    assert body["data"][1] == {"object": "embedding", "index": 1, "embedding": [3.0, 4.0]}
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert embeddings_response("m", vectors, None, "float")["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    packed = encode_vector([1.0, -2.5], "base64")
    assert struct.unpack("<2f", base64.b64decode(packed)) == (1.0, -2.5)  # little-endian float32
    numpy = pytest.importorskip("numpy")
    assert encode_vector(numpy.array([1.0, -2.5]), "base64") == packed
    assert encode_vector(numpy.array([1.5]), "float") == [1.5]
    with pytest.raises(BadReply, match="1 vectors for 2 texts"):
        embeddings_of([[1.0]], 2)
    with pytest.raises(BadReply, match="tokens"):
        embeddings_of({"data": [[1.0]], "tokens": [1, 2]}, 1)


def events(texts: list[str]) -> list[Any]:
    """The JSON of each SSE event ([DONE] as is)."""
    out = []
    for text in texts:
        assert text.startswith("data: ") and text.endswith("\n\n") and text.count("\n") == 2
        data = text[len("data: ") : -2]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_a_chat_stream_as_server_sent_events() -> None:
    shaper = StreamShaper("chat", "bot", include_usage=True, encode=encode_json)
    texts = [shaper.start() or ""]
    texts += [e for e in (shaper.item("hel", "chat"), shaper.item("", "chat"), shaper.item("lo", "chat")) if e]
    assert (
        shaper.item({"finish_reason": "length", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}, "chat") is None
    )
    texts += shaper.end()
    chunks = events(texts)
    assert chunks[-1] == "[DONE]" and texts[-1] == DONE
    assert {c["id"] for c in chunks[:-1]} == {shaper.id} and shaper.id.startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["hel", "lo"]  # no empty piece
    assert chunks[3]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["total_tokens"] == 3


def test_a_completion_stream_and_an_error_event() -> None:
    shaper = StreamShaper("completions", "m", include_usage=False, encode=encode_json)
    assert shaper.start() is None
    chunks = events([shaper.item("once", "complete") or "", *shaper.end()])
    assert chunks[0]["object"] == "text_completion" and chunks[0]["choices"][0]["text"] == "once"
    assert chunks[1]["choices"][0]["finish_reason"] == "stop" and chunks[2] == "[DONE]"
    (error,) = events(shaper.error(500, "the predictor failed"))
    assert error == {"error": {"message": "the predictor failed", "type": "server_error", "param": None, "code": None}}


def test_gateway_errors_are_rewritten_in_openai_shape() -> None:
    assert as_openai_error(503, {"error": "at capacity", "request_id": "r"})["error"] == {
        "message": "at capacity",
        "type": "server_error",
        "param": None,
        "code": "overloaded",
    }
    assert as_openai_error(401, {"error": "needs a key"})["error"]["type"] == "authentication_error"
    assert as_openai_error(429, {"error": "slow down"})["error"]["type"] == "rate_limit_error"
    shaped = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    assert as_openai_error(400, shaped) is shaped  # already OpenAI's: kept
    assert as_openai_error(502, None)["error"]["message"] == "HTTP 502"


def test_a_chat_response_body() -> None:
    body = chat_response("bot", reply_of("hi", "chat"))
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and "usage" not in body
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}


# --- loading a predictor for `protocol: openai` ----------------------------------------------------


def load(tmp_path: Any, source: str, **options: Any) -> Any:
    from cirrus.predictor import load_predictor

    project = tmp_path / f"project{len(list(tmp_path.iterdir()))}"  # a file of its own each time
    project.mkdir()
    (project / "p.py").write_text(textwrap.dedent(source))
    return load_predictor(str(project), "p.py", "P", {}, **options)


def test_an_openai_predictor_needs_no_predict(tmp_path: Any) -> None:
    loaded = load(
        tmp_path, "class P:\n    def embed(self, texts, request_id):\n        return texts\n", protocol="openai"
    )
    assert loaded.embed.wants == ("texts", "request_id") and loaded.chat is None
    with pytest.raises(HTTPError) as no_predict:  # POST /<api> answers 405, saying why
        loaded.predict.fn(payload={})
    assert no_predict.value.status == 405
    batched = load(
        tmp_path, "class P:\n    def embed(self, texts):\n        return texts\n", protocol="openai", batching=True
    )
    assert batched.predict_batch is None and batched.embed is not None  # embed batches on its own


def test_an_openai_predictor_is_checked_when_it_loads(tmp_path: Any) -> None:
    with pytest.raises(PredictorLoadError, match="none of embed, chat, complete or predict"):
        load(tmp_path, "class P:\n    pass\n", protocol="openai")
    with pytest.raises(PredictorLoadError, match="must take params"):
        load(tmp_path, "class P:\n    def chat(self, messages):\n        return ''\n", protocol="openai")
    with pytest.raises(PredictorLoadError, match="cannot inject"):
        load(tmp_path, "class P:\n    def embed(self, sentences):\n        return []\n", protocol="openai")
    # Without the protocol, a method named embed is the class's own business.
    plain = load(tmp_path, "class P:\n    def embed(self, x, y):\n        pass\n    def predict(self):\n        pass\n")
    assert plain.embed is None


# --- the gateway's rewriting of answers ------------------------------------------------------------


def test_the_gateway_rewrites_its_own_errors_and_marks_streams() -> None:
    from cirrus.gateway.openai import _as_event_stream, _errors_in_openai_shape

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def main() -> None:
        rewriting = _errors_in_openai_shape(send)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"40"), (b"retry-after", b"1")]
        await rewriting({"type": "http.response.start", "status": 503, "headers": headers})
        await rewriting({"type": "http.response.body", "body": b'{"error": "at cap', "more_body": True})
        await rewriting({"type": "http.response.body", "body": b'acity", "request_id": "r1"}'})
        streaming = _as_event_stream(send)
        await streaming({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})

    asyncio.run(main())
    start, body, stream_start = sent
    error = json.loads(body["body"])["error"]
    assert error == {"message": "at capacity", "type": "server_error", "param": None, "code": "overloaded"}
    assert (b"content-length", str(len(body["body"])).encode()) in start["headers"]
    assert (b"retry-after", b"1") in start["headers"] and start["status"] == 503
    assert (b"content-type", b"text/event-stream; charset=utf-8") in stream_start["headers"]
    assert (b"content-type", b"text/plain") not in stream_start["headers"]
