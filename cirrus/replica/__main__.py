"""`python -m cirrus.replica --launch JSON --status-fd N`: one replica process.

Loads the predictor once, listens, then reports `ReplicaReady` (or `ReplicaFailed`) on the status
pipe. SIGTERM stops accepting, lets requests in flight and `post_predict` hooks finish, and exits.
The replica also exits when its parent (the daemon, or the template it was forked from) is gone.
A template (`python -m cirrus.replica.template`) runs the same `run_replica` in each forked child.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
import traceback

from cirrus.loop import run_loop
from cirrus.predictor import load_predictor, openapi_document
from cirrus.replica import report_startup
from cirrus.replica.server import ReplicaProtocol, RequestHandler
from cirrus.wire import ReplicaFailed, ReplicaLaunch, ReplicaReady, decode_launch

log = logging.getLogger("cirrus.replica")
DRAIN_GRACE_S = 30.0
STUCK_EXIT_S = 10.0  # every slot stuck in a timed-out predict this long: exit so the replica is restarted
EXIT_STUCK = 3
MIN_SECRET_BYTES = 16


async def _listen(
    launch: ReplicaLaunch, handler: RequestHandler, connections: set[ReplicaProtocol]
) -> tuple[asyncio.AbstractServer, str]:
    loop = asyncio.get_running_loop()

    def factory() -> ReplicaProtocol:
        return ReplicaProtocol(handler, launch.replica_id, connections, launch.secret)

    scheme, _, rest = launch.listen.partition(":")
    if scheme == "unix":
        server = await loop.create_unix_server(factory, rest)
        return server, f"unix:{rest}"
    host, _, port = rest.rpartition(":")
    server = await loop.create_server(factory, host, int(port))
    bound = server.sockets[0].getsockname()
    return server, f"tcp:{bound[0]}:{bound[1]}"


async def serve(launch: ReplicaLaunch, status_fd: int) -> int:
    parent = os.getppid()
    started = time.perf_counter()
    if len(launch.secret) < MIN_SECRET_BYTES:  # anyone could then use the replica's socket
        report_startup(status_fd, ReplicaFailed(error=f"launched without a secret of {MIN_SECRET_BYTES} bytes or more"))
        return 1
    try:
        predictor = load_predictor(
            launch.project_dir,
            launch.predictor_path,
            launch.class_name,
            launch.config,
            batching=launch.batching is not None,
            batch_job=launch.queue is not None and launch.queue.job is not None,
            models=launch.models,
            multi_model=launch.model_cache_size is not None,
            protocol=launch.protocol,
        )
        openapi = openapi_document(launch.api, predictor)
        if launch.protocol == "v2":  # the tensors its predictor declares, where the spec declares none
            from cirrus.replica.v2 import declare

            launch, openapi = declare(launch, predictor, openapi)
    except BaseException as exc:
        log.error("the predictor failed to load:\n%s", traceback.format_exc())
        report_startup(status_fd, ReplicaFailed(error=f"{type(exc).__name__}: {exc}"))
        return 1
    load_s = time.perf_counter() - started
    models = None
    if launch.model_cache_size is not None:  # a multi-model API: models load on first use, LRU-evicted
        from cirrus.models.lru import ModelLRU

        models = ModelLRU(
            predictor.load_model,
            launch.models,
            launch.model_cache_size,
            predictor.unload_model,
            versions=launch.model_versions,
        )
    handler = RequestHandler(predictor, launch.inference_slots, launch.batching, models, launch.debug_errors)
    handler.launch = launch  # (a standard protocol's requests need the API's name and declared tensors)
    connections: set[ReplicaProtocol] = set()
    server, address = await _listen(launch, handler, connections)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    worker_task = None
    if launch.queue is not None:  # an async API or a batch job: pull work from the queue store
        from cirrus.replica.worker import QueueWorker
        from cirrus.store import open_store

        store = open_store(launch.queue.store_url)
        worker = QueueWorker(handler, store, launch.api, launch.replica_id, launch.queue)
        worker_task = loop.create_task(worker.run(stop))
    log.info("replica %s of %s ready at %s (loaded in %.2fs)", launch.replica_id, launch.api, address, load_s)
    report_startup(status_fd, ReplicaReady(address=address, pid=os.getpid(), load_s=load_s, openapi=openapi))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            if os.getppid() != parent:
                log.warning("its parent process (pid %d, the daemon or the template) is gone; exiting", parent)
                break
            stuck = handler.slots.all_stuck_for(time.monotonic())
            if stuck > STUCK_EXIT_S:
                log.error(
                    "every inference slot has been stuck in predict for %.0fs past its request's timeout; "
                    "exiting so that the replica is restarted",
                    stuck,
                )
                return EXIT_STUCK
    stop.set()
    server.close()
    if worker_task is not None:
        await worker_task
    pending = {t for c in connections for t in c.tasks} | handler.background
    if pending:
        log.info("draining %d requests and hooks", len(pending))
        await asyncio.wait(pending, timeout=DRAIN_GRACE_S)
    handler.slots.shutdown()
    return 0


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)


def run_replica(launch: ReplicaLaunch, status_fd: int) -> int:
    """Serve until told to stop; the exit code. The one serve path of a fresh replica process and
    of one forked from a template (`cirrus.replica.template`)."""
    configure_logging()
    if launch.task is not None:  # kind task: one run, then exit (0: succeeded)
        from cirrus.replica.task_run import run_task

        return run_task(launch, status_fd)
    if launch.server is not None:  # kind server: the API's own web app instead of a predictor
        from cirrus.replica.app_server import serve_app

        code = run_loop(serve_app(launch, status_fd, report_startup))
    else:
        code = run_loop(serve(launch, status_fd))
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cirrus.replica")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--launch", help="ReplicaLaunch as JSON (visible to other users in `ps`: prefer --launch-fd)")
    source.add_argument("--launch-fd", type=int, help="read the ReplicaLaunch JSON from this descriptor (to its end)")
    parser.add_argument("--status-fd", type=int, default=-1)
    args = parser.parse_args()
    if args.launch_fd is not None:
        with os.fdopen(args.launch_fd, "rb") as launch_file:
            text = launch_file.read().decode()
    else:
        text = args.launch
    os._exit(run_replica(decode_launch(text), args.status_fd))


if __name__ == "__main__":
    main()
