"""Delivery's SMTP client (smtp_client.py, outbound.py) against scripted servers on real loopback sockets.

Each server here is a script of steps: read until the client has sent what the step waits for, record
it, write the step's reply bytes exactly (several replies in one write, or one reply in pieces). A
client that did not pipeline would never send what a pipelining step waits for, and time out.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trustme

from poweremail.delivery.outbound import ConnectionLost, Hop, HopFailure, OutboundConnection
from poweremail.delivery.smtp_client import (
    MalformedReply,
    Reply,
    ReplyTimeout,
    SmtpClient,
    data_for_the_wire,
)
from tests.delivery.receiver import server_tls_context
from tests.support import run

EHLO_PIPELINING = b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100000\r\n"


@dataclass
class Step:
    until: bytes  # read until what arrived ends with this (b"" for the greeting: read nothing)
    reply: list[bytes]  # written in these pieces, a moment apart; [] for no reply
    starttls: ssl.SSLContext | None = None  # after the reply, the server side of a TLS handshake
    close: bool = False  # after the reply, close the connection
    linger: float = 0  # seconds to wait (reading nothing) before the reply


@dataclass
class Script:
    steps: list[Step]
    received: list[bytes] = field(default_factory=list)  # what each step read
    done: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def scripted(steps: list[Step]) -> AsyncIterator[tuple[int, Script]]:
    script = Script(steps)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for step in script.steps:
                script.received.append(await reader.readuntil(step.until) if step.until else b"")
                await asyncio.sleep(step.linger)
                for n, piece in enumerate(step.reply):
                    if n:
                        await asyncio.sleep(0.01)  # so each piece arrives on its own
                    writer.write(piece)
                    await writer.drain()
                if step.starttls is not None:  # at once: the client's handshake must not reach the reader
                    await writer.start_tls(step.starttls)
                if step.close:
                    break
            else:
                await reader.read()  # hold the connection until the client closes it
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            script.done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], script
    finally:
        server.close()
        await server.wait_closed()


def greeting() -> Step:
    return Step(b"", [b"220 mx.test ESMTP\r\n"])


async def connected(port: int, reply_timeout: float = 5) -> SmtpClient:
    client, greeting = await SmtpClient.connect("127.0.0.1", port, reply_timeout=reply_timeout)
    assert greeting == Reply(220, "mx.test ESMTP")
    return client


def hop(port: int) -> Hop:
    return Hop(connect_to="127.0.0.1", port=port, name="mx.test", tls="none")


# --- the client on its own ----------------------------------------------------------------------


def test_mail_rcpt_and_data_go_in_one_write_and_replies_in_one_read_are_all_kept() -> None:
    async def main() -> None:
        group = b"MAIL FROM:<a@s.test>\r\nRCPT TO:<b@r.test>\r\nRCPT TO:<c@r.test>\r\nDATA\r\n"
        steps = [
            greeting(),
            # A multi-line reply in pieces that split its lines anywhere.
            Step(b"EHLO me.test\r\n", [EHLO_PIPELINING[:5], EHLO_PIPELINING[5:20], EHLO_PIPELINING[20:]]),
            # Nothing is answered until the whole group has arrived; then every reply in one write.
            Step(group, [b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n354 go on\r\n"]),
            Step(b"\r\n.\r\n", [b"250 2.0.0 queued as Q1\r\n"]),
            Step(b"QUIT\r\n", [b"221 bye\r\n"]),
        ]
        async with scripted(steps) as (port, script):
            client = await connected(port)
            ehlo = await client.hello("me.test")
            assert ehlo == Reply(250, "mx.test\nPIPELINING\nSIZE 100000")
            assert client.extensions == {"pipelining": "", "size": "100000"}
            mail, rcpts, data = await client.transaction(
                b"<a@s.test>", [b"<b@r.test>", b"<c@r.test>"], pipelining=client.offers("pipelining")
            )
            assert (mail.code, [r.code for r in rcpts], data) == (250, [250, 550], Reply(354, "go on"))
            assert str(rcpts[1]) == "550 5.1.1 no such user"
            final = await client.send_data(data_for_the_wire(b"Subject: x\r\n\r\n.dot\r\n"))
            assert final == Reply(250, "2.0.0 queued as Q1")
            await client.quit()
            await script.done.wait()
        assert script.received[2] == group  # one group: the server answered nothing before it all came
        assert script.received[3] == b"Subject: x\r\n\r\n..dot\r\n.\r\n"

    run(main())


def test_without_pipelining_rcpt_waits_for_mail_and_data_for_an_accepted_rcpt() -> None:
    async def main() -> None:
        steps = [
            greeting(),
            Step(b"EHLO me.test\r\n", [b"250 mx.test\r\n"]),
            Step(b"MAIL FROM:<a@s.test>\r\n", [b"250 ok\r\n"]),
            Step(b"RCPT TO:<b@r.test>\r\n", [b"550 no\r\n"]),
            Step(b"QUIT\r\n", [b"221 bye\r\n"]),
        ]
        async with scripted(steps) as (port, script):
            client = await connected(port)
            await client.hello("me.test")
            assert not client.offers("pipelining")
            mail, rcpts, data = await client.transaction(b"<a@s.test>", [b"<b@r.test>"], pipelining=False)
            assert (mail.code, [r.code for r in rcpts], data) == (250, [550], None)  # no DATA sent
            await client.quit()
            await script.done.wait()
        assert script.received[-1] == b"QUIT\r\n"

    run(main())


def test_a_server_answering_ehlo_with_421_gets_no_helo_and_is_passed_over() -> None:
    async def main() -> None:
        steps = [greeting(), Step(b"EHLO me.test\r\n", [b"421 4.3.2 shutting down\r\n"])]
        async with scripted(steps) as (port, script):
            with pytest.raises(HopFailure, match=r"answered 421 4\.3\.2 shutting down") as failure:
                await OutboundConnection.open(hop(port), helo_name="me.test", reply_timeout=5)
            assert not failure.value.permanent
            await script.done.wait()
        assert len(script.received) == 2  # no HELO came after the 421

    run(main())


def test_a_greeting_that_never_comes_is_a_hop_failure() -> None:
    async def main() -> None:
        async with scripted([Step(b"", [])]) as (port, _):
            with pytest.raises(HopFailure, match=r"did not answer within 0\.2s"):
                await OutboundConnection.open(hop(port), helo_name="me.test", reply_timeout=0.2)

    run(main())


def test_a_server_refusing_ehlo_gets_helo() -> None:
    async def main() -> None:
        steps = [
            greeting(),
            Step(b"EHLO me.test\r\n", [b"502 5.5.1 not implemented\r\n"]),
            Step(b"HELO me.test\r\n", [b"250 mx.test\r\n"]),
        ]
        async with scripted(steps) as (port, _):
            client = await connected(port)
            assert await client.hello("me.test") == Reply(250, "mx.test")
            assert client.extensions == {}
            client.close()

    run(main())


@pytest.mark.parametrize(
    "answer",
    [b"hello there\r\n", b"250-first\r\n451 second\r\n", b"2" * 9000],
    ids=["no code", "codes differ", "endless line"],
)
def test_a_reply_that_is_not_smtp_fails_the_connection(answer: bytes) -> None:
    async def main() -> None:
        async with scripted([greeting(), Step(b"EHLO me.test\r\n", [answer])]) as (port, _):
            client = await connected(port)
            with pytest.raises(MalformedReply):
                await client.hello("me.test")
            assert not client.is_open

    run(main())


def test_a_server_that_does_not_answer_times_out() -> None:
    async def main() -> None:
        async with scripted([greeting(), Step(b"EHLO me.test\r\n", [])]) as (port, _):
            client = await connected(port, reply_timeout=0.2)
            with pytest.raises(ReplyTimeout, match=r"no reply within 0\.2s"):
                await client.hello("me.test")
            client.close()

    run(main())


def test_plaintext_after_the_starttls_reply_is_never_read_as_a_reply(tmp_path: object) -> None:
    """A man in the middle can append replies to the server's 220; read after the handshake, they would
    answer the client's first encrypted command (STARTTLS response injection). They are dropped."""
    ca = trustme.CA()

    async def main() -> None:
        steps = [
            greeting(),
            Step(b"EHLO me.test\r\n", [b"250-mx.test\r\n250 STARTTLS\r\n"]),
            Step(
                b"STARTTLS\r\n",
                [b"220 2.0.0 ready\r\n250-injected\r\n250 AUTH PLAIN\r\n"],
                server_tls_context(ca),
            ),
            Step(b"EHLO me.test\r\n", [b"250-mx.test\r\n250 SIZE 5\r\n"]),
        ]
        async with scripted(steps) as (port, _):
            client = await connected(port)
            await client.hello("me.test")
            context = ssl.create_default_context()
            ca.configure_trust(context)
            assert (await client.starttls(context, "localhost")).code == 220
            assert client.encrypted and client.extensions == {}
            assert await client.hello("me.test") == Reply(250, "mx.test\nSIZE 5")
            assert client.extensions == {"size": "5"}
            client.close()

    run(main())


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\nb", b"a\r\nb\r\n.\r\n"),  # lone LF, and no line end at the end
        (b"a\rb\r\n", b"a\r\nb\r\n.\r\n"),  # lone CR
        (b".a\r\n.\r\nb\r\n..c\r\n", b"..a\r\n..\r\nb\r\n...c\r\n.\r\n"),
        (b"a\n.\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),  # a bare-LF dot line: must not end the message
    ],
)
def test_data_leaves_with_crlf_line_ends_dot_stuffed_and_ended(data: bytes, wire: bytes) -> None:
    assert data_for_the_wire(data) == wire


