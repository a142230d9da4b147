"""Outages of a node's store under steady load, and what they showed: the replies while the store was
away, how long the node took to recover, and whether what it acknowledged is what it stored.

Shared by ``tests/reliability/test_store_outage.py`` (one short outage, with assertions) and
``reliability/store_outage.py`` (several, with figures).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Connection

from poweremail.store.schema import messages, recipients, smtp_users
from tests.delivery.helpers import FAST_DELIVERY
from tests.delivery.receiver import Receiver
from tests.reliability.outage_load import PROBER, SmtpReply, SteadyLoad, marker_of
from tests.reliability.store_faults import PipedServerProcess, StoreFault
from tests.smtp.helpers import usage
from tests.smtp.letters import queued_messages
from tests.support import store_read

# A reply that means "done" at each stage; anything else after recovery is a relapse.
_SUCCESS = {"connect": "220", "AUTH": "235", "LOGIN": "235", "MAIL": "250", "RCPT": "250", "DATA": "250"}


@dataclass(frozen=True)
class Window:
    starting: float  # time.monotonic(): the fault was set off here (calls may fail from here on)
    began: float  # the store was gone from here on (the fault had taken effect)
    ended: float  # and was back from here on (the fault was being undone)

    @property
    def seconds(self) -> float:
        return self.ended - self.began

    def holds(self, asked_at: float, answered_at: float) -> bool:
        """Asked after the store went away, and answered before it came back."""
        return self.began <= asked_at and answered_at <= self.ended


@dataclass
class OutageFigures:
    seconds: float
    smtp_during: Counter[str] = field(default_factory=Counter)  # "STAGE reply" → how many
    api_during: Counter[str] = field(default_factory=Counter)  # "call status type" → how many
    acknowledged_during: list[SmtpReply] = field(default_factory=list)  # 250 after DATA: must be none
    # Seconds from the store's return to the first success of each kind (None: none before the horizon).
    first_250: float | None = None
    every_sender_250: float | None = None  # each sender's first 250 after DATA, the latest of them
    api_read: float | None = None
    api_write: float | None = None
    login: float | None = None
    relapses: list[str] = field(default_factory=list)  # failures after every kind had recovered

    @property
    def recovered(self) -> float | None:
        """Seconds until every kind of call succeeded again."""
        times = [self.every_sender_250, self.api_read, self.api_write, self.login]
        return None if any(t is None for t in times) else max(t for t in times if t is not None)

    def summary(self) -> str:
        def seconds(value: float | None) -> str:
            return "never" if value is None else f"{value:.2f} s"

        smtp, api = dict(sorted(self.smtp_during.items())), dict(sorted(self.api_during.items()))
        return (
            f"store away {self.seconds:.1f} s; replies meanwhile: SMTP {smtp},"
            f" API {api}; 250 after DATA meanwhile: "
            f"{len(self.acknowledged_during)}; back: first 250 after {seconds(self.first_250)}, every sender"
            f" {seconds(self.every_sender_250)}, API read {seconds(self.api_read)}, API write"
            f" {seconds(self.api_write)}, new login {seconds(self.login)}; relapses {len(self.relapses)}"
        )


def start_outage_node(directory: Path, fault: StoreFault, relay: Receiver) -> PipedServerProcess:
    """The node under test: every role, on the store through ``fault``, delivering to ``relay``."""
    return PipedServerProcess(
        data_dir=directory / "data",
        database_url=fault.node_url,
        log_path=directory / "serve.log",
        roles="api,smtp,delivery",
        extra_args=("--node-name", "outage", *FAST_DELIVERY, "--relay", relay.address, "--relay-tls", "none"),
    ).start()


def run_outages(
    load: SteadyLoad, fault: StoreFault, *, outages: int, seconds: float, between: float, warmup: float
) -> tuple[list[Window], float]:
    """Start ``load``, take the store away ``outages`` times, stop the load; the windows and when the
    load stopped."""
    windows: list[Window] = []
    load.start()
    try:
        time.sleep(warmup)
        for _ in range(outages):
            starting = time.monotonic()
            try:
                fault.begin()
                began = time.monotonic()
                time.sleep(seconds)
            finally:
                ended = time.monotonic()
                fault.end()
            windows.append(Window(starting, began, ended))
            time.sleep(between)
    finally:
        load.stop()
    return windows, time.monotonic()


def outage_figures(load: SteadyLoad, window: Window, horizon: float) -> OutageFigures:
    """What ``load`` saw during ``window`` and after it, until ``horizon`` (the next outage's
    ``starting``, or the end of the load)."""
    figures = OutageFigures(window.seconds)
    smtp = load.replies("connect", "AUTH", "LOGIN", "MAIL", "RCPT", "DATA")
    api = load.api()
    for reply in smtp:
        if window.holds(reply.asked_at, reply.answered_at):
            figures.smtp_during[
                f"{reply.stage} {reply.reply if reply.queue_id is None else '250 queued'}"
            ] += 1
            if reply.queue_id is not None:
                figures.acknowledged_during.append(reply)
    for call in api:
        if window.holds(call.asked_at, call.answered_at):
            figures.api_during[f"{call.call} {call.status} {call.body.get('type', '')}".strip()] += 1

    def after(asked_at: float) -> bool:
        return window.ended <= asked_at < horizon

    def first(times: list[float]) -> float | None:
        return min(times) - window.ended if times else None

    data_250 = [r for r in smtp if r.stage == "DATA" and r.queue_id is not None and after(r.asked_at)]
    figures.first_250 = first([r.answered_at for r in data_250])
    per_sender = [first([r.answered_at for r in data_250 if r.sender == n]) for n in range(load.senders)]
    if all(value is not None for value in per_sender):
        figures.every_sender_250 = max(value for value in per_sender if value is not None)
    logins = [r for r in smtp if r.sender == PROBER and r.stage == "LOGIN" and r.code == "235"]
    figures.login = first([r.answered_at for r in logins if after(r.asked_at)])
    api_200 = [call for call in api if call.status == 200 and after(call.asked_at)]
    figures.api_read = first([call.answered_at for call in api_200 if call.call == "listSmtp"])
    figures.api_write = first([call.answered_at for call in api_200 if call.call == "editSmtp"])
    recovered = figures.recovered
    if recovered is not None:  # from then on, until the horizon, every call must succeed
        since = window.ended + recovered

        def meanwhile(asked_at: float, answered_at: float) -> bool:
            return since <= asked_at and answered_at < horizon

        figures.relapses = [
            f"{r.stage} {r.reply!r}"
            for r in smtp
            if meanwhile(r.asked_at, r.answered_at) and r.code != _SUCCESS[r.stage]
        ] + [
            f"{c.call} {c.status} {c.body}"
            for c in api
            if meanwhile(c.asked_at, c.answered_at) and c.status != 200
        ]
    return figures


@dataclass(frozen=True)
class LedgerFigures:
    acknowledged: int  # messages answered 250 after DATA
    acknowledged_recipients: int
    stored: int  # messages of the SMTP user in the store
    stored_recipients: int
    lost: int  # answered 250, not in the store: must be 0
    stored_twice: int  # letters stored more than once: must be 0 (no letter was sent twice)
    stored_without_250: int  # in the store, but the client got another answer (or none)
    sent_total: int  # the SMTP user's usage, as listSmtp reports it

    def summary(self) -> str:
        return (
            f"{self.acknowledged} messages answered 250 ({self.acknowledged_recipients} recipients),"
            f" {self.stored} stored ({self.stored_recipients} recipients), lost {self.lost},"
            f" stored twice {self.stored_twice}, stored without a 250 {self.stored_without_250},"
            f" usage {self.sent_total}"
        )


def ledger_figures(load: SteadyLoad, database_url: str) -> LedgerFigures:
    """The acknowledged letters against the store (read through ``database_url``, not the fault)."""
    stored = queued_messages(database_url, load.user)
    acknowledged = load.acknowledged()
    markers = Counter(marker_of(message) for message in stored.values())
    return LedgerFigures(
        acknowledged=len(acknowledged),
        acknowledged_recipients=sum(len(r.letter.recipients) for r in acknowledged if r.letter is not None),
        stored=len(stored),
        stored_recipients=sum(message.recipient_count for message in stored.values()),
        lost=sum(1 for r in acknowledged if r.queue_id not in stored),
        stored_twice=sum(count - 1 for count in markers.values() if count > 1),
        stored_without_250=len(set(stored) - {r.queue_id for r in acknowledged}),
        sent_total=usage(load.node, load.owner, load.user)[0],
    )


@dataclass(frozen=True)
class DeliveryFigures:
    recipients: int  # stored recipients of the SMTP user
    delivered: int  # of them, in state delivered
    drained: float | None  # seconds from the end of the load until every one was delivered
    relayed: int  # recipients the relay received
    relayed_twice: int

    def summary(self) -> str:
        drained = "not within the bound" if self.drained is None else f"{self.drained:.1f} s"
        return (
            f"{self.delivered} of {self.recipients} recipients delivered, all of them {drained} after the"
            f" load stopped; the relay got {self.relayed}, {self.relayed_twice} of them twice"
        )


def _delivered(conn: Connection, user_name: str) -> tuple[int, int]:
    rows = conn.execute(
        sa.select(recipients.c.state, sa.func.count())
        .select_from(
            recipients.join(messages, messages.c.id == recipients.c.message_id).join(
                smtp_users, smtp_users.c.id == messages.c.smtp_user_id
            )
        )
        .where(smtp_users.c.name == user_name)
        .group_by(recipients.c.state)
    ).all()
    states = {row[0]: row[1] for row in rows}
    return states.get("delivered", 0), sum(states.values())


def delivery_figures(
    load: SteadyLoad, database_url: str, relay: Receiver, *, since: float, bound: float
) -> DeliveryFigures:
    """Waits (at most ``bound`` seconds from ``since``) until every stored recipient is delivered."""
    drained: float | None = None
    while True:
        delivered, total = store_read(database_url, lambda conn: _delivered(conn, load.user.name))
        if delivered == total:
            drained = time.monotonic() - since
            break
        if time.monotonic() - since > bound:
            break
        time.sleep(0.1)
    relayed = Counter(address for message in relay.messages for address in message.rcpt_tos)
    return DeliveryFigures(
        recipients=total,
        delivered=delivered,
        drained=drained,
        relayed=sum(relayed.values()),
        relayed_twice=sum(count - 1 for count in relayed.values() if count > 1),
    )
