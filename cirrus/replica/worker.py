"""An async API's replica pulls its work from the queue store instead of being sent it.

It leases up to `max_concurrency` requests at a time, runs each through the same request path as a
realtime request (pre_predict, slot, predict, post_predict), renews its leases while they run,
and records each outcome: 2xx/3xx completes the request; 4xx fails it at once (retrying cannot
help); 5xx and timeouts fail this attempt, and the store retries it until `max_attempts`.
A replica killed mid-request loses its leases, which expire and go back to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from cirrus.replica.server import RequestHandler
from cirrus.replica.streaming import StreamSource
from cirrus.store.base import Lease, QueueStore
from cirrus.store.view import describe
from cirrus.wire import InferRequest, JobConfig, QueueConfig

log = logging.getLogger("cirrus.replica")
IDLE_POLL_S = (0.02, 0.5)  # poll interval when the queue is empty: from, backing off to
WEBHOOK_DELAYS_S = (0.0, 1.0, 5.0, 30.0)
WEBHOOK_TIMEOUT_S = 10.0


def _error_text(body: bytes) -> str:
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body.decode("utf-8", "replace")[:1000]
    if isinstance(decoded, dict) and "error" in decoded:
        return str(decoded["error"])
    return str(decoded)[:1000]


async def _post(http: Any, target: Any, payload: bytes) -> Any:
    """POST to the first of the target's checked addresses that accepts a connection."""
    import httpx

    headers = {**target.headers, "content-type": "application/json"}
    *others, last = target.addresses
    for address in others:
        try:
            url = target.url_for(address)
            return await http.post(url, content=payload, headers=headers, extensions=target.extensions)
        except httpx.ConnectError:
            continue
    return await http.post(target.url_for(last), content=payload, headers=headers, extensions=target.extensions)


