"""The in-memory model cache of a multi-model API: at most `cache_size` models loaded at once.

    lru = ModelLRU(predictor.load_model, {"a": "/models/a", "b": "/models/b"}, cache_size=1,
                   unload_model=predictor.unload_model)
    model = lru.get("a")  # loads /models/a through the user's load_model(path) on a miss

A miss loads through the user's `load_model(path)`; the least recently used models beyond
`cache_size` are then dropped (and handed to the optional `unload_model(model)` first, e.g. to
free accelerator memory). Thread-safe: requests for models already loaded never wait for a load,
and one model is loaded once even when many requests ask for it at the same moment (they wait for
that one load). Different models may load at the same time, so while they load, more than
`cache_size` models can be in memory for a moment; a request that already got a model keeps its
reference after the model is evicted.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("cirrus.models")


class ModelLRU:
    """Models by name, loaded on first use, least recently used evicted beyond `cache_size`."""

    def __init__(
        self,
        load_model: Callable[[str], Any],
        paths: Mapping[str, str],
        cache_size: int,
        unload_model: Callable[[Any], Any] | None = None,
        versions: Mapping[str, str | None] | None = None,
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, not {cache_size}")
        self._load_model = load_model
        self._unload_model = unload_model
        self.paths = dict(paths)
        self.versions = dict(versions or {})  # name -> the version label it was listed with
        self.cache_size = cache_size
        self._lock = threading.Lock()  # guards _loaded and _load_locks; never held during a load
        self._loaded: OrderedDict[str, Any] = OrderedDict()  # least recently used first
        self._load_locks: dict[str, threading.Lock] = {}  # one load per model at a time
        self.loads = 0
        self.evictions = 0

    @property
    def names(self) -> list[str]:
        """The models this cache can serve, sorted."""
        return sorted(self.paths)

    def check(self, name: str, version: str | None = None) -> str:
        """The local path of `name`; KeyError naming the available models when it is not served."""
        path = self.paths.get(name)
        if path is None:
            raise KeyError(f"no model named {name!r}; available models: {', '.join(self.names) or '(none)'}")
        if version is not None and version != self.versions.get(name):
            known = self.versions.get(name)
            raise KeyError(
                f"model {name!r} has no version {version!r}; it is served at "
                + (f"version {known!r}" if known is not None else "its one, unlabelled, version")
            )
        return path

    def get(self, name: str, version: str | None = None) -> Any:
        """The loaded model `name`, loading it (and evicting the least recently used) on a miss."""
        path = self.check(name, version)
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            load_lock = self._load_locks.setdefault(name, threading.Lock())
        with load_lock:
            with self._lock:
                if name in self._loaded:  # loaded by another request while this one waited
                    self._loaded.move_to_end(name)
                    return self._loaded[name]
            log.info("loading model %r from %s", name, path)
            model = self._load_model(path)
            with self._lock:
                self.loads += 1
                self._loaded[name] = model
                evicted: list[tuple[str, Any]] = []
                while len(self._loaded) > self.cache_size:
                    evicted.append(self._loaded.popitem(last=False))
                self.evictions += len(evicted)
        for old_name, old_model in evicted:
            self._unload(old_name, old_model)
        return model

    def held(self) -> list[str]:
        """Names of the models loaded now, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def _unload(self, name: str, model: Any) -> None:
        log.info("evicting model %r (cache_size %d)", name, self.cache_size)
        if self._unload_model is None:
            return
        try:
            self._unload_model(model)
        except Exception:
            log.exception("unload_model raised for model %r; its reference is dropped anyway", name)
