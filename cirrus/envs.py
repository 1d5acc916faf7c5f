"""Per-API Python environments (`python:` in a spec), built with uv and cached on disk.

An environment is keyed by what it holds, not by who asked: `uv pip compile` resolves the API's
requirements (its `requirements` file and `packages`) to exact pins, and the key is the hash of
those pins, the Python (implementation, version, platform) and the daemon's own site-packages.
Every API and revision asking the same set shares `<root>/<key>/`, and the cache outlives the
daemon: the marker file `cirrus-env.json`, written last, says an environment is complete; a
directory without it is a build that did not finish, never used (and rebuilt or pruned).

Cirrus is not installed into an environment: a `.pth` file in its site-packages appends the
daemon's site-packages to `sys.path` (after the environment's own, so the API's pins win), which
also runs the `.pth` files there (an editable install of Cirrus included). So an environment with
one small package costs that package, not another copy of Cirrus and its dependencies; and its
Python is the daemon's own version (the daemon's compiled packages must load in it).

Everything here is synchronous (the controller runs it in a thread: cirrus/control/envs.py); the
eviction choice is a pure function of the environments, those in use and the byte budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cirrus.spec_sections import PythonEnvSpec

ENV_FORMAT = 1  # bumped when the layout of an environment changes (older ones are not reused)
MARKER = "cirrus-env.json"  # written last: an environment without it is incomplete
LAST_USED = ".cirrus-last-used"  # its mtime: when a revision last asked for the environment
PTH_NAME = "_cirrus_host.pth"
RESOLVE_TIMEOUT_S = 300.0
INSTALL_TIMEOUT_S = 1800.0
MAX_REQUIREMENTS_BYTES = 1024 * 1024
MAX_MESSAGE_CHARS = 800
LOGS = "logs"  # <root>/logs/<request hash>.log: each build's log (kept when the build fails)


class EnvError(Exception):
    """An environment cannot be resolved or built; the message names what failed (the installer's words)."""


@dataclass(frozen=True)
class EnvRequest:
    """What an API asks for, as written: a requirements file's text and extra requirement strings."""

    requirements: str  # the requirements file's text ("" when none)
    requirements_path: str | None  # where it was read (for -r/-e lines relative to it)
    packages: tuple[str, ...]
    version: str | None

    @property
    def digest(self) -> str:
        """The hash of the request as written (not resolved): names its build log."""
        data = json.dumps([self.requirements, self.packages, self.version, python_tag()])
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def input_text(self) -> str:
        """What `uv pip compile` reads: the file by its path (its own -r/-c lines are relative to it)."""
        lines = [f"-r {self.requirements_path}"] if self.requirements_path else []
        return "\n".join([*lines, *self.packages]) + "\n"


@dataclass(frozen=True)
class EnvInfo:
    """One environment on disk."""

    key: str
    path: Path
    complete: bool
    size_bytes: int
    last_used: float
    created_at: float | None = None
    build_s: float | None = None
    requirements: tuple[str, ...] = ()


def request_of(spec: PythonEnvSpec, project_dir: str | Path) -> EnvRequest:
    """The request of a `python:` section, its requirements file read from inside `project_dir`."""
    text, where = "", None
    if spec.requirements is not None:
        root = Path(project_dir).resolve()
        path = (root / spec.requirements).resolve()
        if not path.is_relative_to(root):
            raise EnvError(f"python.requirements {spec.requirements!r} is outside the project directory")
        try:
            if path.stat().st_size > MAX_REQUIREMENTS_BYTES:
                raise EnvError(f"python.requirements {spec.requirements!r} is over {MAX_REQUIREMENTS_BYTES} bytes")
            text = path.read_text()
        except OSError as exc:
            raise EnvError(f"python.requirements {spec.requirements!r} cannot be read: {exc.strerror}") from None
        where = str(path)
    return EnvRequest(text, where, tuple(spec.packages), spec.version)


def python_tag() -> str:
    """The interpreter environments are built for: the daemon's (implementation, version, platform)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"{sys.implementation.name}-{version}-{sys.platform}-{platform.machine()}"


def host_sites() -> list[str]:
    """The daemon's site-packages directories, appended to every environment's path."""
    return [p for p in site.getsitepackages() if Path(p).is_dir()]


def check_version(version: str | None) -> None:
    """An environment's Python is the daemon's: a `version` naming another is refused, saying so."""
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    if version is not None and version not in (ours, f"{ours}.{sys.version_info.micro}"):
        raise EnvError(
            f"python.version {version} is not the daemon's Python ({ours}): an environment reuses the daemon's "
            f"compiled packages, so it runs the daemon's version; leave `version` out or run a {version} daemon"
        )


def env_key(resolved: str, tag: str | None = None, sites: Sequence[str] | None = None) -> str:
    """The cache key of an environment: its resolved pins, the Python it is for and the host sites it uses."""
    pins = sorted(line.strip() for line in resolved.splitlines() if line.strip() and not line.startswith("#"))
    data = json.dumps([ENV_FORMAT, pins, tag or python_tag(), list(host_sites() if sites is None else sites)])
    return hashlib.sha256(data.encode()).hexdigest()[:24]


def uv_bin() -> str:
    """The uv executable (the PyPI package `uv`, a dependency of Cirrus)."""
    try:
        from uv import find_uv_bin
    except ImportError:
        found = shutil.which("uv")
        if found is None:
            raise EnvError("uv is not installed: `pip install uv`") from None
        return found
    return str(find_uv_bin())


def installer_message(output: str) -> str:
    """The part of uv's output that says what failed (its `error:` lines and their causes)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    picked = lines[start:] if start is not None else lines[-6:]
    text = ": ".join(line.removeprefix("error: ").removeprefix("cause: ").rstrip(":") for line in picked)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def _run(args: list[str], log_file: Path, timeout_s: float, what: str, cwd: str | None = None) -> str:
    """Run uv, appending its output to the build log; EnvError with its message when it fails."""
    env = {**os.environ, "NO_COLOR": "1", "UV_NO_PROGRESS": "1"}
    env.pop("VIRTUAL_ENV", None)
    with log_file.open("a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        try:
            done = subprocess.run(
                args, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=cwd, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            out.write(f"timed out after {timeout_s:g}s\n")
            raise EnvError(f"{what} timed out after {timeout_s:g}s (see {log_file})") from None
        out.write(done.stderr)
        out.write(f"exit status {done.returncode}\n")
    if done.returncode != 0:
        raise EnvError(f"{what} failed: {installer_message(done.stderr)}")
    return done.stdout


def resolve(request: EnvRequest, work_dir: Path, log_file: Path) -> str:
    """The exact pins of `request` (`uv pip compile`), for the daemon's Python."""
    check_version(request.version)
    work_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=work_dir, prefix=f"request-{request.digest}-", suffix=".in")
    with os.fdopen(fd, "w") as source_file:
        source_file.write(request.input_text())
    source = Path(name)
    cwd = str(Path(request.requirements_path).parent) if request.requirements_path else None
    args = [uv_bin(), "pip", "compile", str(source), "--python", sys.executable, "--no-header", "--no-annotate"]
    args += ["--color", "never", "--quiet"]
    try:
        out = _run(args, log_file, RESOLVE_TIMEOUT_S, "resolving the requirements", cwd)
    finally:
        source.unlink(missing_ok=True)
    return "".join(line + "\n" for line in out.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def python_of(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def is_complete(env_dir: Path) -> bool:
    return (env_dir / MARKER).is_file()


def touch(env_dir: Path) -> None:
    (env_dir / LAST_USED).touch()


def _site_packages(env_dir: Path) -> Path:
    found = sorted((env_dir / "lib").glob("python*/site-packages"))
    if not found:
        raise EnvError(f"the environment {env_dir} has no site-packages")
    return found[0]


def build(root: Path, key: str, resolved: str, log_file: Path) -> Path:
    """The environment `key` under `root`, built from the pins `resolved` unless it is complete already.

    A leftover without its marker is removed and built again; the marker is written last."""
    env_dir = root / key
    if is_complete(env_dir):
        touch(env_dir)
        return env_dir
    if env_dir.exists():
        shutil.rmtree(env_dir)
    started = time.monotonic()
    pins = root / f".{key}.txt"
    pins.write_text(resolved)
    try:
        uv = uv_bin()
        _run(
            [uv, "venv", str(env_dir), "--python", sys.executable, "--color", "never", "--quiet"],
            log_file,
            RESOLVE_TIMEOUT_S,
            "creating the environment",
        )
        python = str(python_of(env_dir))
        _run(
            [uv, "pip", "sync", str(pins), "--python", python, "--color", "never"],
            log_file,
            INSTALL_TIMEOUT_S,
            "installing the requirements",
        )
        lines = "".join(f"import site; site.addsitedir({path!r})\n" for path in host_sites())
        (_site_packages(env_dir) / PTH_NAME).write_text(lines)
        (env_dir / "requirements.txt").write_text(resolved)
        shutil.copyfile(log_file, env_dir / "build.log")
        meta = {
            "format": ENV_FORMAT,
            "key": key,
            "python": python_tag(),
            "created_at": time.time(),
            "build_s": round(time.monotonic() - started, 3),
            "requirements": resolved.splitlines(),
        }
        touch(env_dir)
        tmp = env_dir / (MARKER + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, env_dir / MARKER)
    except BaseException:
        shutil.rmtree(env_dir, ignore_errors=True)
        raise
    finally:
        pins.unlink(missing_ok=True)
    return env_dir


def dir_size(path: Path) -> int:
    """Bytes on disk under `path` (each inode counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def _info(env_dir: Path) -> EnvInfo:
    complete = is_complete(env_dir)
    meta: dict[str, object] = {}
    if complete:
        try:
            meta = json.loads((env_dir / MARKER).read_text())
        except (OSError, ValueError):
            complete = False
    try:
        last_used = (env_dir / LAST_USED).stat().st_mtime
    except OSError:
        last_used = env_dir.stat().st_mtime
    created = meta.get("created_at")
    build_s = meta.get("build_s")
    reqs = meta.get("requirements")
    return EnvInfo(
        key=env_dir.name,
        path=env_dir,
        complete=complete,
        size_bytes=dir_size(env_dir),
        last_used=last_used,
        created_at=float(created) if isinstance(created, int | float) else None,
        build_s=float(build_s) if isinstance(build_s, int | float) else None,
        requirements=tuple(str(r) for r in reqs) if isinstance(reqs, list) else (),
    )


def list_envs(root: Path) -> list[EnvInfo]:
    """Every environment directory under `root` (complete or not), most recently used first."""
    if not root.is_dir():
        return []
    found = [_info(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != LOGS]
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def choose_evictions(envs: Iterable[EnvInfo], in_use: set[str], max_bytes: int) -> list[EnvInfo]:
    """Which environments to remove so the complete ones fit in `max_bytes`: least recently used
    first, never one whose key is in `in_use` (what remains may still be over the budget then)."""
    complete = [e for e in envs if e.complete]
    total = sum(e.size_bytes for e in complete)
    chosen = []
    for env in sorted(complete, key=lambda e: e.last_used):
        if total <= max_bytes:
            break
        if env.key in in_use:
            continue
        chosen.append(env)
        total -= env.size_bytes
    return chosen


def remove(env: EnvInfo) -> None:
    """Remove an environment: its marker first, so a half-removed one is never taken for complete."""
    (env.path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(env.path, ignore_errors=True)
