"""A TCP proxy on loopback that can play a database server restarting.

    with TcpProxy("127.0.0.1", 5432) as proxy:
        ...  # give the node postgresql://...@127.0.0.1:{proxy.port}/db
        proxy.down()  # every connection is closed at once, new ones are refused: the server is gone
        proxy.up()  # accepting again on the same port: the server is back

What the node sees is what a client of a restarting PostgreSQL sees: its open connections die in the
middle of whatever they were doing (closed without a word, as by a server killed or restarted
immediately; a server shutting down "fast" first sends an error, 57P01), and connecting fails with
"connection refused" until the server listens again. The real server behind the proxy is never
touched (other tests share it): a cut connection's backend sees its client vanish and rolls back its
open transaction, as it would if the server itself had restarted.

The proxy runs on an event loop in a thread of its own; ``down()`` and ``up()`` return once done.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any


class _End(asyncio.Protocol):
    """One side of a proxied connection; what it reads is written to the other side."""

    def __init__(self, proxy: TcpProxy) -> None:
        self._proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.other: _End | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._proxy._live.add(self)

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)

    # Flow control: when the other side cannot take more, stop reading this one.
    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def eof_received(self) -> bool:
        if (
            self.other is not None
            and self.other.transport is not None
            and self.other.transport.can_write_eof()
        ):
            self.other.transport.write_eof()
            return True  # half-closed: the other direction may still carry data
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._proxy._live.discard(self)
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` (a free one unless given) to ``target_host``:``target_port``."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = port
        self.accepted = 0  # connections accepted, over the proxy's life
        self.cut = 0  # connections cut by down()
        self._live: set[_End] = set()  # touched on the proxy's thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"tcp-proxy to :{self.target_port}", daemon=True)
        self._thread.start()
        ready.wait(10)
        self.up()
        return self

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.down()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the server going away and coming back --------------------------------------------------

    def down(self) -> int:
        """Stop listening (connecting is refused) and cut every open connection; returns how many."""
        return self._call(self._down())

    def up(self) -> None:
        """Listen again, on the same port."""
        self._call(self._up())

    def _call(self, coro: Coroutine[Any, Any, int]) -> int:
        assert self._loop is not None, "start() the proxy first"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _up(self) -> int:
        if self._server is not None:
            return 0
        # Bound here, not by create_server, so the port is known before it listens. SO_REUSEADDR:
        # connections cut by down() may sit in TIME_WAIT on this port.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._server = await asyncio.get_running_loop().create_server(self._accepted, sock=sock, backlog=128)
        return 0

    async def _down(self) -> int:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        live = list(self._live)
        for end in live:
            end.abort()
        for _ in range(200):  # let connection_lost run for each, so nothing is left half-open
            if not self._live:
                break
            await asyncio.sleep(0.005)
        clients = sum(1 for end in live if isinstance(end, _ClientEnd))
        self.cut += clients
        return clients

    def _accepted(self) -> _End:
        self.accepted += 1
        return _ClientEnd(self)


class _ClientEnd(_End):
    """The side the node connected to: opens the connection to the real server when accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()  # until the server side is there to take what it reads
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        upstream = _End(self._proxy)
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: upstream, self._proxy.target_host, self._proxy.target_port
            )
        except OSError:
            self.abort()
            return
        if self.transport is None or self.transport.is_closing():
            upstream.abort()
            return
        self.other, upstream.other = upstream, self
        self.transport.resume_reading()
