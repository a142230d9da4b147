"""The crash matrix (issue 6, item 1): SIGKILL a node under SMTP load at random moments, many times.

One node (api, smtp, delivery) relays to a loopback ``Receiver`` whose answer to DATA comes after a small
random delay, so deliveries are in flight. Several client threads send continuously (1-3 recipients per
message, every address used once in the whole run, bodies of 5 to ~100 KB), each message recording how
far it got and, on a 250, its queue id. Between kills a random delay passes, then the kill aims at one
of these moments (chosen at random), each reached on the fly:

- ``random``: whenever the delay ends (anything may be under way);
- ``mid-data``: a client has sent DATA and waits for its reply (the data in transit, the message being
  stored, or stored and its 250 not yet out: "between commit and 250");
- ``after-250``: a client has just been answered 250;
- ``mid-delivery``: a recipient is leased by the node (being delivered);
- ``remote-250``: the receiver has just accepted a message, so its 250 is on its way to the node and
  the node has yet to record it ("between the remote 250 and its record").

Right after each kill the recipients the node had in hand (pending, ``locked_by`` set) are read from the
store: those in flight at that kill. The node is started again under the same ``--node-name`` (it resumes
its own at once) and the load goes on. After the last kill the load stops and the queue drains; then:

- every message answered 250 is stored (lost = 0), under the queue id of its reply;
- every stored message holds exactly what its client sent plus the Received header (partial = 0); a
  stored message whose client saw no 250 (killed between commit and 250) is allowed and counted;
- every stored recipient ended delivered or bounced, and every delivered one arrived;
- every arrival is a stored message byte for byte, to recipients of that message (partial = 0);
- the user's usage (sent_total) equals the recipients stored;
- a recipient that arrived more than once was in flight at some kill.

``run_crash_matrix`` returns the figures, ``Figures.problems()`` what broke: used by
tests/reliability/test_crash_matrix.py (CI, 10 kills) and reliability/crash_matrix.py (the long run).
"""

from __future__ import annotations

import itertools
import random
import secrets
import smtplib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.store.schema import messages, recipients
from tests.delivery.receiver import ReceivedMessage, Receiver
from tests.delivery.test_crash_and_scale import (
    _RECEIVED,
    SENDER,
    _body,
    _delivery_args,
    _states,
    _stopped,
    _tail,
    _wait,
)
from tests.smtp.helpers import SmtpUser, add_smtp_user, logged_in, queue_id_of, usage
from tests.support import ServerProcess, create_owner, store_read, stored_bodies

MODES = ("random", "mid-data", "after-250", "mid-delivery", "remote-250")
NODE = "crash-matrix"
LIMIT = 10_000_000
_PENDING = ("queued", "deferred")


@dataclass
class Attempt:
    """One message a client tried to send."""

    number: int
    recipients: list[str]
    data: bytes
    stage: str = "new"  # new → envelope → data → answered (or failed: the connection broke)
    code: int | None = None  # the reply to DATA
    queue_id: str | None = None  # from a 250 after DATA
    failed_at: str | None = None  # the stage at which the connection broke

    @property
    def got_250(self) -> bool:
        return self.code == 250


