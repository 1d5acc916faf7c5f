"""The model cache against a real S3 API (`moto_server` on loopback) and local paths: fetch, cache
hits, resumed and verified downloads, clear errors, disk space, concurrent fetches, eviction."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from s3_server import MotoServer, s3_fixture, s3_server

from cirrus.models import ModelCache, ModelCacheError, ModelSourceError, cache_key, describe_source

__all__ = ["s3_fixture"]  # the `s3` fixture

CHUNK = 256 * 1024
BIG = 6 * 2**20 + 12345  # several chunks, and not a multiple of the chunk size


class Interrupted(Exception):
    pass


def model_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"hidden": 384}',
        "tokenizer/vocab.txt": b"\n".join(b"token%d" % i for i in range(2000)),
        "weights/model.safetensors": os.urandom(BIG),
        "empty.txt": b"",
    }


def assert_same_tree(path: Path, files: dict[str, bytes]) -> None:
    found = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert found.keys() == files.keys()
    for name, data in files.items():
        assert found[name] == data, name


class Recorder:
    """A progress callback that remembers every call, and can interrupt the fetch once past a point."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.stop_after = stop_after

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        if self.stop_after is not None and done >= self.stop_after:
            raise Interrupted(f"stopped at {done} of {total}")


@pytest.fixture
def bucket(s3: MotoServer) -> str:
    name = f"models-{uuid.uuid4().hex[:12]}"
    s3.filesystem().mkdir(name)
    return name


@pytest.fixture
def cache(tmp_path: Path, s3: MotoServer) -> ModelCache:
    return ModelCache(tmp_path / "models", storage_options=s3.storage_options, chunk_bytes=CHUNK)


def upload(s3: MotoServer, bucket: str, prefix: str, files: dict[str, bytes]) -> str:
    fs = s3.filesystem()
    for name, data in files.items():
        fs.pipe_file(f"{bucket}/{prefix}/{name}", data)  # one PUT each: a plain MD5 ETag
    return f"s3://{bucket}/{prefix}/"


def object_gets(s3: MotoServer, mark: int, bucket: str) -> list[str]:
    """Object downloads (not listings) from `bucket` since `mark`."""
    return [
        r.path
        for r in s3.requests_since(mark)
        if r.method == "GET" and r.path.startswith(f"/{bucket}/") and r.query == ""
    ]


# --- S3 -------------------------------------------------------------------------------------------


def test_fetch_from_s3_gives_the_same_files(s3: MotoServer, bucket: str, cache: ModelCache) -> None:
    files = model_files()
    url = upload(s3, bucket, "minilm", files)
    progress = Recorder()
    path = cache.fetch(url, progress=progress)
    assert_same_tree(path, files)
    total = sum(len(d) for d in files.values())
    assert progress.calls[0] == (0, total) and progress.calls[-1] == (total, total)
    assert [d for d, _ in progress.calls] == sorted(d for d, _ in progress.calls)
    # the layout: <root>/<key[:2]>/<key>/ and its manifest beside it; nothing left in progress
    key = path.name
    assert path == cache.root / key[:2] / key
    manifest = json.loads((cache.root / key[:2] / f"{key}.json").read_text())
    assert manifest["url"] == f"s3://{bucket}/minilm" and manifest["total_bytes"] == total
    weights = next(f for f in manifest["files"] if f["path"] == "weights/model.safetensors")
    assert weights["md5"] == hashlib.md5(files["weights/model.safetensors"]).hexdigest()
    assert list((cache.root / ".partial").iterdir()) == []
    [entry] = cache.entries()
    assert entry.path == path and entry.size == total and entry.url == f"s3://{bucket}/minilm"


def test_second_fetch_is_a_cache_hit_without_downloading(s3: MotoServer, bucket: str, cache: ModelCache) -> None:
    files = model_files()
    url = upload(s3, bucket, "m", files)
    mark = s3.mark()
    first = cache.fetch(url)
    assert len(object_gets(s3, mark, bucket)) >= BIG // CHUNK  # ranged GETs, chunk by chunk
    mark = s3.mark()
    progress = Recorder()
    assert cache.fetch(url, progress=progress) == first
    assert object_gets(s3, mark, bucket) == []  # only the listing
    total = sum(len(d) for d in files.values())
    assert progress.calls == [(total, total)]
    # the same URL without the trailing slash is the same model; another version is another entry
    assert cache.fetch(url.rstrip("/")) == first
    second = cache.fetch(url, version="v2")
    assert second != first
    assert_same_tree(second, files)


