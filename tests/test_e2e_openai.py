"""OpenAI-compatible endpoints through a real daemon, driven by the real `openai` SDK: models list and
retrieve, embeddings (one text, a list, base64, batched across concurrent clients), chat and text
completions (plain and streamed, chunks arriving as they are produced), and errors raised as the
SDK's typed exceptions (unknown model, invalid request, a predictor's HTTPError, a key required)."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import Cirrus, module_daemon, write_project

from cirrus.types import ApiStatusName

PREDICTORS = {
    "embedder.py": """
        import json, os, time

        import cirrus


        class Embedder:
            def __init__(self, config):
                self.calls = config["calls"]

            def embed(self, texts):
                with open(self.calls, "a") as f:
                    f.write(json.dumps(len(texts)) + "\\n")
                time.sleep(0.02)
                if "reject me" in texts:
                    raise cirrus.HTTPError(422, "this text cannot be embedded")
                vectors = [[float(len(t)), float(i), 0.5] for i, t in enumerate(texts)]
                return {"data": vectors, "tokens": [len(t.split()) for t in texts]}
    """,
    "chatter.py": """
        import time

        import cirrus


        class Chatter:
            def chat(self, messages, params):
                last = messages[-1]["content"]
                if last == "refuse":
                    raise cirrus.HTTPError(422, "I will not answer that")
                if last == "stream slowly":
                    return self._slow(params)
                if last == "break midway":
                    return self._broken()
                if last == "go on forever":
                    return self._endless()
                words = f"you said {last} at {params.get('temperature', 'default')}".split()
                return {"content": " ".join(words), "usage": {"prompt_tokens": 3, "completion_tokens": len(words)}}

            def _slow(self, params):
                for i in range(5):
                    yield f"{time.time():.6f}|{i} "
                    time.sleep(0.25)
                yield {"finish_reason": "length", "usage": {"prompt_tokens": 2, "completion_tokens": 5}}

            def _broken(self):
                yield "one "
                raise RuntimeError("the model fell over")

            def _endless(self):
                for i in range(100):
                    yield f"{i} "
                    time.sleep(0.1)

            async def complete(self, prompt, params):
                if prompt == "refuse":  # before its first piece: the request's answer is this 422
                    raise cirrus.HTTPError(422, "no story for that")
                for word in ("once", "upon", "a", "time"):
                    yield word + " "
    """,
    "zoo.py": """
        class Zoo:
            def load_model(self, path):
                with open(path) as f:
                    return f.read().strip()

            def chat(self, messages, params, model):
                return f"{model} heard {messages[-1]['content']}"
    """,
}

APIS: list[dict[str, Any]] = [
    {
        "name": "embedder",
        "protocol": "openai",
        "predictor": {"path": "embedder.py", "class": "Embedder"},
        "concurrency": {"max_concurrency": 64},
        "batching": {"max_batch_size": 64, "max_wait_ms": 20},
    },
    {
        "name": "chatter",
        "protocol": "openai",
        "predictor": {"path": "chatter.py", "class": "Chatter"},
        "concurrency": {"inference_slots": 2, "max_concurrency": 8},
    },
    {
        "name": "single",
        "protocol": "openai",
        "predictor": {"path": "chatter.py", "class": "Chatter"},
        "concurrency": {"inference_slots": 1, "max_concurrency": 4},
    },
    {
        "name": "zoo",
        "protocol": "openai",
        "predictor": {"path": "zoo.py", "class": "Zoo"},
        "models": [{"name": name, "path": f"{name}.txt"} for name in ("a", "b")],
        "multi_model": {"cache_size": 2},
    },
    {
        "name": "locked",
        "protocol": "openai",
        "auth": "required",
        "predictor": {"path": "chatter.py", "class": "Chatter"},
    },
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cirrus, Path]]:
    root = tmp_path_factory.mktemp("openai")
    calls = root / "calls"
    apis = [dict(api) for api in APIS]
    apis[0]["predictor"] = {**apis[0]["predictor"], "config": {"calls": str(calls)}}
    with module_daemon(root / "home") as cirrus:
        project = write_project(root / "project", PREDICTORS, apis=apis)
        for name in ("a", "b"):
            (project / f"{name}.txt").write_text(f"weights-{name}\n")
        code, out, err = cirrus.cli("deploy", str(project))
        assert code == 0, out + err
        for api in APIS:
            cirrus.wait_for(api["name"], lambda s: s.status == ApiStatusName.LIVE)
        yield cirrus, calls
        for client in CLIENTS:
            client.close()


CLIENTS: list[openai.OpenAI] = []


def sdk(gw: tuple[Cirrus, Path], api_key: str = "unused") -> openai.OpenAI:
    """An SDK client pointed at the gateway (closed when the module's daemon goes)."""
    client = openai.OpenAI(base_url=gw[0].url("/v1"), api_key=api_key, max_retries=0, timeout=30)
    CLIENTS.append(client)
    return client


def test_models_list_and_retrieve(gw: tuple[Cirrus, Path]) -> None:
    client = sdk(gw)
    ids = [m.id for m in client.models.list()]
    assert ids == ["chatter", "embedder", "single", "zoo"]  # `locked` needs a key to be seen
    model = client.models.retrieve("embedder")
    assert model.id == "embedder" and model.owned_by == "cirrus" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.code == "model_not_found"


def test_embeddings_of_one_text_a_list_and_base64(gw: tuple[Cirrus, Path]) -> None:
    client = sdk(gw)
    one = client.embeddings.create(model="embedder", input="hello world")
    assert [d.embedding for d in one.data] == [[11.0, 0.0, 0.5]]
    assert one.model == "embedder" and one.usage.prompt_tokens == 2 and one.usage.total_tokens == 2
    many = client.embeddings.create(model="embedder", input=["a", "bb", "ccc"])
    assert [d.index for d in many.data] == [0, 1, 2]
    assert [d.embedding[0] for d in many.data] == [1.0, 2.0, 3.0]
    # The SDK asks for base64 itself (and decodes it) when numpy is there; asked for explicitly, it
    # hands the string over: little-endian float32s.
    packed = client.embeddings.create(model="embedder", input=["abcd", "ef"], encoding_format="base64")
    decoded = [list(struct.unpack("<3f", base64.b64decode(str(d.embedding)))) for d in packed.data]
    assert decoded == [[4.0, 0.0, 0.5], [2.0, 1.0, 0.5]]
    floats = httpx.post(gw[0].url("/v1/embeddings"), json={"model": "embedder", "input": "ab"}, timeout=10)
    assert floats.json()["data"][0]["embedding"] == [2.0, 0.0, 0.5]  # the default: a list of floats


def test_embeddings_batch_across_concurrent_clients(gw: tuple[Cirrus, Path]) -> None:
    cirrus, calls = gw
    calls.write_text("")
    results: dict[int, Any] = {}

    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=cirrus.url("/v1"), api_key="unused", max_retries=0) as client:
            answers = await asyncio.gather(
                *(client.embeddings.create(model="embedder", input=["x" * i, "y" * (i + 1)]) for i in range(1, 33))
            )
        results.update(enumerate(answers, start=1))

    asyncio.run(main())
    for i, answer in results.items():  # each request its own vectors, in order, with its own usage
        assert [d.embedding[0] for d in answer.data] == [float(i), float(i + 1)]
        assert answer.usage.prompt_tokens == 2
    sizes = [int(line) for line in calls.read_text().split()]
    assert sum(sizes) == 64
    assert max(sizes) > 2, sizes  # texts of more than one request in one embed call


