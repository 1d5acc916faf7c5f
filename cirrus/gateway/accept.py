"""Accepting async requests: group commit of many concurrent submits into one store transaction.

Each `submit` returns once its request is durable. While one transaction is being written, new
requests gather; the next transaction takes all of them (up to `max_batch`), so the accept rate
grows with concurrency instead of being bound by one commit per request.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from cirrus.store.base import NewRequest, QueueStore

MAX_WAITING = 10_000  # accepts waiting for the writer; past it, the gateway answers 503


class AcceptQueueFull(Exception):
    """Too many accepts wait for the writer, or the gateway is shutting down."""


class Acceptor:
    def __init__(self, store: QueueStore, max_batch: int = 256) -> None:
        self.store = store
        self.max_batch = max_batch
        self._waiting: list[tuple[NewRequest, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cirrus-accept")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def submit(self, request: NewRequest) -> None:
        if self._closing or len(self._waiting) >= MAX_WAITING:
            raise AcceptQueueFull
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._write_loop())
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        self._wakeup.set()
        await future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing or self._waiting:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
                requests = [request for request, _ in batch]
                try:
                    await loop.run_in_executor(self._writer, self.store.submit_many, requests, time.time())
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop accepting; write (and acknowledge) what is already waiting, then stop the writer."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except TimeoutError:
                for _, future in self._waiting:
                    if not future.done():
                        future.set_exception(AcceptQueueFull())
        self._writer.shutdown(wait=True)
