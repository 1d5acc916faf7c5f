"""`kind: batch`: no requests of its own; a submitted job's workers (one at a time per API) pull the
job's batches through `predict_batch`. The running job, not the autoscaler, sets the replicas."""

from __future__ import annotations

from typing import ClassVar

from cirrus.kinds.base import Kind, KindHost, Wanted


class BatchKind(Kind):
    name: ClassVar[str] = "batch"
    takes_predictions: ClassVar[bool] = False
    model_paths: ClassVar[bool] = False
    autoscaled: ClassVar[bool] = False
    proves_load: ClassVar[bool] = False  # its workers need a job to start
    runs_jobs: ClassVar[bool] = True

    def wanted(self, host: KindHost, api: str, autoscaled: int, reason: str) -> Wanted:
        running = host.running_job(api)
        if running is None:
            return Wanted(0, "no job running")
        job, workers = running
        return Wanted(workers, f"job {job}: {workers} workers", job)

    def idle_message(self, api: str) -> str:
        return f"no job running; start one with `cirrus jobs submit {api}`"

    def no_predictions_hint(self, api: str) -> str:
        return f"{api} is a batch API: submit a job: cirrus jobs submit {api}"