@dataclass
class Figures:
    backend: str
    seed: int
    kills: int = 0
    kills_by_mode: Counter[str] = field(default_factory=Counter)
    # Aimed moments that did not come within the wait (the kill came anyway), by moment:
    aimed_missed: Counter[str] = field(default_factory=Counter)
    clients_in_data_at_kills: int = 0  # clients waiting for the reply to DATA at a kill
    in_flight_at_kills: int = 0  # recipients in hand at the kills, summed
    attempted: int = 0
    answered_250: int = 0
    refused: Counter[int] = field(default_factory=Counter)  # non-250 replies to DATA, by code
    broken_by_kill: Counter[str] = field(default_factory=Counter)  # connections cut, by stage reached
    stored: int = 0
    stored_without_250: int = 0
    recipients_stored: int = 0
    states: Counter[str] = field(default_factory=Counter)
    arrivals: int = 0  # recipients received by the relay, counting duplicates
    usage_total: int = -1
    drain_seconds: float = 0.0
    seconds: float = 0.0
    # Violations (all must stay empty / zero):
    lost: list[str] = field(default_factory=list)  # queue ids answered 250 and not stored
    partial: list[str] = field(default_factory=list)  # stored or arrived not whole
    # Stored recipients not delivered or bounced, or recorded delivered and never arrived:
    not_done: list[str] = field(default_factory=list)
    strangers: list[str] = field(default_factory=list)  # arrivals/stored rows matching no attempt
    duplicates: dict[str, tuple[int, bool]] = field(default_factory=dict)  # address → (arrivals, in flight)

    @property
    def usage_mismatch(self) -> int:
        return self.usage_total - self.recipients_stored

    def problems(self) -> list[str]:
        found = []
        if self.lost:
            found.append(f"{len(self.lost)} message(s) answered 250 and not stored: {self.lost[:10]}")
        if self.partial:
            found.append(f"{len(self.partial)} partial or altered: {self.partial[:10]}")
        if self.not_done:
            found.append(f"{len(self.not_done)} stored recipient(s) not done: {self.not_done[:10]}")
        if self.strangers:
            found.append(f"{len(self.strangers)} unknown: {self.strangers[:10]}")
        if self.usage_mismatch:
            found.append(f"usage {self.usage_total} != {self.recipients_stored} recipients stored")
        twice = sorted(a for a, (_n, in_flight) in self.duplicates.items() if not in_flight)
        if twice:
            found.append(f"{len(twice)} sent twice though not in flight at any kill: {twice[:10]}")
        if self.kills == 0:
            found.append("no kill happened")
        return found

    def summary(self) -> str:
        twice_in_flight = sum(1 for _n, f in self.duplicates.values() if f)
        return "\n".join(
            [
                f"crash matrix ({self.backend}, seed {self.seed}): {self.kills} kills in {self.seconds:.0f}s "
                f"by moment {dict(self.kills_by_mode)} "
                f"(aimed moment not reached: {dict(self.aimed_missed)}); "
                f"at the kills {self.clients_in_data_at_kills} client(s) awaiting the reply to DATA, "
                f"{self.in_flight_at_kills} recipient(s) in flight",
                f"  messages: {self.attempted} attempted, {self.answered_250} answered 250, refused "
                f"{dict(self.refused)}, cut by a kill {dict(self.broken_by_kill)}",
                f"  stored {self.stored} ({self.stored_without_250} without a 250: killed between commit "
                f"and 250), {self.recipients_stored} recipients: {dict(self.states)}; {self.arrivals} "
                f"arrivals; drained {self.drain_seconds:.1f}s after the load",
                f"  lost {len(self.lost)}, partial {len(self.partial)}, not done {len(self.not_done)}, "
                f"unknown {len(self.strangers)}, usage {self.usage_total} (mismatch {self.usage_mismatch}), "
                f"duplicates {len(self.duplicates)} ({twice_in_flight} in flight at a kill, "
                f"{len(self.duplicates) - twice_in_flight} not)",
            ]
        )


class _Load:
    """Client threads sending continuously through ``node``'s SMTP port, reconnecting after kills."""

    def __init__(self, node: ServerProcess, user: SmtpUser, clients: int, seed: int) -> None:
        self.node, self.user = node, user
        self.tag = f"cm{secrets.token_hex(3)}"
        self.attempts: list[Attempt] = []
        self.in_data: set[int] = set()  # numbers of attempts awaiting the reply to DATA
        self.answered = threading.Event()  # set on each 250 (the after-250 moment)
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._stop = threading.Event()
        self._seed = seed
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"crash-matrix client {i}", daemon=True)
            for i in range(clients)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _new_attempt(self, rng: random.Random) -> Attempt:
        with self._lock:
            number = next(self._numbers)
        addresses = [f"{self.tag}-{number:06d}-{i}@dest{i}.test" for i in range(rng.randint(1, 3))]
        data = _body(number, self.tag)
        # Lines of 908 bytes (under the 998 limit): messages of 5 to ~100 KB.
        padding = rng.choice([0, 0, 10, 100])
        data += b"".join(b"%06d " % i + secrets.token_hex(450).encode() + b"\r\n" for i in range(padding))
        attempt = Attempt(number, addresses, data)
        with self._lock:
            self.attempts.append(attempt)
        return attempt

    def _client(self, index: int) -> None:
        rng = random.Random(self._seed * 1000 + index)
        client: smtplib.SMTP | None = None
        while not self._stop.is_set():
            if client is None:
                try:
                    client = logged_in(self.node, self.user)
                except (smtplib.SMTPException, OSError):
                    time.sleep(0.05)  # the node is down (killed, not yet back)
                    continue
            attempt = self._new_attempt(rng)
            try:
                self._send(client, attempt)
            except (smtplib.SMTPException, OSError):
                attempt.failed_at = attempt.stage
                self.in_data.discard(attempt.number)
                try:
                    client.close()
                except OSError:
                    pass
                client = None
                continue
            time.sleep(rng.uniform(0.03, 0.12))  # paced: delivery keeps up, the drain stays short
        if client is not None:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                client.close()

    def _send(self, client: smtplib.SMTP, attempt: Attempt) -> None:
        attempt.stage = "envelope"
        code, reply = client.mail(SENDER)
        if code != 250:
            raise smtplib.SMTPResponseException(code, reply)
        for address in attempt.recipients:
            code, reply = client.rcpt(address)
            if code != 250:
                client.rset()
                attempt.stage, attempt.code = "answered", code
                return
        attempt.stage = "data"
        self.in_data.add(attempt.number)
        try:
            code, reply = client.data(attempt.data)
        finally:
            self.in_data.discard(attempt.number)
        attempt.code = code
        if code == 250:
            attempt.queue_id = queue_id_of(reply)
            self.answered.set()
        attempt.stage = "answered"


