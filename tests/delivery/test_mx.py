"""Direct delivery by MX lookup (no relay): a DNS server and receiving servers of our own on loopback.

--smtp-out-port is one port for every mail host, so two receivers share a port on two loopback
addresses (127.0.0.2 and 127.0.0.3; Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import trustme

from tests.delivery.conftest import StartNode
from tests.delivery.dns_server import DnsServer
from tests.delivery.helpers import all_in, send, smtp_user, wait_for_states
from tests.delivery.receiver import Receiver, free_port_on, server_tls_context
from tests.support import Owner

LETTER = "Subject: hello\r\n\r\nHello by MX.\r\n"


def test_the_refusing_mx_is_passed_over_for_the_next_one(start_node: StartNode, sender: Owner) -> None:
    port = free_port_on("127.0.0.2", "127.0.0.3")
    zone = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"]},  # nothing listens there: connection refused
        "mx2.example.test": {"A": ["127.0.0.3"]},
    }
    with DnsServer(zone) as dns, Receiver("127.0.0.3", port) as mx2:
        node = start_node("--dns-server", dns.address, "--smtp-out-port", str(port))
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test", "bob@example.test"], LETTER)
        states = wait_for_states(node, queue_id, all_in("delivered"), "delivered")
        [message] = mx2.wait_for_messages(1)
        assert message.rcpt_tos == ["ann@example.test", "bob@example.test"]  # one transaction per domain
        assert [s.attempts for s in states] == [1, 1]
        assert ("example.test", "MX") in dns.queries


def test_an_mx_refusing_at_its_greeting_is_passed_over(start_node: StartNode, sender: Owner) -> None:
    port = free_port_on("127.0.0.2", "127.0.0.3")
    zone = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"]},
        "mx2.example.test": {"A": ["127.0.0.3"]},
    }
    with (
        DnsServer(zone) as dns,
        Receiver("127.0.0.2", port, greeting="554 5.7.1 no service here") as mx1,
        Receiver("127.0.0.3", port) as mx2,
    ):
        node = start_node("--dns-server", dns.address, "--smtp-out-port", str(port))
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test"], LETTER)
        wait_for_states(node, queue_id, all_in("delivered"), "delivered")
        assert len(mx2.wait_for_messages(1)) == 1
        assert mx1.messages == []
        assert mx1.connections >= 1


def test_mx_preference_is_followed(start_node: StartNode, sender: Owner) -> None:
    port = free_port_on("127.0.0.2", "127.0.0.3")
    zone = {  # listed worst first: the order of the records must not matter, only their preference
        "example.test": {"MX": [(50, "backup.example.test"), (5, "primary.example.test")]},
        "primary.example.test": {"A": ["127.0.0.3"]},
        "backup.example.test": {"A": ["127.0.0.2"]},
    }
    with (
        DnsServer(zone) as dns,
        Receiver("127.0.0.2", port) as backup,
        Receiver("127.0.0.3", port) as primary,
    ):
        node = start_node("--dns-server", dns.address, "--smtp-out-port", str(port))
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@example.test"], LETTER)
        wait_for_states(node, queue_id, all_in("delivered"), "delivered")
        assert len(primary.wait_for_messages(1)) == 1
        assert backup.messages == []


def test_without_mx_the_address_record_is_used(start_node: StartNode, sender: Owner) -> None:
    port = free_port_on("127.0.0.2")
    with DnsServer({"plain.test": {"A": ["127.0.0.2"]}}) as dns, Receiver("127.0.0.2", port) as host:
        node = start_node("--dns-server", dns.address, "--smtp-out-port", str(port))
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@plain.test"], LETTER)
        wait_for_states(node, queue_id, all_in("delivered"), "delivered")
        [message] = host.wait_for_messages(1)
        assert message.rcpt_tos == ["ann@plain.test"]
        assert ("plain.test", "MX") in dns.queries and ("plain.test", "A") in dns.queries


def test_recipients_at_two_domains_go_to_each_domains_host(start_node: StartNode, sender: Owner) -> None:
    port = free_port_on("127.0.0.2", "127.0.0.3")
    zone = {
        "one.test": {"MX": [(10, "mx.one.test")]},
        "mx.one.test": {"A": ["127.0.0.2"]},
        "two.test": {"MX": [(10, "mx.two.test")]},
        "mx.two.test": {"A": ["127.0.0.3"]},
    }
    with DnsServer(zone) as dns, Receiver("127.0.0.2", port) as one, Receiver("127.0.0.3", port) as two:
        node = start_node("--dns-server", dns.address, "--smtp-out-port", str(port))
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["a@one.test", "b@two.test", "c@ONE.test"], LETTER)
        wait_for_states(node, queue_id, all_in("delivered"), "delivered")
        [at_one] = one.wait_for_messages(1)
        [at_two] = two.wait_for_messages(1)
        assert at_one.rcpt_tos == ["a@one.test", "c@ONE.test"]  # domains compare without case
        assert at_two.rcpt_tos == ["b@two.test"]


def test_a_domain_that_does_not_exist_bounces(start_node: StartNode, sender: Owner) -> None:
    port = free_port_on("127.0.0.2")
    zone = {"sender.test": {"MX": [(10, "mx.sender.test")]}, "mx.sender.test": {"A": ["127.0.0.2"]}}
    with DnsServer(zone) as dns, Receiver("127.0.0.2", port) as senders_mx:
        node = start_node("--dns-server", dns.address, "--smtp-out-port", str(port))
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@nowhere.test"], LETTER)
        [state] = wait_for_states(node, queue_id, all_in("bounced"), "bounced")
        assert state.last_reply is not None and "does not exist" in state.last_reply
        [report] = senders_mx.wait_for_messages(1)  # the report goes by MX to the sender's domain
        assert report.rcpt_tos == ["app@sender.test"]
        text = report.data.decode()
        assert "Final-Recipient: rfc822; ann@nowhere.test" in text
        assert "Status: 5.1.2" in text


def test_a_null_mx_bounces(start_node: StartNode, sender: Owner) -> None:
    with DnsServer({"nomail.test": {"MX": [(0, ".")]}}) as dns:
        node = start_node("--dns-server", dns.address, "--smtp-out-port", str(free_port_on("127.0.0.2")))
        user = smtp_user(node, sender)
        queue_id = send(node, user, "", ["ann@nomail.test"], LETTER)
        [state] = wait_for_states(node, queue_id, all_in("bounced"), "bounced")
        assert state.last_reply is not None and "null MX" in state.last_reply


def test_a_dns_failure_defers_and_delivery_follows_when_dns_recovers(
    start_node: StartNode, sender: Owner
) -> None:
    port = free_port_on("127.0.0.2")
    zone = {"flaky.test": {"MX": [(10, "mx.flaky.test")]}, "mx.flaky.test": {"A": ["127.0.0.2"]}}
    with DnsServer(zone, servfail={"flaky.test"}) as dns, Receiver("127.0.0.2", port) as host:
        node = start_node("--dns-server", dns.address, "--smtp-out-port", str(port), "--retry-delays", "0.5")
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@flaky.test"], LETTER)
        [state] = wait_for_states(node, queue_id, all_in("deferred"), "deferred")
        assert state.last_reply is not None and "SERVFAIL" in state.last_reply
        dns.set_servfail("flaky.test", False)
        [state] = wait_for_states(node, queue_id, all_in("delivered"), "delivered once DNS answers")
        assert state.attempts >= 2
        assert len(host.wait_for_messages(1)) == 1


def test_a_4xx_from_every_mx_defers(start_node: StartNode, sender: Owner) -> None:
    port = free_port_on("127.0.0.2", "127.0.0.3")
    zone = {
        "busy.test": {"MX": [(10, "mx1.busy.test"), (20, "mx2.busy.test")]},
        "mx1.busy.test": {"A": ["127.0.0.2"]},
        "mx2.busy.test": {"A": ["127.0.0.3"]},
    }
    with (
        DnsServer(zone) as dns,
        Receiver("127.0.0.2", port, greeting="421 4.3.2 too busy"),
        Receiver("127.0.0.3", port, greeting="421 4.3.2 too busy"),
    ):
        node = start_node("--dns-server", dns.address, "--smtp-out-port", str(port))
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@busy.test"], LETTER)
        [state] = wait_for_states(node, queue_id, all_in("deferred"), "deferred")
        assert state.last_reply is not None
        assert "mx1.busy.test" in state.last_reply and "mx2.busy.test" in state.last_reply


def test_starttls_is_used_when_offered_whatever_the_certificate(start_node: StartNode, sender: Owner) -> None:
    """Opportunistic TLS (RFC 7435): encrypt when the host offers it; an MX host's certificate is
    not checked (nothing says which name it should carry), and plaintext is the alternative."""
    port = free_port_on("127.0.0.2")
    zone = {"tls.test": {"MX": [(10, "mx.tls.test")]}, "mx.tls.test": {"A": ["127.0.0.2"]}}
    context = server_tls_context(trustme.CA(), "some-other-name.example")
    with DnsServer(zone) as dns, Receiver("127.0.0.2", port, starttls_context=context) as host:
        node = start_node("--dns-server", dns.address, "--smtp-out-port", str(port))
        user = smtp_user(node, sender)
        queue_id = send(node, user, "app@sender.test", ["ann@tls.test"], LETTER)
        wait_for_states(node, queue_id, all_in("delivered"), "delivered")
        [message] = host.wait_for_messages(1)
        assert message.tls
