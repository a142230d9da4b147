"""The delivery worker (SPEC §5): claims due recipients, sends them out, records every attempt.

One loop claims due recipients under a lease (``store.delivery_queue``) and starts one task per
message and recipient domain: those recipients go in one SMTP transaction. A task routes them
(the relay, or the domain's MX hosts), takes a connection slot for the destination, sends, and
records the outcome: delivered; deferred with its next attempt time; or bounced, with a report to
the sender queued in the same transaction. Leases of everything in hand are renewed while it is in
hand; a worker that starts releases its own old ones first, so a restarted node resumes its work at
once instead of waiting for the leases to run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import groupby

from sqlalchemy import Connection

from poweremail.batches import Batch, Batches, settle_with_error
from poweremail.config import Settings, parse_host_port
from poweremail.delivery.bounce import FailedRecipient, build_bounce, enhanced_status
from poweremail.delivery.connections import ConnectionPool
from poweremail.delivery.destinations import LookupFailure, MxResolver
from poweremail.delivery.outbound import (
    ConnectionLost,
    Hop,
    HopFailure,
    OutboundConnection,
    Outcome,
    RecipientResult,
)
from poweremail.domain.retry import RetryPolicy
from poweremail.services import Services
from poweremail.smtp.message import new_queue_id
from poweremail.store import delivery_queue
from poweremail.store.delivery_queue import (
    AttemptRecord,
    ClaimedRecipient,
    PlannedBounce,
    QueuedMessage,
    RecipientOutcome,
)

logger = logging.getLogger("poweremail.delivery")

# Recipients claimed ahead of free transaction slots, per slot: enough to keep every slot busy
# between two claims, few enough that little sits leased and waiting.
_CLAIM_AHEAD = 2
# Woken by newly queued mail, the worker lets more arrive for this long before it claims: one claim
# then takes what several acceptance batches queued. Measured (SQLite, 20 sessions sending 1 KB on
# reused connections, delivering to smtp-sink; 8 alternating pairs of 10 s): claims 180 -> 58 a
# second in the one writer, messages accepted 18.3k -> 20.3k (medians; ahead in 7 pairs of 8).
# Mail waits 10 ms more before it is sent; at most 100 claims a second is far more than needed.
_CLAIM_GATHER = 0.01
# How long apart an outcome that could not be recorded (the store is away) is tried again; the last
# delay repeats for as long as the node runs. The lease may lapse meanwhile: the record still counts
# unless another worker took the recipient since (it may then be sent twice, never lost).
_RECORD_RETRY_DELAYS = (0.5, 1, 2, 4, 8, 15)


@dataclass(frozen=True)
class _Attempt:
    """What one transaction attempt gave, per recipient, and which host gave it."""

    results: list[RecipientResult]
    remote_mta: str | None


class Router:
    """Which destination a domain's mail goes to, and the hosts to try there in order."""

    RELAY = "relay"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._resolver = MxResolver(settings.dns_server)
        self._relay: Hop | None = None
        if settings.relay is not None:
            host, port = parse_host_port(settings.relay)
            login = None
            if settings.relay_user is not None and settings.relay_password is not None:
                login = (settings.relay_user, settings.relay_password.get_secret_value())
            self._relay = Hop(
                connect_to=host,
                port=port,
                name=host,
                tls=settings.relay_tls,
                verify=True,
                ca_file=settings.relay_ca_file,
                login=login,
            )

    @property
    def relays(self) -> bool:
        return self._relay is not None

    async def route(self, domain: str) -> tuple[str, list[Hop]]:
        """Raises LookupFailure when the domain's hosts cannot be found."""
        if self._relay is not None:
            return self.RELAY, [self._relay]
        hosts = await self._resolver.mail_hosts(domain)
        port = self._settings.smtp_out_port
        return domain, [
            Hop(connect_to=address, port=port, name=host.name, tls="opportunistic")
            for host in hosts
            for address in host.addresses
        ]