def _in_hand(database_url: str) -> set[str]:
    """Recipients pending and leased: in flight at a kill just made."""

    def read(conn: Connection) -> set[str]:
        rows = conn.execute(
            sa.select(recipients.c.address).where(
                recipients.c.state.in_(_PENDING), recipients.c.locked_by.is_not(None)
            )
        )
        return {row.address for row in rows}

    return store_read(database_url, read)


@dataclass(frozen=True)
class _Stored:
    queue_id: str
    data: bytes
    recipients: dict[str, str]  # address → state


def _stored(database_url: str) -> list[_Stored]:
    def read(conn: Connection) -> list[_Stored]:
        rows = conn.execute(
            sa.select(messages.c.id, messages.c.queue_id).where(messages.c.bounce_of.is_(None))
        ).all()
        bodies = stored_bodies(conn, [row.id for row in rows])
        by_id: dict[int, dict[str, str]] = {row.id: {} for row in rows}
        for r in conn.execute(sa.select(recipients.c.message_id, recipients.c.address, recipients.c.state)):
            if r.message_id in by_id:
                by_id[r.message_id][r.address] = r.state
        return [_Stored(row.queue_id, bodies[row.id], by_id[row.id]) for row in rows]

    return store_read(database_url, read)


def _pending(database_url: str) -> int:
    states = _states(database_url)
    return sum(states[s] for s in _PENDING)


def _aim(mode: str, load: _Load, relay: Receiver, node: ServerProcess, wait: float) -> bool:
    """Waits (at most ``wait`` seconds) for the moment ``mode`` names; True if it came."""
    if mode == "random":
        return True
    deadline = time.monotonic() + wait
    if mode == "after-250":
        load.answered.clear()
        return load.answered.wait(wait)
    if mode == "remote-250":
        before = len(relay.messages)
        try:
            relay.wait_until(lambda: len(relay.messages) > before, "an arrival", timeout=wait)
        except AssertionError:
            return False
        return True
    while time.monotonic() < deadline:
        if mode == "mid-data" and load.in_data:
            return True
        if mode == "mid-delivery" and _in_hand(node.database_url):
            return True
        time.sleep(0.001 if mode == "mid-data" else 0.01)
    return False