# --- one transaction (outbound.py) ---------------------------------------------------------------


def send_one(steps: list[Step], recipients: list[str]) -> tuple[object, Script]:
    async def main() -> tuple[object, Script]:
        async with scripted(steps) as (port, script):
            connection = await OutboundConnection.open(hop(port), helo_name="me.test", reply_timeout=5)
            try:
                outcome: object = await connection.send(
                    mail_from="a@s.test", recipients=recipients, data=b"Subject: x\r\n\r\nhi\r\n"
                )
            except ConnectionLost as lost:
                outcome = lost
            await connection.close()
            await script.done.wait()
            return outcome, script

    return run(main())


def test_data_accepted_with_no_recipient_is_ended_empty_and_reset() -> None:
    """RFC 2920 §3.1: a server may answer 354 to a pipelined DATA although it refused every RCPT."""
    group = b"MAIL FROM:<a@s.test> SIZE=18\r\nRCPT TO:<b@r.test>\r\nDATA\r\n"
    steps = [
        greeting(),
        Step(b"EHLO me.test\r\n", [EHLO_PIPELINING]),
        Step(group, [b"250 ok\r\n550 5.1.1 no such user\r\n354 go on\r\n"]),
        Step(b".\r\n", [b"554 5.5.1 no valid recipients\r\n"]),
        Step(b"RSET\r\n", [b"250 ok\r\n"]),
        Step(b"QUIT\r\n", [b"221 bye\r\n"]),
    ]
    results, script = send_one(steps, ["b@r.test"])
    assert isinstance(results, list)
    assert [(r.outcome, r.reply) for r in results] == [("permanent", "550 5.1.1 no such user")]
    assert script.received[2:5] == [group, b".\r\n", b"RSET\r\n"]  # no message went


