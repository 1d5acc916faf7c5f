"""ModelLRU: the in-memory model cache of a multi-model API, driven with a fake loader."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

from cirrus.models.lru import ModelLRU

PATHS = {"a": "/m/a", "b": "/m/b", "c": "/m/c"}


class FakeLoader:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.loads: Counter[str] = Counter()
        self.unloaded: list[str] = []
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def load(self, path: str) -> dict[str, Any]:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.loads[path] += 1
        return {"path": path}

    def unload(self, model: dict[str, Any]) -> None:
        self.unloaded.append(model["path"])


def test_a_hit_does_not_load_again() -> None:
    loader = FakeLoader()
    lru = ModelLRU(loader.load, PATHS, cache_size=2)
    first = lru.get("a")
    assert first == {"path": "/m/a"}
    assert lru.get("a") is first
    assert loader.loads == {"/m/a": 1}
    assert lru.loads == 1 and lru.held() == ["a"]


def test_the_least_recently_used_is_evicted_beyond_cache_size() -> None:
    loader = FakeLoader()
    lru = ModelLRU(loader.load, PATHS, cache_size=2, unload_model=loader.unload)
    lru.get("a")
    lru.get("b")
    lru.get("a")  # a is now the most recently used: b goes first
    lru.get("c")
    assert lru.held() == ["a", "c"]
    assert loader.unloaded == ["/m/b"]
    lru.get("b")  # evicts a (c was used after it)
    assert lru.held() == ["c", "b"]
    assert loader.unloaded == ["/m/b", "/m/a"]
    assert loader.loads == {"/m/a": 1, "/m/b": 2, "/m/c": 1}
    assert lru.evictions == 2


def test_a_cycle_longer_than_the_cache_reloads_every_time() -> None:
    loader = FakeLoader()
    lru = ModelLRU(loader.load, PATHS, cache_size=2)
    for name in ["a", "b", "c", "a"]:
        lru.get(name)
        assert len(lru.held()) <= 2
    assert loader.loads["/m/a"] == 2
    assert lru.held() == ["c", "a"]


def test_cache_size_one_holds_one_model() -> None:
    loader = FakeLoader()
    lru = ModelLRU(loader.load, PATHS, cache_size=1)
    for name in ["a", "b", "b", "c", "a"]:
        lru.get(name)
        assert lru.held() == [name]
    assert sum(loader.loads.values()) == 4


def test_unknown_models_and_versions_are_key_errors_listing_what_exists() -> None:
    lru = ModelLRU(FakeLoader().load, PATHS, cache_size=2, versions={"a": "v2"})
    with pytest.raises(KeyError, match=r"no model named 'nope'; available models: a, b, c"):
        lru.get("nope")
    with pytest.raises(KeyError, match=r"model 'a' has no version 'v1'; it is served at version 'v2'"):
        lru.get("a", "v1")
    assert lru.get("a", "v2") == {"path": "/m/a"}
    with pytest.raises(KeyError, match="unlabelled"):
        lru.get("b", "v9")
    assert lru.held() == ["a"]


def test_bad_cache_size_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ModelLRU(FakeLoader().load, PATHS, cache_size=0)


def test_a_failed_load_caches_nothing_and_is_retried() -> None:
    calls = []

    def flaky(path: str) -> str:
        calls.append(path)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        return path

    lru = ModelLRU(flaky, PATHS, cache_size=2)
    with pytest.raises(OSError, match="hiccup"):
        lru.get("a")
    assert lru.held() == []
    assert lru.get("a") == "/m/a"
    assert calls == ["/m/a", "/m/a"]


def test_an_unload_that_raises_still_evicts() -> None:
    def bad_unload(model: Any) -> None:
        raise RuntimeError("boom")

    lru = ModelLRU(FakeLoader().load, PATHS, cache_size=1, unload_model=bad_unload)
    lru.get("a")
    lru.get("b")
    assert lru.held() == ["b"]


def test_concurrent_gets_of_one_model_load_it_once() -> None:
    loader = FakeLoader(delay_s=0.05)
    lru = ModelLRU(loader.load, PATHS, cache_size=2)
    start = threading.Barrier(16)
    results: list[Any] = []

    def worker(name: str) -> None:
        start.wait()
        results.append(lru.get(name))

    threads = [threading.Thread(target=worker, args=("a" if i % 2 else "b",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert loader.loads == {"/m/a": 1, "/m/b": 1}
    assert len(results) == 16
    assert len({id(r) for r in results}) == 2  # everyone got the one instance of their model


def test_a_hit_does_not_wait_for_another_models_load() -> None:
    gate = threading.Event()

    def load(path: str) -> str:
        if path == "/m/b":
            gate.wait(5)
        return path

    lru = ModelLRU(load, PATHS, cache_size=2)
    lru.get("a")
    slow = threading.Thread(target=lru.get, args=("b",))
    slow.start()
    time.sleep(0.02)
    started = time.monotonic()
    assert lru.get("a") == "/m/a"  # served while b is still loading
    assert time.monotonic() - started < 1.0
    gate.set()
    slow.join(5)
    assert lru.held() == ["a", "b"]


# --- the replica's side: load_predictor(multi_model=True) and RequestHandler, in process -----------

MULTI_SOURCE = """
class Predictor:
    def load_model(self, path):
        return "loaded:" + path

    def unload_model(self, model):
        pass

    def predict(self, payload, model):
        return {"model": model}