def run_crash_matrix(
    database_url: str,
    workdir: Path,
    kills: int,
    seed: int,
    *,
    clients: int = 3,
    between: tuple[float, float] = (0.3, 2.0),
    drain_timeout: float = 120.0,
    progress: bool = False,
) -> Figures:
    """Runs the matrix on an empty database; returns the figures (``Figures.problems()``: violations).
    Raises AssertionError if the node does not come back or the queue does not drain."""
    rng = random.Random(seed)
    data_rng = random.Random(seed + 1)
    figures = Figures(database_url.split(":")[0].split("+")[0], seed)
    in_flight: set[str] = set()
    started = time.monotonic()

    def slow_data(_n: int) -> str | None:
        time.sleep(data_rng.uniform(0.0, 0.02))  # on the receiver's thread: deliveries stay in flight
        return None

    with Receiver(data=slow_data) as relay:
        node = ServerProcess(
            workdir / "data",
            database_url,
            workdir / "node.log",
            roles="api,smtp,delivery",
            extra_args=_delivery_args(relay, NODE, poll=0.05, concurrency=4, lease=60),
        )
        load: _Load | None = None
        try:
            node.start()
            owner = create_owner(database_url)
            user = add_smtp_user(node, owner, total_limit=LIMIT, hourly_limit=LIMIT)
            load = _Load(node, user, clients, seed)
            load.start()
            for kill in range(kills):
                time.sleep(rng.uniform(*between))
                mode = rng.choice(MODES)
                if not _aim(mode, load, relay, node, wait=2.0):
                    figures.aimed_missed[mode] += 1
                figures.clients_in_data_at_kills += len(load.in_data)
                node.kill()
                figures.kills += 1
                figures.kills_by_mode[mode] += 1
                held = _in_hand(database_url)
                figures.in_flight_at_kills += len(held)
                in_flight |= held
                node.start()
                if progress and (kill + 1) % 10 == 0:
                    print(
                        f"  {kill + 1} kills, {len(load.attempts)} messages tried, {len(in_flight)} "
                        f"recipients caught in flight so far ({time.monotonic() - started:.0f}s)",
                        flush=True,
                    )
            time.sleep(0.5)  # the load goes on a moment after the last restart
            load.stop()
            drain_start = time.monotonic()
            _wait(
                lambda: _pending(database_url) == 0,
                timeout=drain_timeout,
                what="the queue drained after the last kill",
                servers=[node],
                detail=lambda: f"Recipients by state: {dict(_states(database_url))}.",
            )
            figures.drain_seconds = time.monotonic() - drain_start
            figures.usage_total = usage(node, owner, user)[0]
        finally:
            if load is not None:
                load.stop()
            code = _stopped(node)
        assert code == 0, f"the node did not stop cleanly ({code})\n{_tail(node)}"
        arrived = relay.messages
    figures.seconds = time.monotonic() - started
    _judge(figures, load.attempts, _stored(database_url), arrived, in_flight)
    return figures


def _judge(
    figures: Figures,
    attempts: list[Attempt],
    stored: list[_Stored],
    arrived: list[ReceivedMessage],
    in_flight: set[str],
) -> None:
    by_address = {address: attempt for attempt in attempts for address in attempt.recipients}
    figures.attempted = len(attempts)
    figures.answered_250 = sum(a.got_250 for a in attempts)
    figures.refused = Counter(a.code for a in attempts if a.code is not None and a.code != 250)
    figures.broken_by_kill = Counter(a.failed_at for a in attempts if a.failed_at)

    stored_ids = {s.queue_id for s in stored}
    figures.lost = [str(a.queue_id) for a in attempts if a.got_250 and a.queue_id not in stored_ids]
    figures.stored = len(stored)
    by_bytes: dict[bytes, _Stored] = {}
    for message in stored:
        figures.recipients_stored += len(message.recipients)
        figures.states.update(message.recipients.values())
        origins = {id(by_address[a]): by_address[a] for a in message.recipients if a in by_address}
        if len(origins) != 1:
            figures.strangers.append(f"stored {message.queue_id} to {sorted(message.recipients)}")
            continue
        [origin] = origins.values()
        if sorted(message.recipients) != sorted(origin.recipients):
            figures.partial.append(f"stored {message.queue_id}: recipients {sorted(message.recipients)}")
        if not origin.got_250:
            figures.stored_without_250 += 1
        elif origin.queue_id != message.queue_id:
            figures.strangers.append(f"{origin.queue_id} answered 250 but stored as {message.queue_id}")
        added = message.data[: len(message.data) - len(origin.data)]
        if not message.data.endswith(origin.data) or not _RECEIVED.match(added):
            figures.partial.append(f"stored {message.queue_id}: {len(message.data)} bytes, not whole")
        by_bytes[message.data] = message

    arrivals: Counter[str] = Counter()
    for arrival in arrived:
        arrivals.update(arrival.rcpt_tos)
        origin_stored = by_bytes.get(arrival.data)
        if origin_stored is None:
            figures.partial.append(
                f"arrival to {arrival.rcpt_tos} ({len(arrival.data)} bytes) is no stored message in full"
            )
        elif not set(arrival.rcpt_tos) <= set(origin_stored.recipients) or arrival.mail_from != SENDER:
            figures.strangers.append(f"arrival {origin_stored.queue_id} to {arrival.rcpt_tos}")
    figures.arrivals = sum(arrivals.values())
    for message in stored:
        for address, state in message.recipients.items():
            if state not in ("delivered", "bounced"):
                figures.not_done.append(f"{address} {state}")
            elif state == "delivered" and not arrivals[address]:
                figures.not_done.append(f"{address} recorded delivered, never arrived")
    figures.duplicates = {a: (n, a in in_flight) for a, n in arrivals.items() if n > 1}