def test_chat_completion(gw: tuple[Cirrus, Path]) -> None:
    client = sdk(gw)
    answer = client.chat.completions.create(
        model="chatter",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        temperature=0.5,
    )
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "you said hi at 0.5"
    assert choice.finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 5 and answer.usage.total_tokens == 8
    parts = client.chat.completions.create(
        model="chatter", messages=[{"role": "user", "content": [{"type": "text", "text": "yo"}]}]
    )
    assert parts.choices[0].message.content == "you said yo at default"


def test_streamed_chat_arrives_chunk_by_chunk(gw: tuple[Cirrus, Path]) -> None:
    client = sdk(gw)
    stream = client.chat.completions.create(
        model="chatter",
        messages=[{"role": "user", "content": "stream slowly"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[tuple[float, Any]] = []
    for chunk in stream:
        arrivals.append((time.time(), chunk))
    chunks = [c for _, c in arrivals]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [(t, c.choices[0].delta.content) for t, c in arrivals if c.choices and c.choices[0].delta.content]
    assert [p.split("|")[1] for _, p in pieces] == ["0 ", "1 ", "2 ", "3 ", "4 "]
    produced_last = float(pieces[-1][1].split("|")[0])
    assert pieces[0][0] < produced_last - 0.5  # the first piece came ~1 s before the last was made
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7


def test_text_completions_plain_and_streamed(gw: tuple[Cirrus, Path]) -> None:
    client = sdk(gw)
    answer = client.completions.create(model="chatter", prompt="tell me", max_tokens=8)
    assert answer.id.startswith("cmpl-") and answer.choices[0].text == "once upon a time "
    assert answer.usage is None  # the predictor reports no token counts
    streamed = client.completions.create(model="chatter", prompt=["tell me"], stream=True)
    texts = [c.choices[0].text for c in streamed]
    assert "".join(texts) == "once upon a time " and texts.count("") == 1  # the last chunk: finish only


def test_errors_are_the_sdks_typed_exceptions(gw: tuple[Cirrus, Path]) -> None:
    client = sdk(gw)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as no_messages:
        client.chat.completions.create(model="chatter", messages=[])
    assert "messages" in no_messages.value.message
    with pytest.raises(openai.BadRequestError) as two:
        client.chat.completions.create(model="chatter", messages=[{"role": "user", "content": "hi"}], n=2)
    assert two.value.param == "n" and "n=1" in two.value.message
    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(model="chatter", messages=[{"role": "wizard", "content": "hi"}])  # type: ignore[misc,list-item]
    assert role.value.param == "messages.0.role"
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model="chatter", messages=[{"role": "user", "content": "refuse"}])
    assert "I will not answer that" in refused.value.message
    # Streamed, the same refusals are HTTP answers, not an event after a 200: a sync chat that
    # raises, and an async generator that raises before its first piece.
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model="chatter", messages=[{"role": "user", "content": "refuse"}], stream=True)
    assert "I will not answer that" in refused.value.message
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.completions.create(model="chatter", prompt="refuse", stream=True)
    assert "no story for that" in refused.value.message
    with pytest.raises(openai.NotFoundError) as unsupported:
        client.embeddings.create(model="chatter", input="hi")
    assert "no embed method" in unsupported.value.message
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="embedder", input=[[1, 2, 3]])


