"""The controller's model fetcher on a real disk cache with local (`file://`) sources: the disk LRU
after each fetch, and the re-listing of sources with `reload_s`. No processes, no sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cirrus.control.models import DEFAULT_DISK_ENTRIES, ModelFetcher
from cirrus.models.cache import ModelCache
from cirrus.spec import ApiSpec, Deployment


def deployment(name: str, models: list[dict[str, Any]], disk_cache_size: int | None = None) -> Deployment:
    multi = None if disk_cache_size is None else {"disk_cache_size": disk_cache_size}
    spec = ApiSpec.model_validate({"name": name, "predictor": {"path": "p.py"}, "models": models, "multi_model": multi})
    return Deployment(spec=spec, project_dir="/nowhere")


def source(root: Path, name: str, content: str) -> str:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "w.bin").write_text(content)
    return f"file://{root / name}/"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def ready(fetcher: ModelFetcher, key: tuple[str, int], dep: Deployment) -> dict[str, str]:
    """The revision's paths, once its fetch and the eviction after it are done."""
    for _ in range(500):
        paths = fetcher.paths(key, dep)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if paths is not None and not pending:
            return paths
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key}: {fetcher.status(key)}")


def test_the_disk_cache_keeps_disk_cache_size_entries_but_never_one_in_use(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    fetcher = ModelFetcher(lambda: cache, Clock())
    m = {name: source(tmp_path / "src", name, name * 10) for name in ("m1", "m2", "m3", "m4")}

    async def main() -> None:
        a = deployment("a", [{"name": "m1", "path": m["m1"]}, {"name": "m2", "path": m["m2"]}], disk_cache_size=2)
        await ready(fetcher, ("a", 1), a)
        b = deployment("b", [{"name": "m3", "path": m["m3"]}], disk_cache_size=2)
        await ready(fetcher, ("b", 1), b)
        assert len(cache.entries()) == 3  # over the limit, but every entry is in use
        fetcher.release(("a", 1))  # its replicas are gone
        c = deployment("c", [{"name": "m4", "path": m["m4"]}], disk_cache_size=2)
        paths = await ready(fetcher, ("c", 1), c)
        assert sorted(Path(e.url).name for e in cache.entries()) == ["m3", "m4"]  # m1, m2 went first
        assert Path(paths["m4"]).exists()
        fetcher.release(("b", 1))
        fetcher.release(("c", 1))
        fetcher._pool.shutdown()

    asyncio.run(main())


def test_the_limit_is_the_largest_disk_cache_size_of_the_deployed_apis(tmp_path: Path) -> None:
    fetcher = ModelFetcher(None, Clock())
    assert fetcher.max_entries == DEFAULT_DISK_ENTRIES
    local = [{"name": "w", "path": str(tmp_path)}]

    async def main() -> None:
        fetcher.paths(("small", 1), deployment("small", local, disk_cache_size=3))
        assert fetcher.max_entries == 3
        fetcher.paths(("big", 1), deployment("big", local, disk_cache_size=40))
        assert fetcher.max_entries == 40
        fetcher.paths(("plain", 1), deployment("plain", local))
        assert fetcher.max_entries == 40
        fetcher.release(("big", 1))
        assert fetcher.max_entries == DEFAULT_DISK_ENTRIES  # `plain` counts with the default
        fetcher._pool.shutdown()

    asyncio.run(main())


def test_a_changed_source_with_reload_s_is_reported_once(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "cache")
    clock = Clock()
    fetcher = ModelFetcher(lambda: cache, clock)
    url = source(tmp_path / "src", "m", "v1")
    dep = deployment("a", [{"name": "m", "path": url, "reload_s": 5}])
    key = ("a", 1)

    async def settle() -> list[tuple[str, str]]:
        found = fetcher.check_sources([key])
        while any(t is not asyncio.current_task() for t in asyncio.all_tasks()):
            await asyncio.sleep(0.01)
        return found + fetcher.check_sources([])

    async def main() -> None:
        await ready(fetcher, key, dep)
        clock.now = 10
        assert await settle() == []  # listed again: unchanged
        (tmp_path / "src" / "m" / "w.bin").write_text("v2, longer")
        clock.now = 12
        assert await settle() == []  # not due yet (checked at 10, every 5 s)
        clock.now = 16
        assert await settle() == [("a", f"model 'm' changed at {url}")]
        clock.now = 30
        assert await settle() == []  # once: the new revision takes over
        fetcher._pool.shutdown()

    asyncio.run(main())
