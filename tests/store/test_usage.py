"""The rolling hour and the lifetime total as the store computes them (SPEC §3), on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.domain.limits import OverLimit, Usage
from poweremail.store import messages, owners
from poweremail.store.schema import message_contents, recipients, smtp_users
from tests.store.test_time import _migrate
from tests.support import run, store_read, store_write

NOW = datetime.now(UTC).replace(microsecond=0)


def _user(conn: Connection, *, hourly_limit: int = 10) -> int:
    owner = owners.create_owner(conn)
    owner_pk = owners.authenticate_owner(conn, owner_id=owner.owner_id, token=owner.token)
    user_id: int = conn.execute(
        smtp_users.insert()
        .values(name=f"smtp{owner.owner_id[:8]}", owner_pk=owner_pk, status="Enable", total_limit=1000,
                hourly_limit=hourly_limit, created_at=NOW, updated_at=NOW)
        .returning(smtp_users.c.id)
    ).scalar_one()  # fmt: skip
    return user_id


def _send(conn: Connection, user_id: int, recipients: int, at: datetime) -> messages.QueueOutcome:
    addresses = [f"r{i}@example.com" for i in range(recipients)]
    return messages.queue_message(
        conn, smtp_user_id=user_id, credential_version=1, queue_id=f"Q{at.timestamp()}{recipients}",
        mail_from="a@example.com", rcpt_tos=addresses, data=b"x", now=at,
    )  # fmt: skip


def test_the_window_counts_only_the_last_hour_and_says_when_it_frees(database_url: str) -> None:
    run(_migrate(database_url))

    def scenario(conn: Connection) -> tuple[Usage | None, messages.QueueOutcome, datetime]:
        user_id = _user(conn, hourly_limit=100)
        for ago, count in ((120, 3), (61, 1), (60, 4), (50, 2), (10, 1)):
            assert isinstance(_send(conn, user_id, count, NOW - timedelta(minutes=ago)), messages.Queued)
        conn.execute(smtp_users.update().where(smtp_users.c.id == user_id).values(hourly_limit=5))
        state = messages.sender_state(conn, smtp_user_id=user_id, now=NOW)
        refused = _send(conn, user_id, 4, NOW)  # 3 in the hour + 4 > 5: two must expire first
        resume = messages.hourly_resume_at(conn, smtp_user_id=user_id, usage=Usage(11, 3), excess=3, now=NOW)
        return (state.usage if state else None), refused, resume

    usage, refused, resume = store_write(database_url, scenario)
    # A message exactly 60 minutes old has left the window: (now - 1 h, now].
    assert usage == Usage(sent_total=11, sent_last_hour=3)
    assert refused == OverLimit(
        "hourly", 5, excess=2, resume_at=NOW - timedelta(minutes=50) + timedelta(hours=1)
    )
    # Needing 3 to expire: the one 10 minutes old must go too.
    assert resume == NOW - timedelta(minutes=10) + timedelta(hours=1)


def test_accepted_at_never_goes_back_in_time_for_one_user(database_url: str) -> None:
    """A node whose clock is behind stamps the message just after the user's last one (a microsecond),
    keeping the running totals in strict time order (what the lookups rely on)."""
    run(_migrate(database_url))

    def scenario(conn: Connection) -> tuple[int, Usage | None]:
        user_id = _user(conn)
        _send(conn, user_id, 2, NOW)
        _send(conn, user_id, 3, NOW - timedelta(minutes=5))  # the lagging node
        state = messages.sender_state(conn, smtp_user_id=user_id, now=NOW + timedelta(minutes=59, seconds=59))
        return user_id, state.usage if state else None

    user_id, usage = store_write(database_url, scenario)
    assert usage == Usage(5, 5)
    stamps = store_read(
        database_url,
        lambda conn: conn.execute(
            messages.messages.select()
            .with_only_columns(messages.messages.c.accepted_at, messages.messages.c.sent_total_after)
            .where(messages.messages.c.smtp_user_id == user_id)
            .order_by(messages.messages.c.id)
        ).all(),
    )
    assert [tuple(row) for row in stamps] == [(NOW, 2), (NOW + timedelta(microseconds=1), 5)]


def test_a_batch_gives_the_outcomes_of_queueing_one_after_the_other(database_url: str) -> None:
    """queue_messages (group commit) checks each message against the usage of those before it in the
    batch, writes only the accepted ones, and counts exactly what it accepted."""
    run(_migrate(database_url))

    def request(user_id: int, recipients: int, n: int, *, version: int = 1) -> messages.QueueRequest:
        return messages.QueueRequest(
            smtp_user_id=user_id, credential_version=version, queue_id=f"QB{user_id}-{n}",
            mail_from="a@example.com", rcpt_tos=[f"r{i}@example.com" for i in range(recipients)],
            data=b"x" * n, now=NOW,
        )  # fmt: skip

    def scenario(conn: Connection) -> tuple[list[messages.QueueOutcome], list[tuple[object, ...]], list[int]]:
        first, second = _user(conn, hourly_limit=5), _user(conn, hourly_limit=100)
        batch = messages.queue_messages(
            conn,
            [
                request(first, 2, 1),
                request(second, 3, 2),
                request(first, 2, 3),
                request(first, 2, 4),  # 4 of 5 already in the hour: refused, resumes in an hour
                request(first, 1, 5),  # still fits beside the first two
                request(second, 1, 6, version=2),  # reset since its session logged in
            ],
        )
        outcomes = batch.outcomes
        assert {user_id: state.usage if state else None for user_id, state in batch.senders.items()} == {
            first: Usage(5, 5),
            second: Usage(3, 3),
        }
        rows = conn.execute(
            messages.messages.select()
            .with_only_columns(
                messages.messages.c.queue_id,
                messages.messages.c.sent_total_after,
                messages.messages.c.accepted_at,
            )
            .where(messages.messages.c.smtp_user_id.in_([first, second]))
            .order_by(messages.messages.c.id)
        ).all()
        totals = [conn.execute(sa_select_total(user_id)).scalar_one() for user_id in (first, second)]
        # Each message's content and recipients hang on its own row (the ids come back by queue id).
        stored = {
            queue_id: (len(data), recipient_count)
            for queue_id, data, recipient_count in conn.execute(
                sa.select(
                    messages.messages.c.queue_id,
                    message_contents.c.data,
                    sa.select(sa.func.count())
                    .where(recipients.c.message_id == messages.messages.c.id)
                    .scalar_subquery(),
                )
                .join(message_contents, message_contents.c.message_id == messages.messages.c.id)
                .where(messages.messages.c.smtp_user_id.in_([first, second]))
            )
        }
        assert stored == {f"QB{first}-1": (1, 2), f"QB{second}-2": (2, 3), f"QB{first}-3": (3, 2),
                          f"QB{first}-5": (5, 1)}  # fmt: skip
        return outcomes, [tuple(row) for row in rows], totals

    outcomes, rows, totals = store_write(database_url, scenario)
    queue_ids = [row[0] for row in rows]
    assert outcomes[0] == messages.Queued(queue_ids[0])
    assert outcomes[1] == messages.Queued(queue_ids[1])
    assert outcomes[2] == messages.Queued(queue_ids[2])
    assert outcomes[3] == OverLimit("hourly", 5, excess=1, resume_at=NOW + timedelta(hours=1))
    assert outcomes[4] == messages.Queued(queue_ids[3])
    assert outcomes[5] == messages.CredentialsRevoked()
    assert len(rows) == 4  # the refused and the revoked ones are not stored
    assert [row[1] for row in rows] == [2, 3, 4, 5]  # each sender's running total
    first_user_times = [rows[0][2], rows[2][2], rows[3][2]]
    assert first_user_times == sorted(set(first_user_times)), "one user's times must strictly increase"
    assert totals == [5, 3]


def sa_select_total(user_id: int) -> object:
    return smtp_users.select().with_only_columns(smtp_users.c.sent_total).where(smtp_users.c.id == user_id)
