"""Group commit of accepted mail, on both stores: every message whose DATA ends while the previous
batch is being written goes into the next batch, one write transaction for all of them.

Why: on PostgreSQL a transaction per message cost about seven round trips, and every session of one
SMTP user queued behind the one holding its row lock; on SQLite, eight SQLAlchemy statements and two
savepoints per message took most of the writer thread's time. A batch locks each user's row once and
writes the rows of all its messages with one statement per table (``messages.queue_messages``).
Each message still gets its own outcome, and only once the COMMIT that made it durable has returned
(SPEC §4: 250 only once on stable storage).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection

from poweremail.batches import Batch, Batches, settle_with_error
from poweremail.store import message_parts
from poweremail.store.database import Database
from poweremail.store.driver_statements import savepoint
from poweremail.store.messages import (
    Queued,
    QueuedBatch,
    QueueOutcome,
    QueueRequest,
    SenderState,
    WrittenAhead,
    queue_messages,
)

logger = logging.getLogger("poweremail.store")

# Every session waiting at its final dot fits in one batch on a busy node.
MAX_BATCH = 64
# A message this large is written ahead in parts, each in a write transaction of its own
# (store/message_parts.py); the batch then queues it as a small row. Measured: a 25 MiB message's
# insert and COMMIT took 120-280 ms on SQLite, and every small message of its batch waited as long.
# Below it a message goes into the batch whole: a few commits of its own would cost it more than
# the others wait for it.
LARGE_MESSAGE = 1024 * 1024
# Parts no message names after this long are deleted: no upload takes so long between its first
# part and its queueing transaction (they follow each other; only the store being away delays it).
UNCLAIMED_PARTS_AGE = timedelta(hours=1)


# How old a sender's state may be when MAIL uses it without reading the store. The authoritative
# check is at the end of DATA, under the user's row lock; this bound only limits how long after a
# disable, reset or delete made by another process a MAIL may still get 250 (its DATA is refused).
SENDER_STATE_MAX_AGE = 0.5


class SenderStates:
    """Senders' states as last read from the store by this process, for the checks at MAIL.

    Measured: reading the state at every MAIL was 12% of the server's time on SQLite, and on
    PostgreSQL a transaction of its own per message. Each batch written refreshes the state of its
    senders (read under their row locks), so a busy session never reads at MAIL.
    """

    def __init__(self, *, max_age: float = SENDER_STATE_MAX_AGE, prune_above: int = 10_000) -> None:
        self._max_age = max_age
        self._states: dict[int, tuple[float, SenderState]] = {}
        # Stale entries are dropped whenever the map grows past this (then past twice what is left):
        # memory follows the senders of the last half second, not every sender ever seen.
        self._prune_above = self._prune_at = prune_above

    def fresh(self, smtp_user_id: int) -> SenderState | None:
        entry = self._states.get(smtp_user_id)
        if entry is None or time.monotonic() - entry[0] > self._max_age:
            return None
        return entry[1]

    def remember(self, smtp_user_id: int, state: SenderState | None) -> None:
        now = time.monotonic()
        if state is None:
            self._states.pop(smtp_user_id, None)
        else:
            self._states[smtp_user_id] = (now, state)
        if len(self._states) > self._prune_at:
            self._states = {
                user_id: entry for user_id, entry in self._states.items() if now - entry[0] <= self._max_age
            }
            self._prune_at = max(self._prune_above, 2 * len(self._states))

    def __len__(self) -> int:
        return len(self._states)

    def forget_all(self) -> None:
        """After an SMTP user or owner changed through this process: MAIL reads the store again."""
        self._states.clear()


@dataclass(frozen=True)
class _BatchFailed:
    """A statement of the batch failed; its savepoint was rolled back, so nothing of it is stored."""

    error: Exception


def _queue_or_report(conn: Connection, requests: list[QueueRequest]) -> QueuedBatch | _BatchFailed:
    # In a savepoint, so that a failing statement is told apart from a failing COMMIT: after the
    # former nothing was stored and each message can be tried alone; after the latter (PostgreSQL:
    # the connection lost while committing) the batch may be stored, and must not be written again.
    try:
        with savepoint(conn):
            return queue_messages(conn, requests)
    except Exception as error:
        return _BatchFailed(error)


class SubmissionWriter:
    """``await queue(request)``: the message queued and counted, or why not; raises if the store
    failed (the caller answers 451 and the client keeps the message)."""

    def __init__(self, database: Database, senders: SenderStates, *, max_batch: int = MAX_BATCH) -> None:
        self._database = database
        self._senders = senders
        self._batches: Batches[QueueRequest, QueueOutcome] = Batches(
            self._write, max_batch=max_batch, name="queue-writer"
        )

    async def queue(self, request: QueueRequest) -> QueueOutcome:
        if isinstance(request.data, WrittenAhead) or request.size < LARGE_MESSAGE:
            return await self._batches.submit(request)  # pieces are joined by the store's writer
        written = await self._write_ahead(request)
        outcome = await self._batches.submit(replace(request, data=written))
        if not isinstance(outcome, Queued):
            await self._delete_parts(request.queue_id)
        return outcome

    async def _write_ahead(self, request: QueueRequest) -> WrittenAhead:
        # One part at a time, each alone (never in a batch, so no small message's COMMIT carries
        # it): the writes of the other sessions go in between. If one fails, the parts already
        # written are deleted later by delete_unclaimed_parts.
        assert not isinstance(request.data, WrittenAhead)
        parts = 0
        for part in message_parts.split(request.data, message_parts.PART_SIZES[self._database.dialect]):
            await self._database.write(
                functools.partial(
                    message_parts.write_part, queue_id=request.queue_id, seq=parts, data=part, now=request.now
                ),
                alone=True,
            )
            parts += 1
        return WrittenAhead(parts=parts, size=request.size)

    async def _delete_parts(self, queue_id: str) -> None:
        try:
            await self._database.write(functools.partial(message_parts.delete_parts, queue_id=queue_id))
        except Exception:  # the refusal stands; delete_unclaimed_parts deletes them later
            logger.warning("could not delete the parts of refused message %s yet", queue_id, exc_info=True)

    async def _write(self, batch: Batch[QueueRequest, QueueOutcome]) -> None:
        requests = [request for request, _ in batch]
        try:
            result = await self._database.write(lambda conn: _queue_or_report(conn, requests))
        except Exception as error:  # BEGIN or COMMIT failed: the store is away, or the outcome unknown
            settle_with_error(batch, error)
            return
        if isinstance(result, _BatchFailed):
            if len(batch) == 1:
                settle_with_error(batch, result.error)
                return
            # One message's rows may be what failed: each alone, so the others are not refused with it.
            logger.warning("a batch of %d failed (%r); queueing each alone", len(batch), result.error)
            await asyncio.gather(*(self._write([item]) for item in batch))
            return
        for user_id, state in result.senders.items():
            self._senders.remember(user_id, state)
        for (_, future), outcome in zip(batch, result.outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)


async def delete_unclaimed_parts(database: Database, *, older_than: timedelta = UNCLAIMED_PARTS_AGE) -> int:
    """Delete the parts of messages that were never queued (refused, or the store or node failed
    between the parts and the queueing); returns how many parts."""
    before = datetime.now(UTC) - older_than
    return await database.write(functools.partial(message_parts.delete_unclaimed, before=before))


async def sweep_unclaimed_parts(database: Database, stop: asyncio.Event, *, every: float = 600.0) -> None:
    """``delete_unclaimed_parts`` now and every ``every`` seconds until ``stop`` is set."""
    while not stop.is_set():
        try:
            deleted = await delete_unclaimed_parts(database)
        except Exception:  # the store is away: the next round tries again
            logger.warning("could not delete unclaimed message parts", exc_info=True)
        else:
            if deleted:
                logger.info("deleted %d part(s) of messages that were never queued", deleted)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
