"""One node: the roles ``poweremail serve`` runs (API, SMTP submission, delivery), in one event loop.

Every socket is bound first, so a port in use stops the program before anything has started.
SIGINT and SIGTERM stop the node gracefully: listeners close, open SMTP transactions and deliveries
in flight may finish (for at most ``--shutdown-grace`` seconds), unattempted delivery claims are
given back, and the process exits 0.

With ``--workers N`` (N > 1) the CLI runs :func:`prepare_node` once, then N processes each run
:func:`run_node` on the sockets the parent bound (see ``poweremail.supervisor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
from collections.abc import Callable, Iterator

import uvicorn

from poweremail.api.app import create_app
from poweremail.config import Settings
from poweremail.delivery.worker import DeliveryWorker
from poweremail.doorbell import Doorbell
from poweremail.listeners import TakeTurnsSocket, bind_tcp, describe
from poweremail.services import Services, open_services
from poweremail.smtp.server import SubmissionServers, start_smtp_servers
from poweremail.smtp.tls import certificate_paths, server_context
from poweremail.store import delivery_queue
from poweremail.store.submissions import sweep_unclaimed_parts

logger = logging.getLogger("poweremail")


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: the node decides when every role stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# When the hard limit on open files is unlimited, ask for Linux's default ceiling (fs.nr_open).
_UNLIMITED_OPEN_FILES = 1 << 20


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one; returns the limit now in force.

    Every SMTP session holds a socket. The soft limit most systems start a process with (1,024)
    let the node hold about a thousand sessions: 1,000 idle connections were enough to stop it
    accepting any more, the rightful users' included, and asyncio logged an error with a traceback
    for every accept it retried. The hard limit is what the administrator allows; raising the soft
    one up to it needs no privilege.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _UNLIMITED_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        logger.warning("could not raise the limit on open files from %d to %d: %s", soft, wanted, exc)
        return soft
    return wanted


def bind_all(settings: Settings, *, shared: bool = False) -> dict[str, socket.socket]:
    """Every listening socket the node's roles need; a port in use is one ``ListenError``.
    ``shared``: for worker processes that take turns accepting on them (TakeTurnsSocket)."""
    wanted = {
        "api": [("api", settings.api_host, settings.api_port, "the API")],
        "smtp": [
            ("submission", settings.smtp_host, settings.smtp_port, "SMTP submission"),
            ("smtps", settings.smtp_host, settings.smtps_port, "SMTP submission over TLS"),
        ],
    }
    sockets: dict[str, socket.socket] = {}
    try:
        for role in settings.roles:
            for name, host, port, purpose in wanted.get(role, []):
                sock = bind_tcp(host, port, purpose=purpose)
                sockets[name] = TakeTurnsSocket(sock) if shared else sock
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


def _api_server(services: Services) -> _ApiServer:
    return _ApiServer(
        uvicorn.Config(
            create_app(services),
            log_config=None,
            access_log=False,  # query strings could carry secrets; calls log themselves
            lifespan="off",
            server_header=False,
            http="httptools",
        )
    )


async def prepare_node(settings: Settings) -> None:
    """What must happen once before several worker processes start, and can fail with one line: the
    data directory and key, the migrations, the self-signed certificate (N workers must not race
    to write it; a configured pair that does not load is reported here), and giving back the
    delivery leases a single-process run of this node left (each worker gives back its own).

    Everything it opened is closed again when it returns: the caller forks next.
    """
    services = await open_services(settings)
    try:
        if "smtp" in settings.roles:
            server_context(*certificate_paths(settings))
        if "delivery" in settings.roles:
            released = await services.database.write(
                lambda conn: delivery_queue.release_leases(conn, worker=settings.node_name)
            )
            if released:
                logger.info("delivery: gave back %d recipient(s) node %r had in hand", released,
                            settings.node_name)  # fmt: skip
    finally:
        await services.close()


def worker_settings(settings: Settings, index: int) -> Settings:
    """The settings of worker ``index`` (1 to workers + delivery_workers) of a node: its own delivery
    worker name, so a worker that is started again resumes its own claims at once (and no other
    worker's); with ``--delivery-workers``, the first ``workers`` leave delivery to the others."""
    roles = settings.roles
    if settings.delivery_workers:
        roles = ("delivery",) if index > settings.workers else tuple(r for r in roles if r != "delivery")
    return settings.model_copy(update={"node_name": f"{settings.node_name}-{index}", "roles": roles})


async def run_node(
    settings: Settings, *, sockets: dict[str, socket.socket] | None = None, doorbell: Doorbell | None = None
) -> None:
    """Run the node until SIGINT/SIGTERM; ``sockets``: already bound (by bind_all), e.g. inherited;
    ``doorbell``: shared with the node's other workers when delivery runs in processes of its own."""
    open_files = raise_open_file_limit()
    if sockets is None:
        sockets = bind_all(settings)
    services = await open_services(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A worker process starts with them blocked (supervisor): pending until they are handled here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    tasks: list[asyncio.Task[None]] = []
    ringing: asyncio.Task[None] | None = None  # the doorbell, for as long as sessions may queue mail
    stop_listening: Callable[[], object] | None = None
    api_server: _ApiServer | None = None
    smtp_servers: SubmissionServers | None = None
    try:
        if "submission" in sockets:
            smtp_servers = await start_smtp_servers(
                services, submission_socket=sockets["submission"], smtps_socket=sockets["smtps"]
            )
            logger.info(
                "SMTP submission on %s (STARTTLS) and %s (TLS)",
                describe(sockets["submission"]),
                describe(sockets["smtps"]),
            )
            sweep = sweep_unclaimed_parts(services.database, stop)
            tasks.append(asyncio.create_task(sweep, name="unclaimed-parts"))
            if doorbell is not None and "delivery" not in settings.roles:
                ringing = asyncio.create_task(doorbell.forward(services.mail_queued), name="doorbell")
                tasks.append(ringing)
        if "delivery" in settings.roles:
            if doorbell is not None:
                stop_listening = doorbell.listen(services.mail_queued)
            worker = DeliveryWorker(services)
            tasks.append(asyncio.create_task(worker.run(stop), name="delivery"))
            logger.info(
                "delivery %s, as node %r",
                f"through the relay {settings.relay}" if settings.relay else "by MX lookup",
                settings.node_name,
            )
        if "api" in sockets:
            api_server = _api_server(services)
            tasks.append(asyncio.create_task(api_server.serve(sockets=[sockets["api"]]), name="api"))
            logger.info("API on http://%s (docs at /docs)", describe(sockets["api"]))
        logger.info(
            "PowerEmail node running roles %s on %s (up to %d open files)",
            ",".join(settings.roles),
            services.database.dialect,
            open_files,
        )
        stop_waiter = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait([stop_waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop_waiter and (error := task.exception()) is not None:
                raise error
        stop_waiter.cancel()
        logger.info("stopping")
    finally:
        # Graceful: accept nothing new, let what is under way finish (at most --shutdown-grace),
        # give back delivery claims, then close the store. A restart right after loses nothing.
        stop.set()  # also when a role failed: the others must end too
        if api_server is not None:
            api_server.should_exit = True
        if smtp_servers is not None:
            cut_off = await smtp_servers.stop(grace=settings.shutdown_grace)
            if cut_off:
                logger.warning("closed %d SMTP session(s) still in a transaction (no 250 sent)", cut_off)
        if ringing is not None:
            ringing.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if stop_listening is not None:
            stop_listening()
        await services.close()
        logger.info("stopped")
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