def test_a_refused_sender_refuses_every_recipient_with_its_reply() -> None:
    steps = [
        greeting(),
        Step(b"EHLO me.test\r\n", [EHLO_PIPELINING]),
        Step(
            b"DATA\r\n",
            [b"451 4.7.1 slow down\r\n503 5.5.1 MAIL first\r\n503 5.5.1 MAIL first\r\n", b"503 x\r\n"],
        ),
        Step(b"RSET\r\n", [b"250 ok\r\n"]),
        Step(b"QUIT\r\n", [b"221 bye\r\n"]),
    ]
    results, _ = send_one(steps, ["b@r.test", "c@r.test"])
    assert isinstance(results, list)
    assert [(r.outcome, r.reply) for r in results] == [("temporary", "451 4.7.1 slow down")] * 2


def test_one_by_one_a_mail_reply_other_than_250_sends_no_rcpt() -> None:
    """The same rule as outbound.py's reading of the replies (MAIL_ACCEPTED): a 2xx that is not 250
    must not let RCPT and DATA go, or the transaction would end in a lone dot (an empty message)."""
    steps = [
        greeting(),
        Step(b"EHLO me.test\r\n", [b"250 mx.test\r\n"]),
        Step(b"MAIL FROM:<a@s.test>\r\n", [b"252 2.1.0 odd\r\n"]),
        Step(b"RSET\r\n", [b"250 ok\r\n"]),
        Step(b"QUIT\r\n", [b"221 bye\r\n"]),
    ]
    results, script = send_one(steps, ["b@r.test"])
    assert isinstance(results, list) and [r.reply for r in results] == ["252 2.1.0 odd"]
    assert script.received[2:4] == [b"MAIL FROM:<a@s.test>\r\n", b"RSET\r\n"]


