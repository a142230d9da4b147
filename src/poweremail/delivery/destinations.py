"""Where a recipient domain's mail goes: its MX hosts in preference order, else its own address
records (RFC 5321 §5.1), each host with the addresses to try.

A lookup that fails for now (a timeout, SERVFAIL) is a temporary failure; a domain that does not
exist, or says it takes no mail (a null MX, RFC 7505), is a permanent one.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from poweremail.config import parse_host_port

# Each query's deadline; the whole lookup of one domain (MX, then A and AAAA per host) stays bounded.
_DNS_LIFETIME = 10.0
# RFC 5321 §5.1: a client should try at least two hosts; more than this many are not worth a try in
# one attempt (the next attempt starts again from the best).
MAX_HOSTS = 5


class LookupFailure(Exception):
    """The domain's mail hosts could not be found. ``permanent``: they never will be."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class MailHost:
    name: str  # as the MX record names it (for TLS SNI and for the record of who answered)
    addresses: tuple[str, ...]  # IPv4 first: loopback-only and many real networks lack IPv6 routes


class MxResolver:
    def __init__(self, dns_server: str | None) -> None:
        if dns_server is None:
            self._resolver = dns.asyncresolver.Resolver()
        else:
            host, port = parse_host_port(dns_server)
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [host]
            self._resolver.port = port
        self._resolver.lifetime = _DNS_LIFETIME

    async def mail_hosts(self, domain: str) -> list[MailHost]:
        """The hosts to try for ``domain``, best first; raises LookupFailure."""
        literal = _address_literal(domain)
        if literal is not None:  # user@[192.0.2.1] (RFC 5321 §4.1.3)
            return [MailHost(domain, (literal,))]
        try:
            answer = await self._resolver.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise LookupFailure(f"the domain {domain} does not exist", permanent=True) from None
        except dns.resolver.NoAnswer:
            # No MX: the domain itself is the mail host (RFC 5321 §5.1, "implicit MX").
            hosts = [await self._host(domain)]
        except dns.exception.DNSException as exc:
            raise LookupFailure(f"MX lookup for {domain} failed: {_describe(exc)}", permanent=False) from None
        else:
            records = sorted(answer, key=lambda mx: (mx.preference, random.random()))  # noqa: S311
            names = [mx.exchange.to_text(omit_final_dot=True) for mx in records]
            if len(names) == 1 and names[0] in ("", "."):
                raise LookupFailure(
                    f"the domain {domain} accepts no mail (null MX, RFC 7505)", permanent=True
                )
            hosts = []
            errors: list[LookupFailure] = []
            for name in names[:MAX_HOSTS]:
                try:
                    hosts.append(await self._host(name))
                except LookupFailure as exc:
                    errors.append(exc)
            if not hosts:
                raise LookupFailure(
                    "; ".join(error.reason for error in errors),
                    permanent=all(error.permanent for error in errors),
                )
        return hosts

    async def _host(self, name: str) -> MailHost:
        addresses: list[str] = []
        temporary: str | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                temporary = f"{rdtype} lookup for {name} failed: {_describe(exc)}"
                continue
            addresses.extend(record.to_text() for record in answer)
        if not addresses:
            if temporary is not None:
                raise LookupFailure(temporary, permanent=False)
            raise LookupFailure(f"the mail host {name} has no address", permanent=True)
        return MailHost(name, tuple(addresses))


def _address_literal(domain: str) -> str | None:
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _describe(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.resolver.NoNameservers):
        return "the DNS server failed to answer (SERVFAIL)"
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    return type(exc).__name__
