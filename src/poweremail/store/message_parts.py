"""A large message's bytes, written ahead in parts before the transaction that queues it.

Why: one transaction that inserted a 25 MiB message held every other writer for its insert and
COMMIT (measured on SQLite: 120-280 ms, and each session's 250 behind it waited as long; on
PostgreSQL each small COMMIT waited for the WAL flush of the large one written before it). Written
in parts, each in a transaction of its own, the other writes go in between.

A part is found by the queue id its message will have. The message is queued (counted, with its
recipients) by the usual transaction, whose ``message_contents`` row says in how many parts its
bytes are; until then the parts belong to nothing. Parts that no message names (the message was
refused, the store failed, the node died in between) are deleted at once where the submission
server knows, else by ``delete_unclaimed`` once they are older than any upload can be.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.store.database import Dialect
from poweremail.store.schema import message_parts, messages

# How large the parts are, per store. Measured (2 cores): 20 sessions sending 1 KB messages beside
# one uploading 25 MiB messages back to back. SQLite: their p99 was 154-283 ms with each message one
# insert; in parts of 4 MiB 57-162 ms, 1 MiB 51-78, 256 KiB 35-43, 128 KiB 40-46 (and a sixth fewer
# uploads: a COMMIT each). PostgreSQL, three runs one after the other: one insert 94/116/115 ms and
# 34 uploads a run; 1 MiB parts 74/92/103 ms, 32 uploads; 256 KiB 71/82/94 ms but only 23 uploads.
PART_SIZES: dict[Dialect, int] = {"sqlite": 256 * 1024, "postgresql": 1024 * 1024}

_INSERT = message_parts.insert()
_READ = (
    sa.select(message_parts.c.queue_id, message_parts.c.data)
    .where(message_parts.c.queue_id.in_(sa.bindparam("queue_ids", expanding=True)))
    .order_by(message_parts.c.queue_id, message_parts.c.seq)
)
_DELETE = message_parts.delete().where(message_parts.c.queue_id == sa.bindparam("queue_id"))
_DELETE_UNCLAIMED = message_parts.delete().where(
    message_parts.c.created_at < sa.bindparam("before"),
    ~sa.exists().where(messages.c.queue_id == message_parts.c.queue_id),
)


def split(data: bytes | Sequence[bytes], part_size: int) -> Iterator[bytes]:
    """The parts a message is written in, in order, from the message whole or in the pieces it was
    received in; each part is copied out only when it is its turn (never the whole message)."""
    taken: list[memoryview] = []
    filled = 0
    for piece in (data,) if isinstance(data, bytes) else data:
        view, start = memoryview(piece), 0
        while start < len(view):
            chunk = view[start : start + part_size - filled]
            taken.append(chunk)
            filled += len(chunk)
            start += len(chunk)
            if filled == part_size:
                yield b"".join(taken)
                taken, filled = [], 0
    if taken:
        yield b"".join(taken)


def write_part(conn: Connection, *, queue_id: str, seq: int, data: bytes, now: datetime) -> None:
    conn.execute(_INSERT, {"queue_id": queue_id, "seq": seq, "data": data, "created_at": now})


def read_parts(conn: Connection, queue_ids: Collection[str]) -> dict[str, list[bytes]]:
    """Each queue id's parts, in order (a queue id with none is absent)."""
    found: dict[str, list[bytes]] = {}
    for row in conn.execute(_READ, {"queue_ids": list(queue_ids)}):
        found.setdefault(row.queue_id, []).append(row.data)
    return found


def delete_parts(conn: Connection, *, queue_id: str) -> int:
    """The parts of a message that was not queued. Returns how many were deleted."""
    return conn.execute(_DELETE, {"queue_id": queue_id}).rowcount


def delete_unclaimed(conn: Connection, *, before: datetime) -> int:
    """Parts written before ``before`` that no queued message names. Returns how many."""
    return conn.execute(_DELETE_UNCLAIMED, {"before": before}).rowcount
