"""Batching on the event loop: what callers submit while one batch is being handled becomes the next
batch, handed over whole (group commit for writes, one query for many reads). The first caller of a
quiet moment is handled at once; under load, batches grow by themselves with the load."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
# A batch: each item with the future its caller awaits. The handler settles every future.
Batch = list[tuple[Item, "asyncio.Future[Result]"]]


class Batches(Generic[Item, Result]):
    def __init__(
        self,
        handle: Callable[[Batch[Item, Result]], Awaitable[None]],
        *,
        max_batch: int,
        name: str,
        gather: float = 0.0,
    ) -> None:
        self._handle = handle
        self._max_batch = max_batch
        self._name = name
        self._gather = gather  # seconds the first caller of a quiet moment waits for company
        self._waiting: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._handling: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._handling is None or self._handling.done():
            self._handling = asyncio.create_task(self._handle_batches(), name=self._name)
        return await future

    async def _handle_batches(self) -> None:
        if self._gather:
            await asyncio.sleep(self._gather)
        while self._waiting:
            batch: Batch[Item, Result] = []
            while self._waiting and len(batch) < self._max_batch:
                item, future = self._waiting.popleft()
                if not future.done():  # the caller left before its turn: nothing to do for it
                    batch.append((item, future))
            if not batch:
                continue
            try:
                await self._handle(batch)
            except Exception as error:  # a handler's bug must not leave its callers waiting for ever
                settle_with_error(batch, error)


def settle_with_error(batch: Batch[Item, Result], error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