class QueueWorker:
    def __init__(self, handler: RequestHandler, store: QueueStore, api: str, worker: str, config: QueueConfig) -> None:
        self.handler = handler
        self.store = store
        self.api = api
        self.worker = worker
        self.config = config
        self.queue = config.queue_name or api  # a batch job's workers pull from the job's own queue
        self.leases: dict[str, Lease] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cirrus-queue")

    async def _store(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def run(self, stop: asyncio.Event) -> None:
        renewer = asyncio.get_running_loop().create_task(self._renew_loop(stop))
        idle = IDLE_POLL_S[0]
        try:
            while not stop.is_set():
                free = self.config.max_concurrency - len(self.leases)
                leases: list[Lease] = []
                if free > 0:
                    try:
                        leases = await self._store(
                            self.store.lease, self.queue, self.worker, free, self.config.lease_s, time.time()
                        )
                    except Exception:
                        log.exception("leasing work from the queue store failed")
                for lease in leases:
                    self.leases[lease.id] = lease
                    task = asyncio.get_running_loop().create_task(self._work(lease))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                idle = IDLE_POLL_S[0] if leases else min(idle * 2, IDLE_POLL_S[1])
                try:
                    await asyncio.wait_for(stop.wait(), timeout=idle if free > 0 else IDLE_POLL_S[0])
                except TimeoutError:
                    pass
        finally:
            if self.tasks:  # finish what was leased; whatever does not finish goes back when its lease expires
                await asyncio.wait(self.tasks, timeout=self.config.timeout_s)
            renewer.cancel()
            self._io.shutdown(wait=False)

    async def _renew_loop(self, stop: asyncio.Event) -> None:
        period = max(0.2, self.config.lease_s / 3)
        while True:
            await asyncio.sleep(period)
            if not self.leases:
                continue
            try:
                lost = await self._store(self.store.renew, list(self.leases.values()), self.config.lease_s, time.time())
            except Exception:
                log.exception("renewing leases failed")
                continue
            for request_id in lost:
                log.warning("request %s: lease lost (it will be delivered again elsewhere)", request_id)

    async def _work(self, lease: Lease) -> None:
        if self.config.job is not None:
            await self._work_job(lease, self.config.job)
            return
        try:
            request = InferRequest(
                id=0,
                request_id=lease.id,
                body=lease.body,
                content_type=lease.content_type,
                query_string=lease.query_string,
                headers=lease.headers,
                timeout_s=self.config.timeout_s,
            )
            reply, call, result = await self.handler.handle(request)
            if isinstance(reply, StreamSource):
                await self._store(
                    self.store.fail, lease, "a streaming predictor needs a realtime API", False, time.time()
                )
                return
            now = time.time()
            if reply.status < 400:
                recorded = await self._store(
                    self.store.complete, lease, reply.body, reply.content_type, reply.status, now
                )
            else:
                retry = reply.status >= 500
                recorded = await self._store(self.store.fail, lease, _error_text(reply.body), retry, now)
            if not recorded:
                log.warning("request %s: finished after its lease was lost; the result is discarded", lease.id)
                return
            if call is not None:
                self.handler.after_reply(call, result)
            if lease.webhook:
                task = asyncio.get_running_loop().create_task(self._notify(lease))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except Exception:
            log.exception("request %s: recording its outcome failed", lease.id)
        finally:
            self.leases.pop(lease.id, None)

    async def _work_job(self, lease: Lease, job: JobConfig) -> None:
        """A batch of a job (results to the sink, then complete), or the job's final hook."""
        from cirrus.jobs import HOOK_ID
        from cirrus.replica.job import BatchFailed, run_batch, run_hook

        handler = self.handler
        try:
            try:
                if lease.id == HOOK_ID:
                    await run_hook(handler.predictor, handler.slots, lease.body, self.config.timeout_s)
                else:
                    await run_batch(handler.predictor, handler.slots, job, lease.body, self.config.timeout_s, self._io)
            except BatchFailed as exc:
                log.warning("job %s, %s (attempt %d): %s", job.job_id, lease.id, lease.attempt, exc)
                await self._store(self.store.fail, lease, str(exc), exc.retry, time.time())
                return
            if not await self._store(self.store.complete, lease, b"", "application/json", 200, time.time()):
                log.warning("job %s, %s: finished after its lease was lost", job.job_id, lease.id)
        except Exception:
            log.exception("job %s, %s: recording its outcome failed", job.job_id, lease.id)
        finally:
            self.leases.pop(lease.id, None)

    async def _notify(self, lease: Lease) -> None:
        """POST the request's final state to its webhook, with retries (best effort), and record how
        that ended on the request (`webhook_result`). The API's policy is checked again here, and the
        host resolved and its addresses checked before every try (cirrus/webhooks.py)."""
        import httpx

        from cirrus.webhooks import WebhookRefused, resolve

        record = await self._store(self.store.get, lease.api, lease.id)
        if record is None or record.status.value in ("in_queue", "in_progress") or lease.webhook is None:
            return
        url = lease.webhook
        policy = self.config.webhooks
        payload = msgspec.json.encode(describe(record))
        outcome = f"gave up after {len(WEBHOOK_DELAYS_S)} tries"
        async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S, follow_redirects=False, trust_env=False) as http:
            for delay in WEBHOOK_DELAYS_S:
                await asyncio.sleep(delay)
                try:
                    if policy is None:
                        raise WebhookRefused("this API does not send webhooks (its spec has no queue.webhooks)")
                    target = await resolve(url, policy.allowed_hosts, policy.allow_private)
                    response = await _post(http, target, payload)
                except WebhookRefused as exc:
                    log.warning("request %s: webhook refused: %s", lease.id, exc)
                    outcome = f"refused: {exc}"
                    break
                except (httpx.HTTPError, OSError) as exc:
                    log.warning("webhook %s failed: %s", url, exc)
                    outcome = f"gave up after {len(WEBHOOK_DELAYS_S)} tries: {type(exc).__name__}: {exc}"
                    continue
                if response.status_code < 500:
                    outcome = f"delivered: HTTP {response.status_code}"
                    break
                log.warning("webhook %s answered %d", url, response.status_code)
                outcome = f"gave up after {len(WEBHOOK_DELAYS_S)} tries: HTTP {response.status_code}"
            else:
                log.error("request %s: gave up on its webhook %s", lease.id, url)
        try:
            await self._store(self.store.record_webhook, lease.api, lease.id, outcome)
        except Exception:
            log.exception("request %s: recording its webhook's outcome failed", lease.id)
