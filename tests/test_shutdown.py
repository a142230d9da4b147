"""SIGTERM stops a node gracefully (issue 6 §2): nothing new is accepted, what is under way finishes
(bounded), delivery claims are given back, the process exits 0, and a restart loses nothing."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from poweremail.smtp import replies
from poweremail.store.schema import recipients
from tests.delivery.helpers import FAST_DELIVERY, smtp_user
from tests.delivery.receiver import Receiver
from tests.smtp.helpers import queue_id_of, stored_message
from tests.smtp.raw import RawSMTP
from tests.support import ServerProcess, create_owner, store_read


def _node(database_url: str, tmp_path: Path, *args: str, roles: str = "api,smtp") -> ServerProcess:
    return ServerProcess(
        data_dir=tmp_path / "data",
        database_url=database_url,
        log_path=tmp_path / "serve.log",
        roles=roles,
        extra_args=("--node-name", "graceful", *FAST_DELIVERY, *args),
    )


def _exit_code(node: ServerProcess, timeout: float) -> int:
    assert node.process is not None
    return node.process.wait(timeout=timeout)


def test_sigterm_lets_an_open_transaction_finish_and_closes_idle_sessions(
    database_url: str, tmp_path: Path
) -> None:
    node = _node(database_url, tmp_path, "--shutdown-grace", "20").start()
    user = smtp_user(node, create_owner(node.database_url))
    busy, idle = RawSMTP(node.smtp_port), RawSMTP(node.smtp_port)
    try:
        assert busy.login(user.name, user.password).startswith("235")
        assert idle.login(user.name, user.password).startswith("235")
        assert busy.command("MAIL FROM:<app@sender.test>").startswith("250")
        assert busy.command("RCPT TO:<ann@example.test>").startswith("250")
        assert busy.command("DATA").startswith("354")
        busy.send(b"Subject: half way\r\n\r\nThe first half")

        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        assert idle.reply() == replies.SHUTTING_DOWN  # told why, then closed
        assert idle.is_closed()
        with pytest.raises(ConnectionRefusedError):  # the listeners are closed
            socket.create_connection(("127.0.0.1", node.smtp_port), timeout=2).close()

        time.sleep(0.5)  # the node waits for the open transaction rather than cutting it off
        assert node.process.poll() is None
        busy.send(b" and the second.\r\n.\r\n")
        queued = busy.reply()
        assert queued.startswith("250 2.0.0"), queued
        assert busy.reply() == replies.SHUTTING_DOWN
        assert busy.is_closed()
        assert _exit_code(node, timeout=10) == 0
    finally:
        busy.close()
        idle.close()
        if node.process is not None and node.process.poll() is None:
            node.kill()
    assert "stopped" in node.log()
    stored = stored_message(node, queue_id_of(queued))
    assert stored is not None and stored.data.endswith(b"The first half and the second.\r\n")


def test_a_transaction_that_outlasts_the_grace_is_cut_off_without_a_250(
    database_url: str, tmp_path: Path
) -> None:
    node = _node(database_url, tmp_path, "--shutdown-grace", "1").start()
    user = smtp_user(node, create_owner(node.database_url))
    with RawSMTP(node.smtp_port) as slow:
        assert slow.login(user.name, user.password).startswith("235")
        assert slow.command("MAIL FROM:<app@sender.test>").startswith("250")
        assert slow.command("RCPT TO:<ann@example.test>").startswith("250")
        assert slow.command("DATA").startswith("354")
        slow.send(b"Subject: never finished\r\n\r\n")
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        assert _exit_code(node, timeout=10) == 0
        assert slow.reply() == ""  # closed: no 250, so the client still has its message
    assert "closed 1 SMTP session(s) still in a transaction" in node.log()
    assert (
        store_read(
            node.database_url, lambda conn: conn.scalar(sa.select(sa.func.count()).select_from(recipients))
        )
        == 0
    )


def test_sigterm_finishes_deliveries_in_flight_and_gives_back_the_rest(
    database_url: str, tmp_path: Path
) -> None:
    def slow_data(n: int) -> None:
        time.sleep(1.0)
        return None

    with Receiver(data=slow_data) as relay:
        node = _node(
            database_url, tmp_path,
            "--relay", relay.address, "--relay-tls", "none",
            "--delivery-concurrency", "1", "--max-connections-per-destination", "1",
            roles="api,smtp,delivery",
        ).start()  # fmt: skip
        user = smtp_user(node, create_owner(node.database_url))
        with RawSMTP(node.smtp_port) as client:
            assert client.login(user.name, user.password).startswith("235")
            for index in range(3):
                assert client.command("MAIL FROM:<app@sender.test>").startswith("250")
                assert client.command(f"RCPT TO:<r{index}@example.test>").startswith("250")
                assert client.command("DATA").startswith("354")
                assert client.command(b"Subject: x\r\n\r\nbody\r\n.").startswith("250")
        relay.wait_until(lambda: sum(relay.mail_attempts.values()) >= 1, "the first delivery under way")
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        assert _exit_code(node, timeout=15) == 0

    rows = store_read(
        node.database_url,
        lambda conn: conn.execute(sa.select(recipients.c.state, recipients.c.locked_by)).all(),
    )
    states = sorted(row.state for row in rows)
    # The one in flight finished and was recorded; the one claimed but waiting for the single slot
    # was not started but given back, like the one not yet claimed.
    assert states == ["delivered", "queued", "queued"]
    assert all(row.locked_by is None for row in rows), rows  # nothing left claimed: a restart resumes at once
    assert len(relay.messages) == states.count("delivered")
