"""`cirrus serve PATH` reloads: an edit under the spec's directory rolls out a new revision.

The spec's directory is watched (watchfiles). Changes to what a snapshot leaves out (.cirrusignore,
and `snapshots.ALWAYS_IGNORED`) are ignored; a burst of writes is one reload once it settles. A
reload is `cirrus deploy` done in the daemon: the spec is read again, the directory snapshotted,
and the controller's rolling update replaces the replicas (requests in flight finish on the old
ones). A spec error, or a revision whose replicas cannot start (an import error), is logged and the
serving revision keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cirrus.types import ApiStatusName

if TYPE_CHECKING:
    from pathspec import GitIgnoreSpec
    from watchfiles import Change

    from cirrus.control.controller import Controller
    from cirrus.spec import Deployment

log = logging.getLogger("cirrus.reload")
SETTLE_MS = 300  # a burst of writes ends after this long without another ...
BURST_MAX_MS = 3000  # ... or after this long at most
ROLLOUT_POLL_S = 0.2  # how often a reload's rollout is checked, to report how it ended
ROLLOUT_REPORT_S = 600.0  # how long a rollout is followed before the reloader stops reporting on it


def changed_files(
    root: Path, changes: Iterable[tuple[Change, str]], ignore: GitIgnoreSpec, state_dir: Path | None = None
) -> list[str]:
    """The root-relative names, sorted, of the changed paths that a snapshot of `root` would pack (the
    spec file among them); `ignore` is `snapshots.ignore_spec(root)`. A file both added and deleted
    within the burst (an editor's or `sed -i`'s temporary file) is no change, nor is one under the
    daemon's `state_dir` (were it inside the project, its own writes would reload it forever)."""
    from watchfiles import Change

    kinds: dict[str, set[Change]] = {}
    for change, path in changes:
        kinds.setdefault(path, set()).add(change)
    names = set()
    for path, seen in kinds.items():
        if {Change.added, Change.deleted} <= seen and not os.path.lexists(path):
            continue
        if state_dir is not None and Path(path).is_relative_to(state_dir):
            continue
        try:
            name = Path(path).relative_to(root).as_posix()
        except ValueError:
            continue
        if name in ("", ".") or ignore.match_file(name) or ignore.match_file(name + "/"):
            continue
        names.add(name)
    return sorted(names)


class Reloader:
    """Watches the directory of the spec at `path` and deploys it again through `controller` on a change
    (except under `state_dir`, the daemon's state directory)."""

    def __init__(self, controller: Controller, path: str, state_dir: Path | None = None) -> None:
        from cirrus.spec import find_spec_file

        self.controller = controller
        self.state_dir = state_dir.resolve() if state_dir is not None else None
        self.spec_file = find_spec_file(path).resolve()
        self.root = self.spec_file.parent
        self._reports: dict[str, asyncio.Task[None]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Reload on each settled burst of changes until `stop` is set (or the task is cancelled)."""
        from watchfiles import awatch

        from cirrus.snapshots import SnapshotError, ignore_spec

        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # a line per change otherwise
        log.info("watching %s for changes", self.root)
        try:
            async for changes in awatch(
                self.root, watch_filter=None, debounce=BURST_MAX_MS, step=SETTLE_MS, stop_event=stop
            ):
                try:
                    ignore = ignore_spec(self.root)
                except SnapshotError as exc:
                    log.error("reload skipped: %s; the serving revisions keep serving", exc)
                    continue
                files = changed_files(self.root, changes, ignore, self.state_dir)
                if files:
                    await self.reload(files)
        finally:
            for task in self._reports.values():
                task.cancel()

    async def reload(self, files: list[str]) -> None:
        """Deploy the spec again, as `cirrus deploy` would; log what changed and the revisions it made."""
        log.info("changed: %s; reloading", ", ".join(files))
        try:
            deployments = await asyncio.get_running_loop().run_in_executor(None, self._snapshotted)
            results = self.controller.deploy(deployments)
        except (ValueError, OSError) as exc:  # SpecError, SnapshotError, DeployRefused are ValueErrors
            log.error("reload failed, the serving revisions keep serving: %s", exc)
            return
        for result in results:
            if result.action == "unchanged":
                log.info("API %s: nothing to deploy, revision %d keeps serving", result.name, result.revision)
            elif result.action == "scaled":
                log.info("API %s: new scale settings applied to revision %d", result.name, result.revision)
            else:
                log.info("API %s: revision %d %s, rolling out", result.name, result.revision, result.action)
                previous = self._reports.pop(result.name, None)
                if previous is not None:
                    previous.cancel()
                self._reports[result.name] = asyncio.create_task(self._report(result.name, result.revision))

    def _snapshotted(self) -> list[Deployment]:
        """The spec's deployments read again, each with a snapshot of its directory (run in a thread)."""
        from cirrus.spec import load_deployments

        deployments = load_deployments(self.spec_file)
        return [self.controller.snapshot(d, self.spec_file.name) for d in deployments]

    async def _report(self, name: str, revision: int) -> None:
        """Log whether `revision` of API `name` came to serve, or why it failed (the older one serving on)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ROLLOUT_REPORT_S
        while loop.time() < deadline:
            status = self.controller.status(name)
            if status is None or status.revision > revision:
                return  # deleted, or a newer reload took over
            if status.revision == revision and status.status == ApiStatusName.LIVE:
                log.info("API %s: revision %d serves", name, revision)
                return
            if status.revision == revision and status.status == ApiStatusName.ERROR:
                errors = [r.last_error for r in status.replicas if r.revision == revision and r.last_error]
                reason = status.message or (errors[-1] if errors else f"no reason given (see `cirrus logs {name}`)")
                log.error("API %s: revision %d failed to start: %s", name, revision, reason)
                return
            await asyncio.sleep(ROLLOUT_POLL_S)
        log.warning("API %s: revision %d is not serving after %.0fs", name, revision, ROLLOUT_REPORT_S)
