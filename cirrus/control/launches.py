"""What a replica of a revision is started with: its `ReplicaLaunch` and environment variables.

A pure function of the stored revision and the facts the controller passes in (where its code
lives, the queue it pulls from, the models fetched), so every path that starts a replica (the
controller's fleet, templates, task runs) builds the same launch.
"""

from __future__ import annotations

import secrets
from typing import Any

from cirrus.control.store import StoredApi
from cirrus.spec import ProtocolSpec
from cirrus.wire import BatchConfig, QueueConfig, ReplicaLaunch, ServerLaunch, TaskLaunch, TensorDecl


def declared_tensors(protocol: ProtocolSpec | None, which: str) -> list[TensorDecl]:
    """A `protocol: v2` API's declared `inputs` or `outputs`, for its replicas' launch."""
    return [TensorDecl(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in getattr(protocol, which, [])]


def build_launch(
    stored: StoredApi,
    replica_id: str,
    code_dir: str,
    debug_errors: bool,
    queue: QueueConfig | None = None,
    config: dict[str, Any] | None = None,
    models: dict[str, str] | None = None,
    python: str | None = None,
    task: TaskLaunch | None = None,
) -> tuple[ReplicaLaunch, dict[str, str]]:
    """The launch of replica `replica_id` of `stored` and its extra environment variables.

    `code_dir`: where the revision's code is unpacked; `debug_errors`: the default when the spec does
    not say; `queue`: where it pulls work from (async APIs, job workers); `config`: overrides of the
    predictor's config (a job's); `models`: the API's models, fetched (name -> local path); `python`:
    the interpreter of the API's own environment (None: the runtime's); `task`: a task API's run."""
    spec = stored.deployment.spec
    predictor = spec.predictor  # None: a server API, or a task API that runs a command
    env = dict(predictor.env) if predictor else {}
    server = None
    if spec.server is not None:
        readiness = spec.server.readiness
        server = ServerLaunch(
            app=spec.server.app,
            command=spec.server.command,
            root_path=f"/{stored.name}",
            readiness_path=readiness.path,
            readiness_timeout_s=readiness.timeout_s,
            readiness_period_s=readiness.period_s,
            failure_threshold=readiness.failure_threshold,
        )
        env.update(spec.server.env)
    if spec.task is not None:
        env.update(spec.task.env)
    launch = ReplicaLaunch(
        api=stored.name,
        replica_id=replica_id,
        revision=stored.revision,
        project_dir=code_dir,
        snapshot=stored.deployment.snapshot,
        predictor_path=predictor.path if predictor else "",
        class_name=predictor.class_name if predictor else "",
        config={**(predictor.config if predictor else {}), **(config or {})},
        inference_slots=spec.concurrency.inference_slots,
        secret=secrets.token_bytes(32),
        debug_errors=debug_errors if spec.debug_errors is None else spec.debug_errors,
        batching=None
        if spec.batching is None
        else BatchConfig(
            max_batch_size=spec.batching.max_batch_size,
            max_wait_s=spec.batching.max_wait_ms / 1000,
            mode=spec.batching.mode,
            max_queue=spec.concurrency.max_concurrency,
        ),
        queue=queue,
        models=models or {},
        model_cache_size=None if spec.multi_model is None else spec.multi_model.cache_size,
        model_versions={m.name: m.version for m in spec.models if m.version is not None},
        model_urls={m.name: m.path for m in spec.models if m.is_url},
        protocol=None if spec.protocol is None else spec.protocol.name,
        tensor_inputs=declared_tensors(spec.protocol, "inputs"),
        tensor_outputs=declared_tensors(spec.protocol, "outputs"),
        python=python,
        server=server,
        task=task,
    )
    return launch, {**env, "CIRRUS_API": stored.name, "CIRRUS_REPLICA_ID": replica_id}
