"""Open SMTP client connections, kept for reuse and capped per destination.

A destination is the relay, or one recipient domain. At most ``per_destination`` connections to it
are open at once, busy or idle: several messages to one destination reuse one connection in turn,
and no destination is flooded with parallel sessions. Idle connections are closed after
``idle_seconds`` (Postfix keeps its connection cache for 2 s by default; a queue draining a burst
wants a little longer).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from poweremail.delivery.outbound import Hop, OutboundConnection


@dataclass
class _Destination:
    slots: asyncio.Semaphore
    idle: list[OutboundConnection] = field(default_factory=list)


class ConnectionPool:
    def __init__(self, *, per_destination: int, idle_seconds: float = 10.0) -> None:
        self._per_destination = per_destination
        self._idle_seconds = idle_seconds
        self._destinations: dict[str, _Destination] = {}

    def _destination(self, key: str) -> _Destination:
        destination = self._destinations.get(key)
        if destination is None:
            destination = _Destination(asyncio.Semaphore(self._per_destination))
            self._destinations[key] = destination
        return destination

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        """Hold one of the destination's connection slots for a transaction."""
        async with self._destination(key).slots:
            yield

    async def take(self, key: str, hop: Hop) -> OutboundConnection | None:
        """An idle open connection to ``hop``, if there is one. Call while holding a slot.

        Otherwise an idle connection to another of the destination's hosts is closed, as a new one is
        about to be opened in its place: open connections (busy + idle) never exceed the cap.
        """
        destination = self._destination(key)
        for index, connection in enumerate(destination.idle):
            if connection.hop == hop:
                del destination.idle[index]
                if connection.is_open:
                    return connection
                await connection.close()
                return None
        if destination.idle:
            await destination.idle.pop(0).close()
        return None

    def give_back(self, key: str, connection: OutboundConnection) -> None:
        if connection.is_open:
            self._destination(key).idle.append(connection)

    async def close_idle(self, *, all_of_them: bool = False) -> None:
        deadline = time.monotonic() - self._idle_seconds
        for destination in self._destinations.values():
            keep = []
            for connection in destination.idle:
                if all_of_them or connection.last_used < deadline or not connection.is_open:
                    await connection.close()
                else:
                    keep.append(connection)
            destination.idle = keep

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._idle_seconds))
            await self.close_idle()
