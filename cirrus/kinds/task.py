"""`kind: task`: no requests of its own; each `cirrus tasks submit` is one run, to completion, on a
replica of its own that the task runner (cirrus/control/tasks.py) starts, watches and retries. The
controller's fleet of the API stays at zero replicas."""

from __future__ import annotations

from typing import ClassVar

from cirrus.kinds.base import Kind, KindHost, Wanted


class TaskKind(Kind):
    name: ClassVar[str] = "task"
    takes_predictions: ClassVar[bool] = False
    model_paths: ClassVar[bool] = False
    autoscaled: ClassVar[bool] = False
    proves_load: ClassVar[bool] = False  # a run is the proof
    forks: ClassVar[bool] = False

    def wanted(self, host: KindHost, api: str, autoscaled: int, reason: str) -> Wanted:
        return Wanted(0, "runs start with `cirrus tasks submit`")

    def idle_message(self, api: str) -> str:
        return f"a task API; run it with `cirrus tasks submit {api}`"

    def no_predictions_hint(self, api: str) -> str:
        return f"{api} is a task API: submit a run: cirrus tasks submit {api}"
