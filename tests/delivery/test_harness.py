"""The delivery tests' own servers, checked with real clients (aiosmtplib, dnspython): a harness that
recorded the wrong thing would let a broken worker pass."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiosmtplib
import dns.asyncresolver
import dns.resolver
import pytest
import trustme

from tests.delivery.dns_server import DnsServer
from tests.delivery.receiver import Receiver, free_port_on, server_tls_context
from tests.support import run

SENDER = "alice@sender.test"
# Dot-stuffing, a bare 8-bit byte and a line of 998 octets: what arrives must be exactly what was sent.
BODY = (
    b"From: alice@sender.test\r\nSubject: harness\r\n\r\n"
    b".a line that starts with a dot\r\n..two\r\ncaf\xc3\xa9\r\n" + b"x" * 998 + b"\r\nend\r\n"
)


@asynccontextmanager
async def _client(receiver: Receiver, **kwargs: Any) -> AsyncIterator[aiosmtplib.SMTP]:
    """aiosmtplib's QUIT closes the connection without waiting for it to close: over TLS the socket can
    outlive ``asyncio.run`` (an unclosed-transport ResourceWarning, so a flaky failure). This waits."""
    client = aiosmtplib.SMTP(hostname=receiver.host, port=receiver.port, **kwargs)
    protocol = None
    try:
        async with client:
            protocol = client.protocol
            yield client
    finally:
        for _ in range(1000):
            if protocol is None or protocol.transport is None:  # set to None by connection_lost
                break
            await asyncio.sleep(0.005)


async def _send(receiver: Receiver, to: list[str], *, sender: str = SENDER, **kwargs: Any) -> list[int]:
    """One connection, one message; the codes of the recipients refused when others were accepted."""
    async with _client(receiver, **kwargs) as client:
        refused, _ = await client.sendmail(sender, to, BODY)  # aiosmtplib.send refuses sender ""
    return [response.code for response in refused.values()]


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


# --- Receiver ---------------------------------------------------------------------------------


def test_a_message_to_three_recipients_arrives_once_with_its_bytes_intact() -> None:
    recipients = ["bob@one.test", "Carol@two.test", "dave@two.test"]
    with Receiver() as receiver:
        assert receiver.port != 0 and receiver.address == f"127.0.0.1:{receiver.port}"
        run(_send(receiver, recipients))
        [message] = receiver.wait_for_recipients(3)
        assert message.mail_from == SENDER
        assert message.rcpt_tos == recipients
        assert message.data == BODY
        assert (message.peer, message.tls, message.auth_user) == ("127.0.0.1", False, None)
        assert message.connection_id == 1
        assert receiver.connections == 1
        assert receiver.rcpt_attempts == dict.fromkeys(recipients, 1)


def test_an_rcpt_script_defers_twice_then_accepts_counting_across_connections() -> None:
    def rcpt(address: str, n: int) -> str | None:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user"
        return "451 4.3.0 try again later" if n <= 2 else None

    async def attempt() -> list[int]:
        try:
            return await _send(receiver, ["bob@one.test", "nobody@one.test"])
        except aiosmtplib.SMTPRecipientsRefused as refused:  # all of them
            return [r.code for r in refused.recipients]

    with Receiver(rcpt=rcpt) as receiver:
        assert [run(attempt()) for _ in range(3)] == [[451, 550], [451, 550], [550]]
        assert receiver.rcpt_attempts == {"bob@one.test": 3, "nobody@one.test": 3}
        assert receiver.connections == 3
        [message] = receiver.messages
        assert (message.rcpt_tos, message.connection_id) == (["bob@one.test"], 3)


def test_mail_and_data_scripts_refuse_and_the_null_sender_is_recorded_as_empty() -> None:
    with Receiver(
        mail=lambda sender, n: "553 5.7.1 not you" if sender == "spammer@sender.test" else None,
        data=lambda n: "452 4.3.1 insufficient storage" if n == 1 else None,
    ) as receiver:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            run(_send(receiver, ["bob@one.test"], sender="spammer@sender.test"))
        assert refused.value.code == 553
        with pytest.raises(aiosmtplib.SMTPDataError) as deferred:
            run(_send(receiver, ["bob@one.test"], sender=""))
        assert deferred.value.code == 452
        run(_send(receiver, ["bob@one.test"], sender=""))
        [message] = receiver.wait_for_messages(1)
        assert message.mail_from == ""
        assert receiver.mail_attempts == {"spammer@sender.test": 1, "": 2}


def test_smtputf8_is_advertised_only_when_enabled() -> None:
    async def advertises_smtputf8(receiver: Receiver) -> bool:
        async with _client(receiver) as client:
            await client.ehlo()
            return client.supports_extension("smtputf8")

    with Receiver(smtputf8=False) as without, Receiver() as with_:
        assert run(advertises_smtputf8(without)) is False
        assert run(advertises_smtputf8(with_)) is True


def test_starttls_and_implicit_tls_with_a_trusted_certificate() -> None:
    ca = trustme.CA()
    with (
        Receiver(starttls_context=server_tls_context(ca)) as starttls,
        Receiver(implicit_tls_context=server_tls_context(ca)) as implicit,
    ):
        run(_send(starttls, ["bob@one.test"], start_tls=True, tls_context=_client_context(ca)))
        run(_send(implicit, ["bob@one.test"], use_tls=True, tls_context=_client_context(ca)))
        assert [(m.tls, m.connection_id) for m in starttls.wait_for_messages(1)] == [(True, 1)]
        assert [(m.tls, m.connection_id) for m in implicit.wait_for_messages(1)] == [(True, 1)]
        assert starttls.connections == implicit.connections == 1  # STARTTLS goes on the same connection


def test_a_client_that_distrusts_the_certificate_fails_and_the_receiver_carries_on() -> None:
    ca = trustme.CA()
    with Receiver(starttls_context=server_tls_context(ca)) as receiver:
        with pytest.raises(ssl.SSLCertVerificationError):  # aiosmtplib lets it through as it is
            run(_send(receiver, ["bob@one.test"], start_tls=True, tls_context=_client_context(trustme.CA())))
        run(_send(receiver, ["bob@one.test"], start_tls=False))
        assert [m.tls for m in receiver.wait_for_messages(1)] == [False]
        assert receiver.connections == 2


def test_auth_is_required_and_the_user_recorded() -> None:
    with Receiver(auth=("relayuser", "s3cret")) as receiver, Receiver() as no_auth:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            run(_send(receiver, ["bob@one.test"]))
        assert refused.value.code == 530
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            run(_send(receiver, ["bob@one.test"], username="relayuser", password="wrong"))
        run(_send(receiver, ["bob@one.test"], username="relayuser", password="s3cret"))
        assert [m.auth_user for m in receiver.wait_for_messages(1)] == ["relayuser"]
        # Without auth= nothing is advertised (aiosmtplib refuses to log in where AUTH is not offered).
        with pytest.raises(aiosmtplib.SMTPException, match="AUTH"):
            run(_send(no_auth, ["bob@one.test"], username="relayuser", password="s3cret"))


def test_messages_on_one_connection_share_its_id() -> None:
    async def two_then_one() -> None:
        async with _client(receiver) as client:
            await client.sendmail(SENDER, ["bob@one.test"], BODY)
            await client.sendmail(SENDER, ["carol@one.test"], BODY)
        await _send(receiver, ["dave@one.test"])

    with Receiver() as receiver:
        run(two_then_one())
        ids = [m.connection_id for m in receiver.wait_for_messages(3)]
        assert ids[0] == ids[1] != ids[2]
        assert receiver.connections == 2


def test_a_refusing_greeting_then_503_until_quit() -> None:
    with Receiver(greeting="554 5.7.1 go away") as receiver:
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
            run(_send(receiver, ["bob@one.test"]))
        assert refused.value.code == 554
        with socket.create_connection((receiver.host, receiver.port), timeout=10) as sock:
            stream = sock.makefile("rwb")
            assert stream.readline().startswith(b"554 5.7.1")
            stream.write(b"EHLO client.test\r\n")
            stream.flush()
            assert stream.readline().startswith(b"503 ")
            stream.write(b"QUIT\r\n")
            stream.flush()
            assert stream.readline().startswith(b"221 ")
            assert stream.readline() == b""
            stream.close()
        receiver.wait_for_connections(2)
        assert receiver.messages == []


def test_one_port_on_two_loopback_addresses() -> None:
    port = free_port_on("127.0.0.2", "127.0.0.3")
    with Receiver("127.0.0.2", port) as first, Receiver("127.0.0.3", port) as second:
        run(_send(first, ["bob@one.test"]))
        run(_send(second, ["carol@one.test"]))
        assert [m.rcpt_tos for m in first.wait_for_messages(1)] == [["bob@one.test"]]
        assert [m.rcpt_tos for m in second.wait_for_messages(1)] == [["carol@one.test"]]


def test_stopping_cuts_open_connections_and_a_restart_keeps_the_port() -> None:
    receiver = Receiver().start()
    sock = socket.create_connection((receiver.host, receiver.port), timeout=10)
    try:
        assert sock.recv(100).startswith(b"220 ")
        receiver.wait_for_connections(1)
        receiver.stop()
        assert sock.recv(100) == b""
        receiver.start()
        run(_send(receiver, ["bob@one.test"]))
        receiver.wait_for_messages(1)
    finally:
        sock.close()
        receiver.stop()


def test_a_failing_script_fails_the_test_and_waiting_times_out_with_what_it_saw() -> None:
    receiver = Receiver(rcpt=lambda address, n: str(1 / 0)).start()
    try:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            run(_send(receiver, ["bob@one.test"]))
        assert refused.value.recipients[0].code == 451
        with pytest.raises(AssertionError, match=r"no 1 message\(s\) within 0.1s; connections=1") as waited:
            receiver.wait_for_messages(1, timeout=0.1)
        assert "ZeroDivisionError" in str(waited.value)
    finally:
        with pytest.raises(AssertionError, match="scripts failed"):
            receiver.stop()


# --- DnsServer --------------------------------------------------------------------------------

RECORDS: dict[str, dict[str, list[Any]]] = {
    "Example.TEST.": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
    "noMX.test": {"A": ["127.0.0.2"]},
    "nullmx.test": {"MX": [(0, ".")]},
}


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(RECORDS, servfail={"broken.test"}) as server:
        yield server


def _resolve(server: DnsServer, name: str, rtype: str, *, tcp: bool = False) -> list[str]:
    async def resolve() -> list[str]:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [server.host]
        resolver.port = server.port
        resolver.lifetime = 5
        answer = await resolver.resolve(name, rtype, tcp=tcp)
        return sorted(rdata.to_text() for rdata in answer)

    return run(resolve())


def test_dns_mx_preferences_and_a_fallback(dns_server: DnsServer) -> None:
    assert dns_server.address == f"127.0.0.1:{dns_server.port}"
    assert _resolve(dns_server, "example.test", "MX") == ["10 mx1.example.test.", "20 mx2.example.test."]
    assert _resolve(dns_server, "MX1.example.test.", "A") == ["127.0.0.2"]
    assert _resolve(dns_server, "mx2.example.test", "AAAA") == ["::1"]
    assert _resolve(dns_server, "nullmx.test", "MX") == ["0 ."]
    with pytest.raises(dns.resolver.NoAnswer):
        _resolve(dns_server, "nomx.test", "MX")
    assert _resolve(dns_server, "nomx.test", "A") == ["127.0.0.2"]
    assert dns_server.queries[:2] == [("example.test", "MX"), ("mx1.example.test", "A")]


def test_dns_nxdomain_nodata_and_servfail(dns_server: DnsServer) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        _resolve(dns_server, "absent.test", "MX")
    with pytest.raises(dns.resolver.NoAnswer):
        _resolve(dns_server, "mx1.example.test", "AAAA")
    with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
        _resolve(dns_server, "broken.test", "MX")


def test_dns_over_tcp_and_records_changed_while_running(dns_server: DnsServer) -> None:
    assert _resolve(dns_server, "example.test", "MX", tcp=True) == [
        "10 mx1.example.test.",
        "20 mx2.example.test.",
    ]
    dns_server.set("mx1.example.test", "A", ["127.0.0.4", "127.0.0.5"])
    dns_server.set_servfail("nomx.test")
    dns_server.remove("mx2.example.test")
    assert _resolve(dns_server, "mx1.example.test", "A") == ["127.0.0.4", "127.0.0.5"]
    with pytest.raises(dns.resolver.NoNameservers):
        _resolve(dns_server, "nomx.test", "A")
    with pytest.raises(dns.resolver.NXDOMAIN):
        _resolve(dns_server, "mx2.example.test", "A")
