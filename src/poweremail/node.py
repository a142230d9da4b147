"""One node: the roles ``poweremail serve`` runs (API now; SMTP and delivery join), in one event loop.

Sockets are bound first, so a port in use stops the program before anything has started. SIGINT
and SIGTERM stop every role and close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from poweremail.api.app import create_app
from poweremail.config import Settings
from poweremail.listeners import bind_tcp, describe
from poweremail.services import open_services

logger = logging.getLogger("poweremail")


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: the node decides when every role stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_node(settings: Settings) -> None:
    api_socket = (
        bind_tcp(settings.api_host, settings.api_port, purpose="the API") if "api" in settings.roles else None
    )
    services = await open_services(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    roles: list[asyncio.Task[None]] = []
    api_server: _ApiServer | None = None
    try:
        if api_socket is not None:
            api_server = _ApiServer(
                uvicorn.Config(
                    create_app(services),
                    log_config=None,
                    access_log=False,  # query strings could carry secrets; calls log themselves
                    lifespan="off",
                    server_header=False,
                    http="httptools",
                )
            )
            roles.append(asyncio.create_task(api_server.serve(sockets=[api_socket]), name="api"))
            logger.info("API listening on http://%s (docs at /docs)", describe(api_socket))
        logger.info(
            "PowerEmail node running roles %s; database %s",
            ",".join(settings.roles),
            services.database.dialect,
        )
        stop_waiter = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait([stop_waiter, *roles], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop_waiter and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        stop_waiter.cancel()
        logger.info("stopping")
    finally:
        if api_server is not None:
            api_server.should_exit = True
        await asyncio.gather(*roles, return_exceptions=True)
        await services.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