class DeliveryWorker:
    def __init__(self, services: Services) -> None:
        settings = services.settings
        self._services = services
        self._settings = settings
        self._database = services.database
        self._worker = settings.node_name
        self._policy = RetryPolicy(delays=settings.retry_delays, max_age=settings.max_message_age)
        self._router = Router(settings)
        self._pool = ConnectionPool(per_destination=settings.max_connections_per_destination)
        self._slots = asyncio.Semaphore(settings.delivery_concurrency)
        # Messages whose delivery starts while others are being read are read together, in one
        # query (measured: a read per message was 8% of a busy node's time). At most one per slot.
        self._loads: Batches[int, QueuedMessage] = Batches(
            self._load_messages, max_batch=settings.delivery_concurrency, name="delivery-reads"
        )
        # Outcomes of transactions that end together are recorded in one store transaction
        # (measured on PostgreSQL: a transaction per message was most of delivery's store time),
        # gathered as claims are (SQLite, the load of _CLAIM_GATHER's note: 170 -> 80 record
        # transactions a second; accepted messages 19.0k -> 19.7k, medians of 6 alternating pairs).
        self._records: Batches[AttemptRecord, None] = Batches(
            self._record_outcomes,
            max_batch=settings.delivery_concurrency,
            name="delivery-records",
            gather=_CLAIM_GATHER,
        )
        self._lease = timedelta(seconds=settings.delivery_lease)
        self._in_hand: set[int] = set()  # recipient ids leased to us and not yet recorded
        # Set when the store failed us in a way that may leave leases of ours that nothing here works
        # on (a claim that committed but whose answer was lost, a lease we could not give back): once
        # the store answers again they are given back, rather than sitting out the lease.
        self._strays = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._job_done = asyncio.Event()
        self._stopping = False

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; then finish what is in hand (bounded) and give back the rest."""
        await self._release_old_leases(stop)
        background = [
            asyncio.create_task(self._renew_leases_forever(), name="delivery-leases"),
            asyncio.create_task(self._pool.reap_forever(), name="delivery-idle-connections"),
        ]
        try:
            while not stop.is_set():
                # Cleared before looking: whatever is queued or finishes from here on wakes the wait.
                self._services.mail_queued.clear()
                self._job_done.clear()
                if self._strays:
                    await self._give_back_strays()
                room = _CLAIM_AHEAD * self._settings.delivery_concurrency - len(self._in_hand)
                jobs = await self._claim(room) if room > 0 else []
                if jobs:
                    self._start_jobs(jobs)
                    if sum(len(job) for job in jobs) == room:
                        continue  # a full claim: more may be due right now
                await self._wait_for_work(stop, room_left=room > 0)
                if self._services.mail_queued.is_set() and not stop.is_set():
                    await asyncio.sleep(_CLAIM_GATHER)
        finally:
            await self._finish(background)

    # --- claiming -----------------------------------------------------------------------------

    async def _release_old_leases(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                released = await self._database.write(
                    lambda conn: delivery_queue.release_leases(conn, worker=self._worker)
                )
            except Exception:
                logger.exception("delivery: cannot reach the store to resume; trying again")
                await _sleep_unless(stop, self._settings.delivery_poll_interval)
                continue
            if released:
                logger.info("delivery: resuming %d recipient(s) this node had in hand", released)
            return

    async def _claim(self, limit: int) -> list[list[ClaimedRecipient]]:
        """Claim due recipients, grouped into jobs; the messages themselves are read per job, so
        memory holds at most one message per transaction in flight (25 MiB each at worst)."""
        now = datetime.now(UTC)
        try:
            claimed = await self._database.write(
                lambda conn: delivery_queue.claim_due(
                    conn, worker=self._worker, now=now, until=now + self._lease, limit=limit
                )
            )
        except Exception:
            logger.exception("delivery: claiming due mail failed; trying again")
            self._strays = True  # it may have committed all the same
            return []
        # A lease of ours that lapsed while the store was away, on a recipient still in hand (its outcome
        # not yet recorded): claimed again, but not attempted twice.
        claimed = [recipient for recipient in claimed if recipient.id not in self._in_hand]
        self._in_hand.update(recipient.id for recipient in claimed)

        # One job per message and destination: those recipients go in one transaction (SPEC §5). By
        # MX that is per domain; through the relay, a message's recipients all go together.
        def job_key(recipient: ClaimedRecipient) -> tuple[int, str]:
            return recipient.message_id, "" if self._router.relays else recipient.domain

        # claim_due gives recipients in id order, which a stable sort keeps within each job.
        return [list(group) for _key, group in groupby(sorted(claimed, key=job_key), key=job_key)]

    def _start_jobs(self, jobs: list[list[ClaimedRecipient]]) -> None:
        for group in jobs:
            task = asyncio.create_task(self._deliver(group), name=f"deliver-{group[0].message_id}")
            self._tasks.add(task)
            task.add_done_callback(self._job_finished)

    def _job_finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._job_done.set()
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("delivery: a job failed unexpectedly", exc_info=error)

    async def _wait_for_work(self, stop: asyncio.Event, *, room_left: bool) -> None:
        """Until new mail is queued here, a job ends (when full), the poll interval passes, or stop."""
        wake = self._services.mail_queued if room_left else self._job_done
        waiters = [asyncio.create_task(wake.wait()), asyncio.create_task(stop.wait())]
        try:
            await asyncio.wait(
                waiters, timeout=self._settings.delivery_poll_interval, return_when="FIRST_COMPLETED"
            )
        finally:
            for waiter in waiters:
                waiter.cancel()

    # --- one job: a message's recipients at one domain ---------------------------------------

    async def _load_messages(self, batch: Batch[int, QueuedMessage]) -> None:
        message_ids = [message_id for message_id, _ in batch]
        try:
            loaded = await self._database.read(lambda conn: delivery_queue.load_messages(conn, message_ids))
        except Exception as error:
            settle_with_error(batch, error)
            return
        for message_id, future in batch:
            if future.done():
                continue
            if message_id in loaded:
                future.set_result(loaded[message_id])
            else:
                future.set_exception(LookupError(f"message {message_id} is not in the store"))

    async def _deliver(self, recipients: list[ClaimedRecipient]) -> None:
        ids = [recipient.id for recipient in recipients]
        message_id = recipients[0].message_id
        try:
            async with self._slots:
                if self._stopping:  # claimed but not started: another worker (or our restart) takes it
                    await self._give_back(ids)
                    return
                try:
                    message = await self._loads.submit(message_id)
                except Exception:
                    logger.exception("delivery: could not read message %d; giving it back", message_id)
                    await self._give_back(ids)
                    return
                attempt = await self._attempt(message, recipients)
            await self._record(message, recipients, attempt)
        except asyncio.CancelledError:
            raise  # still in hand: a stopping worker gives these back
        finally:
            if not _cancelling():
                self._in_hand.difference_update(ids)

    async def _attempt(self, message: QueuedMessage, recipients: Sequence[ClaimedRecipient]) -> _Attempt:
        addresses = [recipient.address for recipient in recipients]
        try:
            destination, hops = await self._router.route(recipients[0].domain)
        except LookupFailure as failure:
            # RFC 3463: 5.1.2 bad destination system address; 4.4.3 directory server failure.
            status = "5.1.2" if failure.permanent else "4.4.3"
            outcome: Outcome = "permanent" if failure.permanent else "temporary"
            return _Attempt(
                [RecipientResult(a, outcome, failure.reason, remote=False, status=status) for a in addresses],
                None,
            )
        failures: list[HopFailure] = []
        async with self._pool.slot(destination):
            for hop in hops:
                try:
                    results = await self._send_via(destination, hop, message, addresses)
                except HopFailure as failure:
                    failures.append(failure)
                    continue
                return _Attempt(results, hop.name)
        # No host took the transaction: for now, unless every one answered with a permanent refusal.
        permanent = bool(failures) and all(failure.permanent for failure in failures)
        reason = "; ".join(failure.reason for failure in failures[-3:]) or "no host to try"
        return _Attempt(
            [
                RecipientResult(
                    a, "permanent" if permanent else "temporary", reason, remote=False, status=None
                )
                for a in addresses
            ],
            hops[-1].name if hops else None,
        )

    async def _send_via(
        self, destination: str, hop: Hop, message: QueuedMessage, addresses: list[str]
    ) -> list[RecipientResult]:
        """One transaction at ``hop``, on an idle connection if there is one. Raises HopFailure."""
        connection = await self._pool.take(destination, hop)
        reused = connection is not None
        for _ in range(2):
            if connection is None:
                connection = await OutboundConnection.open(
                    hop, helo_name=self._settings.hostname, reply_timeout=self._settings.smtp_out_timeout
                )
            try:
                results = await connection.send(
                    mail_from=message.mail_from, recipients=addresses, data=message.data
                )
            except ConnectionLost as lost:
                if reused and not lost.data_sent:
                    # A kept connection the server had closed meanwhile: once more on a new one.
                    connection, reused = None, False
                    continue
                return [RecipientResult(a, "temporary", lost.reason, remote=False) for a in addresses]
            self._pool.give_back(destination, connection)
            return results
        raise AssertionError("unreachable")  # pragma: no cover

    # --- recording ---------------------------------------------------------------------------

    async def _record(
        self, message: QueuedMessage, recipients: Sequence[ClaimedRecipient], attempt: _Attempt
    ) -> None:
        now = datetime.now(UTC)
        outcomes: list[RecipientOutcome] = []
        failed: dict[int, FailedRecipient] = {}
        for recipient, result in zip(recipients, attempt.results, strict=True):
            outcome, failure = self._decide(message, recipient, result, attempt.remote_mta, now)
            outcomes.append(outcome)
            if failure is not None:
                failed[recipient.id] = failure
            logger.info(
                "%s to=<%s> %s (attempt %d) via %s: %s",
                message.queue_id,
                recipient.address,
                outcome.state,
                recipient.attempts + 1,
                attempt.remote_mta or "-",
                result.reply,
            )
        bounce = None
        if failed and message.mail_from and not message.is_bounce:  # never a bounce for <> (SPEC §5)
            bounce = PlannedBounce(
                message_id=message.id,
                mail_to=message.mail_from,
                build=lambda ids: self._build_bounce(message, [failed[i] for i in ids if i in failed], now),
            )
        delays = iter(_RECORD_RETRY_DELAYS)
        while True:
            try:
                await self._records.submit(AttemptRecord(now, outcomes, bounce))
            except Exception:
                if self._stopping:
                    logger.exception(
                        "delivery: could not record %s; it will be attempted again", message.queue_id
                    )
                    return
                delay = next(delays, _RECORD_RETRY_DELAYS[-1])
                logger.warning("delivery: recording %s failed; retrying in %ss", message.queue_id, delay)
                await asyncio.sleep(delay)
            else:
                break
        if bounce is not None:
            self._services.mail_queued.set()

    async def _record_outcomes(self, batch: Batch[AttemptRecord, None]) -> None:
        records = [record for record, _ in batch]

        try:
            await self._database.write(
                lambda conn: delivery_queue.record_attempts(conn, worker=self._worker, records=records)
            )
        except Exception as error:
            if len(batch) == 1:
                settle_with_error(batch, error)
                return
            # Each alone, so one that cannot be recorded does not hold the others back. Recording again
            # after a COMMIT whose answer was lost is harmless: a recipient is recorded only while it
            # is still leased to us, and recording releases the lease.
            await asyncio.gather(*(self._record_outcomes([item]) for item in batch))
            return
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    def _decide(
        self,
        message: QueuedMessage,
        recipient: ClaimedRecipient,
        result: RecipientResult,
        remote_mta: str | None,
        now: datetime,
    ) -> tuple[RecipientOutcome, FailedRecipient | None]:
        reply = result.reply
        if result.outcome == "delivered":
            return RecipientOutcome(recipient.id, "delivered", None, reply, remote_mta), None
        next_at = None
        if result.outcome == "temporary":
            next_at = self._policy.next_attempt_at(
                attempts=recipient.attempts + 1, accepted_at=message.accepted_at, now=now
            )
            if next_at is not None:
                return RecipientOutcome(recipient.id, "deferred", next_at, reply, remote_mta), None
            reason = (
                f"Delivery was attempted {recipient.attempts + 1} times over {_age(message.accepted_at, now)}"
                " without success; the last attempt failed for now."
            )
            status = "4.4.7"  # RFC 3463: delivery time expired
            reply = f"gave up after {_age(message.accepted_at, now)}: {result.reply}"
        else:
            reason = (
                "The recipient's mail server refused it." if result.remote else "It could not be delivered."
            )
            status = result.status or enhanced_status(result.reply, permanent=True)
        failure = FailedRecipient(
            address=recipient.address,
            status=status,
            diagnostic=result.reply if result.remote else None,
            remote_mta=remote_mta if result.remote else None,
            reason=reason if result.remote else f"{reason} Last error: {result.reply}.",
            last_attempt_at=now,
        )
        return RecipientOutcome(recipient.id, "bounced", None, reply, remote_mta), failure

    def _build_bounce(
        self, message: QueuedMessage, recipients: Sequence[FailedRecipient], now: datetime
    ) -> tuple[str, bytes] | None:
        """The report, or None if it cannot be built: the outcome must still be recorded, or the
        recipient would be attempted again and again."""
        queue_id = new_queue_id()
        hostname = self._settings.hostname
        try:
            data = build_bounce(
                reporting_mta=hostname,
                original_mail_from=message.mail_from,
                original_queue_id=message.queue_id,
                original_accepted_at=message.accepted_at,
                original_message=message.data,
                recipients=recipients,
                now=now,
                message_id=f"<{queue_id}@{hostname}>",
            )
        except ValueError:
            logger.exception("delivery: no bounce report for %s: it cannot be built", message.queue_id)
            return None
        return queue_id, data

    # --- leases and stopping -----------------------------------------------------------------

    async def _renew_leases_forever(self) -> None:
        interval = self._lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            in_hand = set(self._in_hand)
            if not in_hand:
                continue
            until = datetime.now(UTC) + self._lease

            def extend(conn: Connection, ids: set[int] = in_hand, until: datetime = until) -> None:
                delivery_queue.extend_leases(conn, worker=self._worker, recipient_ids=ids, until=until)

            try:
                await self._database.write(extend)
            except Exception:
                logger.exception("delivery: could not renew leases")

    async def _finish(self, background: list[asyncio.Task[None]]) -> None:
        """Let jobs in flight finish (bounded), cancel the rest and give their recipients back."""
        self._stopping = True
        for task in background:
            task.cancel()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=self._settings.shutdown_grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*background, return_exceptions=True)
        await self._pool.close_idle(all_of_them=True)
        await self._give_back(set(self._in_hand))

    async def _give_back(self, recipient_ids: Collection[int]) -> None:
        if not recipient_ids:
            return
        try:
            await self._database.write(
                lambda conn: delivery_queue.release_leases(
                    conn, worker=self._worker, recipient_ids=recipient_ids
                )
            )
        except Exception:
            then = "they expire" if self._stopping else "trying again"
            logger.exception("delivery: could not give back %d lease(s); %s", len(recipient_ids), then)
            self._strays = True

    async def _give_back_strays(self) -> None:
        """Give back every lease of ours that nothing here works on."""
        keep = set(self._in_hand)
        self._strays = False  # before, not after: a failure meanwhile sets it again
        try:
            released = await self._database.write(
                lambda conn: delivery_queue.release_leases(conn, worker=self._worker, keep=keep)
            )
        except Exception:
            self._strays = True  # still away: the claim that follows says so in the log
            return
        if released:
            logger.info("delivery: gave back %d lease(s) left over from a store failure", released)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _age(accepted_at: datetime, now: datetime) -> str:
    seconds = int((now - accepted_at).total_seconds())
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 2 * 3600:
        return f"{seconds // 3600} hours"
    if seconds >= 120:
        return f"{seconds // 60} minutes"
    return f"{seconds} seconds"


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
