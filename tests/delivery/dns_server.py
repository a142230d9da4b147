"""A small authoritative DNS server for the delivery tests (dnslib), on UDP and TCP of one loopback port.

    with DnsServer({
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"]},
        "nullmx.test": {"MX": [(0, ".")]},
    }, servfail={"broken.test"}) as dns:
        ...  # start the worker with --dns-server dns.address
        dns.set("mx1.example.test", "A", ["127.0.0.3"])  # records may change while it runs
        assert ("example.test", "MX") in dns.queries

Names are case-insensitive and their trailing dot optional. A name present answers NOERROR with its
records of the asked type, perhaps none (NODATA: dnspython raises NoAnswer); an absent name answers
NXDOMAIN; a name in ``servfail`` answers SERVFAIL (a temporary failure: dnspython raises NoNameservers).
Values: A and AAAA addresses as strings, MX ``(preference, exchange)`` (``(0, ".")`` is a null MX,
RFC 7505), TXT strings. No CNAMEs, no SOA in negative answers, no caching: nothing the worker needs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from dnslib import AAAA, MX, QTYPE, RCODE, RR, TXT, A, DNSRecord  # type: ignore[import-untyped]
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer  # type: ignore[import-untyped]

TTL = 60

_RDATA: dict[str, Callable[[Any], Any]] = {
    "A": A,
    "AAAA": AAAA,
    "MX": lambda value: MX(value[1], int(value[0])),
    "TXT": TXT,
}

_log = logging.getLogger(__name__)


class DnsServer:
    def __init__(
        self,
        records: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
        *,
        servfail: Iterable[str] = (),
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = 0
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, list[Any]]] = {}
        self._servfail = {_key(name) for name in servfail}
        self._queries: list[tuple[str, str]] = []
        self._servers: list[Any] = []
        self._threads: list[threading.Thread] = []
        for name, types in (records or {}).items():
            self._records.setdefault(_key(name), {})
            for rtype, values in types.items():
                self.set(name, rtype, values)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def queries(self) -> list[tuple[str, str]]:
        """(name, type) of every question so far, in order: name lowercased without the trailing dot."""
        with self._lock:
            return list(self._queries)

    def set(self, name: str, rtype: str, values: Sequence[Any]) -> None:
        """Replaces the ``rtype`` records of ``name`` (creating the name); no values leaves it NODATA."""
        rtype = rtype.upper()
        if rtype not in _RDATA:
            raise ValueError(f"record type {rtype} is not supported here (only {', '.join(_RDATA)})")
        rdata = [_RDATA[rtype](value) for value in values]  # bad values fail here, not in the server thread
        with self._lock:
            self._records.setdefault(_key(name), {})[rtype] = rdata

    def remove(self, name: str) -> None:
        """``name`` answers NXDOMAIN from now on."""
        with self._lock:
            self._records.pop(_key(name), None)

    def set_servfail(self, name: str, failing: bool = True) -> None:
        with self._lock:
            (self._servfail.add if failing else self._servfail.discard)(_key(name))

    def answer(self, request: DNSRecord) -> DNSRecord:
        """The reply to one question (called on the server's threads)."""
        reply = request.reply()
        name, rtype = _key(str(request.q.qname)), QTYPE[request.q.qtype]
        with self._lock:
            self._queries.append((name, rtype))
            if name in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
            elif name not in self._records:
                reply.header.rcode = RCODE.NXDOMAIN
            else:
                for rdata in self._records[name].get(rtype, []):
                    reply.add_answer(RR(request.q.qname, request.q.qtype, rdata=rdata, ttl=TTL))
        return reply

    # --- starting and stopping ----------------------------------------------------------------

    def start(self) -> DnsServer:
        if self._servers:
            raise RuntimeError(f"DNS server {self.address} already started")
        resolver = _Resolver(self)
        logger = DNSLogger(log="error", prefix=False, logf=_log.warning)  # its default prints every query
        for _ in range(100):
            udp = DNSServer(resolver, address=self.host, port=self.port, logger=logger)
            port = int(udp.server.server_address[1])
            try:
                tcp = DNSServer(resolver, address=self.host, port=port, tcp=True, logger=logger)
            except OSError:
                udp.server.server_close()
                if self.port:  # the caller's port: nothing else to try
                    raise
                continue
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        self.port = port
        self._servers = [udp, tcp]
        for server in self._servers:
            # dnslib's own start_thread polls for shutdown every 0.5 s: stopping would take that long.
            thread = threading.Thread(
                target=server.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.server.shutdown()
            server.server.server_close()  # dnslib's DNSServer.stop leaves the socket open
        for thread in self._threads:
            thread.join(10)
        self._servers, self._threads = [], []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, server: DnsServer) -> None:
        self._server = server

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        return self._server.answer(request)


def _key(name: str) -> str:
    return name.lower().rstrip(".")