def test_a_key_is_required_where_the_spec_says(gw: tuple[Cirrus, Path]) -> None:
    cirrus = gw[0]
    messages: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as refused:
        sdk(gw).chat.completions.create(model="locked", messages=messages)
    assert "needs a key" in refused.value.message or "not valid" in refused.value.message
    code, out, err = cirrus.cli("keys", "create", "--api", "locked")
    assert code == 0, err
    keyed = sdk(gw, api_key=out.strip())
    assert keyed.chat.completions.create(model="locked", messages=messages).choices[0].message.content
    assert "locked" in [m.id for m in keyed.models.list()]


def test_error_bodies_have_openai_shape_for_gateway_errors(gw: tuple[Cirrus, Path]) -> None:
    answer = httpx.post(gw[0].url("/v1/chat/completions"), content=b"{not json", timeout=10)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and "malformed JSON" in error["message"]
    locked = httpx.post(gw[0].url("/v1/embeddings"), json={"model": "locked", "input": "x"}, timeout=10)
    assert locked.status_code == 401 and locked.json()["error"]["type"] == "authentication_error"
    assert json.loads(httpx.get(gw[0].url("/v1/nothing"), timeout=10).text)["error"]["code"] == "unknown_url"
    plain = httpx.post(gw[0].url("/embedder"), json={"x": 1}, timeout=10)  # no predict: POST /<api> says so
    assert plain.status_code == 405 and "/v1" in plain.json()["error"]


def test_an_error_mid_stream_is_an_error_event(gw: tuple[Cirrus, Path]) -> None:
    stream = sdk(gw).chat.completions.create(
        model="chatter", messages=[{"role": "user", "content": "break midway"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as failed:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "one "]  # the role chunk, then the piece produced before the failure
    assert "the predictor failed" in failed.value.message  # (the exception's text: with debug_errors only)


def test_a_client_that_goes_away_frees_the_slot(gw: tuple[Cirrus, Path]) -> None:
    client = sdk(gw)
    messages: Any = [{"role": "user", "content": "go on forever"}]
    stream = client.chat.completions.create(model="single", messages=messages, stream=True)
    for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    stream.close()  # ~10 s of generation left, on the API's only slot
    started = time.perf_counter()
    answer = client.chat.completions.create(model="single", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "you said hi at default"
    assert time.perf_counter() - started < 3


def test_a_model_of_a_multi_model_api(gw: tuple[Cirrus, Path]) -> None:
    client = sdk(gw)
    messages: Any = [{"role": "user", "content": "hi"}]
    for name in ("a", "b"):
        answer = client.chat.completions.create(model=f"zoo/{name}", messages=messages)
        assert answer.choices[0].message.content == f"weights-{name} heard hi" and answer.model == f"zoo/{name}"
    with pytest.raises(openai.BadRequestError, match="name one as"):
        client.chat.completions.create(model="zoo", messages=messages)
    with pytest.raises(openai.NotFoundError, match="no model named 'c'"):
        client.chat.completions.create(model="zoo/c", messages=messages)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="chatter/a", messages=messages)  # not a multi-model API