@pytest.mark.parametrize(("cut_after", "data_sent"), [(b"DATA\r\n", False), (b"\r\n.\r\n", True)])
def test_a_connection_cut_mid_transaction_says_whether_the_message_may_have_gone(
    cut_after: bytes, data_sent: bool
) -> None:
    replies = [] if not data_sent else [b"250 ok\r\n250 ok\r\n354 go on\r\n"]
    steps = [greeting(), Step(b"EHLO me.test\r\n", [EHLO_PIPELINING])]
    if data_sent:
        steps.append(Step(b"DATA\r\n", replies))
    steps.append(Step(cut_after, [], close=True))
    lost, _ = send_one(steps, ["b@r.test"])
    assert isinstance(lost, ConnectionLost)
    assert lost.data_sent is data_sent
    assert "lost" in lost.reason


def test_a_server_that_stops_reading_a_large_message_and_goes_away_ends_the_transaction() -> None:
    """The message is far larger than the socket buffers: the client waits for them to drain, and a
    connection lost meanwhile must end that wait (not spin on it)."""

    async def main() -> object:
        steps = [
            greeting(),
            Step(b"EHLO me.test\r\n", [EHLO_PIPELINING.replace(b"SIZE 100000", b"SIZE")]),
            Step(b"DATA\r\n", [b"250 ok\r\n250 ok\r\n354 go on\r\n"]),
            Step(b"", [], close=True, linger=0.3),  # reads none of the data, then closes
        ]
        async with scripted(steps) as (port, _):
            connection = await OutboundConnection.open(hop(port), helo_name="me.test", reply_timeout=5)
            data = b"Subject: big\r\n\r\n" + b"x" * 76 * 100_000 + b"\r\n"
            async with asyncio.timeout(10):
                try:
                    return await connection.send(mail_from="a@s.test", recipients=["b@r.test"], data=data)
                except ConnectionLost as lost:
                    return lost

    lost = run(main())
    assert isinstance(lost, ConnectionLost) and lost.data_sent


def test_a_reply_nobody_asked_for_retires_the_connection_before_the_next_transaction() -> None:
    """A server closing an idle connection says "421" first; that reply must not answer our next MAIL."""

    async def main() -> tuple[object, object, bool]:
        steps = [
            greeting(),
            Step(b"EHLO me.test\r\n", [EHLO_PIPELINING]),
            Step(b"DATA\r\n", [b"250 ok\r\n250 ok\r\n354 go on\r\n"]),
            Step(b"\r\n.\r\n", [b"250 2.0.0 queued\r\n", b"421 4.4.2 idle too long\r\n"]),
        ]
        async with scripted(steps) as (port, _):
            connection = await OutboundConnection.open(hop(port), helo_name="me.test", reply_timeout=5)
            first = await connection.send(mail_from="a@s.test", recipients=["b@r.test"], data=b"hi\r\n")
            await asyncio.sleep(0.1)  # the 421 arrives
            still_open = connection.is_open
            try:
                second: object = await connection.send(
                    mail_from="a@s.test", recipients=["c@r.test"], data=b"x"
                )
            except ConnectionLost as lost:
                second = lost
            await connection.close()
            return first, second, still_open

    first, second, still_open = run(main())
    assert isinstance(first, list) and first[0].reply == "250 2.0.0 queued"
    assert not still_open  # the pool would not hand it out again
    assert isinstance(second, ConnectionLost) and not second.data_sent
    assert "421 4.4.2 idle too long" in second.reason