"""


def _load(tmp_path: Any, source: str, multi_model: bool) -> Any:
    import sys
    import uuid

    from cirrus.predictor import load_predictor

    stem = f"mm_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{stem}.py").write_text(source)
    try:
        return load_predictor(str(tmp_path), f"{stem}.py", "Predictor", {}, multi_model=multi_model)
    finally:
        sys.modules.pop(f"cirrus_user_{stem}", None)


def test_model_is_injectable_only_in_a_multi_model_api(tmp_path: Any) -> None:
    from cirrus.predictor import PredictorLoadError

    loaded = _load(tmp_path, MULTI_SOURCE, multi_model=True)
    assert loaded.predict.wants == ("payload", "model")
    assert loaded.load_model("/x") == "loaded:/x" and loaded.unload_model is not None
    with pytest.raises(PredictorLoadError, match="asks for 'model', which Cirrus cannot inject"):
        _load(tmp_path, MULTI_SOURCE, multi_model=False)
    plain = "class Predictor:\n    def predict(self, payload):\n        return payload\n"
    with pytest.raises(PredictorLoadError, match="has no load_model method"):
        _load(tmp_path, plain, multi_model=True)


def test_request_handler_resolves_the_named_model(tmp_path: Any) -> None:
    import asyncio

    import msgspec

    from cirrus.replica.server import RequestHandler
    from cirrus.wire import InferRequest, InferResponse

    loaded = _load(tmp_path, MULTI_SOURCE, multi_model=True)
    lru = ModelLRU(loaded.load_model, PATHS, cache_size=1, unload_model=loaded.unload_model)
    handler = RequestHandler(loaded, 1, models=lru)

    def ask(headers: list[tuple[str, str]]) -> InferResponse:
        req = InferRequest(id=1, request_id="r", body=b"{}", content_type="application/json", headers=headers)
        reply, _, _ = asyncio.run(handler.handle(req))
        assert isinstance(reply, InferResponse)
        return reply

    ok = ask([("x-cirrus-model", "b")])
    assert ok.status == 200 and msgspec.json.decode(ok.body) == {"model": "loaded:/m/b"}
    assert ok.held == ["b"]
    assert ask([("x-cirrus-model", "c")]).held == ["c"]  # cache_size 1: b was evicted
    missing = ask([])
    assert missing.status == 400 and msgspec.json.decode(missing.body)["models"] == ["a", "b", "c"]
    unknown = ask([("x-cirrus-model", "zzz")])
    assert unknown.status == 404 and "no model named 'zzz'" in msgspec.json.decode(unknown.body)["error"]
    assert missing.held is None and unknown.held is None  # errors before predict report nothing
    handler.slots.shutdown()