def test_a_changed_object_is_fetched_anew(s3: MotoServer, bucket: str, cache: ModelCache) -> None:
    files = model_files()
    url = upload(s3, bucket, "m", files)
    first = cache.fetch(url)
    files["config.json"] = b'{"hidden": 768}'
    upload(s3, bucket, "m", {"config.json": files["config.json"]})
    second = cache.fetch(url)
    assert second != first
    assert_same_tree(second, files)
    assert (first / "config.json").read_bytes() == b'{"hidden": 384}'  # the old entry is untouched


def test_single_object_source_gives_the_file_path(s3: MotoServer, bucket: str, cache: ModelCache) -> None:
    data = os.urandom(1_000_000)
    s3.filesystem().pipe_file(f"{bucket}/models/model.onnx", data)
    path = cache.fetch(f"s3://{bucket}/models/model.onnx")
    assert path.name == "model.onnx" and path.read_bytes() == data
    assert path.parent.name == cache_key(
        describe_source(f"s3://{bucket}/models/model.onnx", storage_options=cache.storage_options)
    )


def test_interrupted_download_resumes_where_it_stopped(s3: MotoServer, bucket: str, cache: ModelCache) -> None:
    files = {"weights.bin": os.urandom(BIG)}
    url = upload(s3, bucket, "big", files)
    with pytest.raises(Interrupted):
        cache.fetch(url, progress=Recorder(stop_after=BIG // 2))
    [partial] = (cache.root / ".partial").iterdir()
    kept = (partial / "weights.bin").stat().st_size
    assert BIG // 2 <= kept < BIG
    assert cache.entries() == []

    mark = s3.mark()
    progress = Recorder()
    path = cache.fetch(url, progress=progress)
    assert progress.calls[0] == (kept, BIG)  # starts from what was already there
    gets = object_gets(s3, mark, bucket)
    assert 0 < len(gets) <= -(-(BIG - kept) // CHUNK)  # only the rest was downloaded
    assert_same_tree(path, files)


def test_corrupted_partial_file_is_caught_by_the_etag(s3: MotoServer, bucket: str, cache: ModelCache) -> None:
    files = {"weights.bin": os.urandom(BIG)}
    url = upload(s3, bucket, "big", files)
    with pytest.raises(Interrupted):
        cache.fetch(url, progress=Recorder(stop_after=BIG // 2))
    [partial] = (cache.root / ".partial").iterdir()
    damaged = partial / "weights.bin"
    with damaged.open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"\0" * 100)
    with pytest.raises(ModelCacheError, match=r"weights.bin: the downloaded content does not match its md5"):
        cache.fetch(url)
    assert not damaged.exists() and cache.entries() == []
    assert_same_tree(cache.fetch(url), files)  # the next fetch starts that file over


def test_multipart_upload_is_checked_by_size(s3: MotoServer, bucket: str, cache: ModelCache) -> None:
    data = os.urandom(11 * 2**20)
    fs = s3.filesystem()
    with fs.open(f"{bucket}/mp/weights.bin", "wb", block_size=5 * 2**20) as handle:
        for start in range(0, len(data), 2**20):
            handle.write(data[start : start + 2**20])
    assert "-" in fs.info(f"{bucket}/mp/weights.bin")["ETag"]  # not an MD5 of the content
    path = cache.fetch(f"s3://{bucket}/mp")
    assert (path / "weights.bin").read_bytes() == data


def test_concurrent_fetches_of_one_model_download_it_once(s3: MotoServer, bucket: str, cache: ModelCache) -> None:
    files = model_files()
    url = upload(s3, bucket, "m", files)
    mark = s3.mark()
    results: list[Path] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def fetch() -> None:
        start.wait()
        try:
            results.append(cache.fetch(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(results) == 4 and len(set(results)) == 1
    weights = [g for g in object_gets(s3, mark, bucket) if g.endswith("model.safetensors")]
    assert len(weights) == -(-BIG // CHUNK)  # one download's worth of chunks
    assert_same_tree(results[0], files)


def test_concurrent_fetches_from_two_processes(s3: MotoServer, bucket: str, tmp_path: Path) -> None:
    files = model_files()
    url = upload(s3, bucket, "m", files)
    root = tmp_path / "models"
    script = (
        "import sys; from cirrus.models import ModelCache; "
        f"print(ModelCache({str(root)!r}, storage_options={s3.storage_options!r}, chunk_bytes={CHUNK}).fetch({url!r}))"
    )
    mark = s3.mark()
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env={**os.environ})
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    weights = [g for g in object_gets(s3, mark, bucket) if g.endswith("model.safetensors")]
    assert len(weights) == -(-BIG // CHUNK)
    assert_same_tree(Path(outputs[0]), files)


# --- clear errors ---------------------------------------------------------------------------------


def test_missing_bucket_prefix_or_local_path(s3: MotoServer, bucket: str, cache: ModelCache, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"s3://no-such-bucket-here/m: nothing there"):
        cache.fetch("s3://no-such-bucket-here/m/")
    upload(s3, bucket, "m", {"a.bin": b"a"})
    with pytest.raises(ModelSourceError, match=rf"s3://{bucket}/other: nothing there"):
        cache.fetch(f"s3://{bucket}/other/")
    with pytest.raises(ModelSourceError, match=rf"s3://{bucket}/m/a: nothing there"):
        cache.fetch(f"s3://{bucket}/m/a")  # a prefix of a key's name is not a directory
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelSourceError, match=rf"{missing}: no such file or directory"):
        cache.fetch(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="the directory holds no files"):
        cache.fetch(str(tmp_path / "empty"))
    with pytest.raises(ModelSourceError, match="must not be empty"):
        cache.fetch(" ")
    assert not (cache.root / ".partial").exists() or list((cache.root / ".partial").iterdir()) == []


def test_unknown_protocol_and_missing_s3fs(cache: ModelCache, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelSourceError, match=r"unknown protocol 'nosuchproto'"):
        cache.fetch("nosuchproto://bucket/model/")
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` raises ImportError
    with pytest.raises(ModelSourceError, match=r"needs s3fs: pip install 'cirrus-serve\[s3\]'"):
        cache.fetch("s3://bucket/model/")


def test_wrong_or_missing_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with s3_server(tmp_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as strict:  # checks credentials
        cache = ModelCache(tmp_path / "models", storage_options=strict.storage_options)
        with pytest.raises(ModelSourceError, match=r"s3://some-bucket/m: permission denied .*check the credentials"):
            cache.fetch("s3://some-bucket/m/")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        options = {"s3": {**strict.storage_options["s3"], "skip_instance_cache": True}}
        cache = ModelCache(tmp_path / "models", storage_options=options)
        with pytest.raises(ModelSourceError, match=r"no usable credentials .*AWS_ACCESS_KEY_ID"):
            cache.fetch("s3://some-bucket/m/")


def test_model_larger_than_the_free_disk(s3: MotoServer, bucket: str, tmp_path: Path) -> None:
    url = upload(s3, bucket, "m", model_files())
    cache = ModelCache(tmp_path / "models", lambda _: 3 * 2**20, storage_options=s3.storage_options, chunk_bytes=CHUNK)
    mark = s3.mark()
    with pytest.raises(ModelCacheError) as caught:
        cache.fetch(url, name="minilm")
    message = str(caught.value)
    assert message.startswith(f"model 'minilm' (s3://{bucket}/m) needs 6.0 MiB but only 3.0 MiB are free under")
    assert str(tmp_path / "models") in message
    assert object_gets(s3, mark, bucket) == []  # refused before downloading anything


def test_free_disk_counts_what_a_resumed_download_already_has(s3: MotoServer, bucket: str, tmp_path: Path) -> None:
    url = upload(s3, bucket, "big", {"weights.bin": os.urandom(BIG)})
    free = [10 * 2**30]
    cache = ModelCache(tmp_path / "models", lambda _: free[0], storage_options=s3.storage_options, chunk_bytes=CHUNK)
    with pytest.raises(Interrupted):
        cache.fetch(url, progress=Recorder(stop_after=BIG // 2))
    free[0] = cache.margin_bytes + BIG // 2 + CHUNK  # enough for the rest only
    assert cache.fetch(url).is_dir()


# --- local sources --------------------------------------------------------------------------------


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_local_directory_and_file(tmp_path: Path) -> None:
    files = model_files()
    source = write_tree(tmp_path / "src", files)
    cache = ModelCache(tmp_path / "models", chunk_bytes=CHUNK)
    path = cache.fetch(str(source))
    assert_same_tree(path, files)
    manifest = json.loads((path.parent / f"{path.name}.json").read_text())
    weights = next(f for f in manifest["files"] if f["path"] == "weights/model.safetensors")
    assert weights["sha256"] == hashlib.sha256(files["weights/model.safetensors"]).hexdigest()
    progress = Recorder()
    assert cache.fetch(f"file://{source}", progress=progress) == path  # a hit
    assert len(progress.calls) == 1
    single = cache.fetch(str(source / "weights" / "model.safetensors"))
    assert single.name == "model.safetensors" and single.read_bytes() == files["weights/model.safetensors"]
    # a changed file (new mtime) is a new entry
    (source / "config.json").write_bytes(b"{}")
    os.utime(source / "config.json", ns=(1, 1))
    changed = cache.fetch(str(source))
    assert changed != path and (changed / "config.json").read_bytes() == b"{}"


def test_local_copy_resumes_and_is_verified(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"weights.bin": os.urandom(BIG)})
    cache = ModelCache(tmp_path / "models", chunk_bytes=CHUNK)
    with pytest.raises(Interrupted):
        cache.fetch(str(source), progress=Recorder(stop_after=BIG // 2))
    [partial] = (cache.root / ".partial").iterdir()
    with (partial / "weights.bin").open("r+b") as handle:
        handle.write(b"garbage")
    with pytest.raises(ModelCacheError, match="does not match its sha256"):
        cache.fetch(str(source))
    with pytest.raises(Interrupted):
        cache.fetch(str(source), progress=Recorder(stop_after=BIG // 2))
    progress = Recorder()
    path = cache.fetch(str(source), progress=progress)
    assert progress.calls[0][0] >= BIG // 2
    assert (path / "weights.bin").read_bytes() == (source / "weights.bin").read_bytes()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_local_permission_denied(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"a.bin": b"a", "b.bin": b"b"})
    (source / "b.bin").chmod(0)
    with pytest.raises(ModelSourceError, match=r"b.bin: permission denied"):
        ModelCache(tmp_path / "models").fetch(str(source))


def test_damaged_or_half_published_entry_is_fetched_again(tmp_path: Path) -> None:
    files = {"a.bin": os.urandom(1000), "b.bin": os.urandom(2000)}
    source = write_tree(tmp_path / "src", files)
    cache = ModelCache(tmp_path / "models")
    path = cache.fetch(str(source))
    (path / "b.bin").write_bytes(b"short")  # damaged by hand
    assert_same_tree(cache.fetch(str(source)), files)
    (path.parent / f"{path.name}.json").unlink()  # a crash between the rename and the manifest
    assert_same_tree(cache.fetch(str(source)), files)
    assert len(cache.entries()) == 1


# --- eviction -------------------------------------------------------------------------------------


def test_evict_least_recently_used_keeps_those_in_use(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "models")
    paths = []
    for i in range(3):
        source = write_tree(tmp_path / f"src{i}", {"w.bin": os.urandom(1000)})
        paths.append(cache.fetch(str(source)))
        manifest = paths[-1].parent / f"{paths[-1].name}.json"
        os.utime(manifest, (1000 + i, 1000 + i))
    cache.fetch(str(tmp_path / "src0"))  # a hit: src0 is now the most recently used
    assert [e.path for e in cache.entries()] == [paths[1], paths[2], paths[0]]
    removed = cache.evict(keep_bytes=2000, in_use=[paths[1] / "w.bin"])
    assert [e.path for e in removed] == [paths[2]]  # src1 is in use; src2 is next; then 2000 bytes remain
    assert not paths[2].exists() and paths[1].exists()
    assert sorted(e.path for e in cache.entries()) == sorted([paths[0], paths[1]])
    assert cache.evict(keep_bytes=0, in_use=[paths[0], paths[1]]) == []  # both in use
    assert len(cache.evict(keep_bytes=0)) == 2 and cache.entries() == []


# --- imports --------------------------------------------------------------------------------------


def test_importing_the_cache_loads_neither_fsspec_nor_s3fs(tmp_path: Path) -> None:
    script = (
        "import sys, cirrus.models; from cirrus.models import ModelCache; "
        f"ModelCache({str(tmp_path / 'models')!r}).fetch({str(write_tree(tmp_path / 's', {'a': b'a'}))!r}); "
        "print(sorted(m for m in ('fsspec', 's3fs', 'botocore') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
