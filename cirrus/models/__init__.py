"""Models: where they come from (local paths, fsspec/S3 URLs) and the disk cache they are fetched into.

    cache = ModelCache(settings.home / "models", storage_options={"s3": {"endpoint_url": ...}})
    path = cache.fetch("s3://bucket/minilm/", version="v2", progress=lambda done, total: ...)

Nothing here imports fsspec or s3fs until a URL source is listed.
"""

from __future__ import annotations

from cirrus.models.cache import CacheEntry, ModelCache, ModelCacheError, cache_key, disk_free_bytes, format_bytes
from cirrus.models.sources import ModelError, ModelSource, ModelSourceError, SourceFile, describe_source

__all__ = [
    "CacheEntry",
    "ModelCache",
    "ModelCacheError",
    "ModelError",
    "ModelSource",
    "ModelSourceError",
    "SourceFile",
    "cache_key",
    "describe_source",
    "disk_free_bytes",
    "format_bytes",
]
