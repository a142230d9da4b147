"""The ``poweremail`` command: ``serve``, ``owner create|list|rotate-token``, ``keys rotate``.

Every failure a user can cause (a bad flag, an unreachable database, a busy port, a broken key
file) ends with one line on stderr and a non-zero exit, never a traceback (SPEC §6).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, NoReturn

import pydantic
import pydantic_settings

from poweremail import __version__
from poweremail.config import COMMON_FIELDS, Settings, load_settings
from poweremail.doorbell import Doorbell
from poweremail.keyring import DecryptionError, Keyring, KeyringError
from poweremail.listeners import ListenError, describe
from poweremail.services import DataDirError, Services, open_services
from poweremail.smtp.tls import TlsConfigError
from poweremail.store import owners, smtp_users
from poweremail.store.database import Database, DatabaseUnavailableError, DatabaseUrlError
from poweremail.supervisor import SupervisorError, supervise, worker_label

EXIT_FAILURE = 1
EXIT_USAGE = 2
# Long enough for an addSmtp that read the old key file to commit before the last sweep.
ROTATION_SETTLE_SECONDS = 1.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


class CommandError(Exception):
    """A failure to report in one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line."""

    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


def _settings_flags(fields: Sequence[str]) -> _Parser:
    """A parent parser with one ``--flag`` per Settings field; each is also a POWEREMAIL_* variable.

    Values stay strings here: Settings validates them, exactly as it validates the environment.
    """
    parent = _Parser(add_help=False)
    for name in fields:
        info = Settings.model_fields[name]
        env = f"POWEREMAIL_{name.upper()}"
        help_text = f"{info.description} (env {env})" if info.description else f"env {env}"
        parent.add_argument("--" + name.replace("_", "-"), dest=name, metavar="VALUE", help=help_text)
    return parent


def build_parser() -> argparse.ArgumentParser:
    common = _settings_flags(COMMON_FIELDS)
    serve_only = _settings_flags([name for name in Settings.model_fields if name not in COMMON_FIELDS])
    parser = _Parser(prog="poweremail", description="Self-hostable email-sending service.")
    parser.add_argument("--version", action="version", version=f"poweremail {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser(
        "serve", parents=[common, serve_only], help="run the node: API, SMTP, delivery"
    )
    serve.set_defaults(run=_serve)

    owner = commands.add_parser("owner", help="manage owners (the API's owner_id + token)")
    owner_commands = owner.add_subparsers(dest="owner_command", required=True, parser_class=_Parser)
    create = owner_commands.add_parser(
        "create", parents=[common], help="create an owner; prints owner_id and token"
    )
    create.add_argument("--name", help="a label for the owner")
    create.set_defaults(run=_owner_create)
    rotate = owner_commands.add_parser(
        "rotate-token", parents=[common], help="issue a new token; the old one stops working"
    )
    rotate.add_argument("owner_id")
    rotate.set_defaults(run=_owner_rotate_token)
    listing = owner_commands.add_parser("list", parents=[common], help="list owners (never their tokens)")
    listing.set_defaults(run=_owner_list)

    keys = commands.add_parser("keys", help="manage the key that encrypts SMTP passwords")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    keys_rotate = keys_commands.add_parser(
        "rotate", parents=[common], help="re-encrypt every password under a new key"
    )
    keys_rotate.set_defaults(run=_keys_rotate)
    return parser


def _settings_from(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(**{name: getattr(args, name, None) for name in Settings.model_fields})
    except pydantic_settings.SettingsError as exc:
        raise CommandError(f"bad settings: {exc}") from None
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        if not error["loc"]:  # a rule across several settings: its message names the flags
            raise CommandError(f"bad settings: {error['msg'].removeprefix('Value error, ')}") from None
        name = str(error["loc"][0])
        flag = "--" + name.replace("_", "-")
        message = error["msg"].removeprefix("Value error, ")
        raise CommandError(f"bad value for {flag} (or POWEREMAIL_{name.upper()}): {message}") from None


# --- commands ---------------------------------------------------------------------------------


async def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    from poweremail.node import run_node  # the web stack loads only for serve

    await run_node(settings)
    return 0


def _serve_workers(settings: Settings) -> int:
    """``serve --workers N [--delivery-workers M]``: bind and prepare once here, then N + M processes
    run the node (supervisor)."""
    from poweremail.node import bind_all, prepare_node, raise_open_file_limit, run_node, worker_settings

    raise_open_file_limit()
    sockets = bind_all(settings, shared=True)
    doorbell = Doorbell() if settings.delivery_workers else None
    try:
        asyncio.run(prepare_node(settings))

        def run_worker(index: int) -> int:
            _configure_logging(settings, label=worker_label(index))
            own = worker_settings(settings, index)
            listening = sockets
            if own.roles == ("delivery",):  # a delivery worker accepts nothing: not even a copy
                _close_all(sockets)
                listening = {}
            try:
                asyncio.run(run_node(own, sockets=listening, doorbell=doorbell))
            except ONE_LINE_ERRORS as exc:
                print(f"poweremail: {worker_label(index)}: {exc}", file=sys.stderr)
                return EXIT_FAILURE
            return 0

        ports = ", ".join(describe(sock) for sock in sockets.values()) or "no port"
        delivering = settings.delivery_workers
        logging.getLogger("poweremail").info(
            "starting %d worker processes on %s%s",
            settings.workers,
            ports,
            f" and {delivering} delivery worker process(es)" if delivering else "",
        )
        return supervise(
            workers=settings.workers + settings.delivery_workers,
            run_worker=run_worker,
            on_stop=lambda: _close_all(sockets),
            shutdown_grace=settings.shutdown_grace,
        )
    finally:
        _close_all(sockets)
        if doorbell is not None:
            doorbell.close()


def _close_all(sockets: dict[str, socket.socket]) -> None:
    for sock in sockets.values():
        sock.close()


async def _with_services(settings: Settings, work: Callable[[Services], Awaitable[int]]) -> int:
    services = await open_services(settings)
    try:
        return await work(services)
    finally:
        await services.close()


async def _owner_create(settings: Settings, args: argparse.Namespace) -> int:
    async def work(services: Services) -> int:
        owner = await services.database.write(lambda conn: owners.create_owner(conn, name=args.name))
        print(json.dumps({"owner_id": owner.owner_id, "token": owner.token}))
        return 0

    return await _with_services(settings, work)


async def _owner_rotate_token(settings: Settings, args: argparse.Namespace) -> int:
    owner_id: str = args.owner_id

    async def work(services: Services) -> int:
        token = await services.database.write(lambda conn: owners.rotate_owner_token(conn, owner_id=owner_id))
        if token is None:
            raise CommandError(f"no owner with owner_id {owner_id!r}")
        print(json.dumps({"owner_id": owner_id, "token": token}))
        return 0

    return await _with_services(settings, work)


async def _owner_list(settings: Settings, _args: argparse.Namespace) -> int:
    async def work(services: Services) -> int:
        listing = await services.database.read(owners.list_owners)
        for owner in listing:
            print(
                json.dumps(
                    {
                        "owner_id": owner.owner_id,
                        "name": owner.name,
                        "active": owner.is_active,
                        "created_at": owner.created_at.isoformat(),
                        "smtp_users": owner.smtp_user_count,
                    }
                )
            )
        return 0

    return await _with_services(settings, work)


async def _keys_rotate(settings: Settings, _args: argparse.Namespace) -> int:
    """Add a new primary key, move every password onto it, retire the old keys, sweep once more.

    Each step is safe to interrupt: until the file drops the old keys, every row names a key the
    file holds, and running the command again finishes the job. Running servers re-read the file
    before each encryption; the last sweep, with the old keys kept in memory only, moves anything a
    server wrote under an old key just before it saw the new file.
    """

    async def move_all(keyring: Keyring, database: Database) -> int:
        moved = 0
        while True:
            batch = await database.write(lambda conn: smtp_users.reencrypt_passwords(conn, keyring=keyring))
            if batch == 0:
                return moved
            moved += batch

    async def work(services: Services) -> int:
        old_ids = sorted(services.keyring.keys)
        new_id = services.keyring.add_primary_key()
        moved = await move_all(services.keyring, services.database)
        every_key = services.keyring.retire_all_but_primary()
        await asyncio.sleep(ROTATION_SETTLE_SECONDS)
        moved += await move_all(every_key, services.database)
        print(
            json.dumps({"primary_key_id": new_id, "passwords_reencrypted": moved, "retired_key_ids": old_ids})
        )
        return 0

    return await _with_services(settings, work)


# --- entry point ------------------------------------------------------------------------------


# What ends a command with one line on stderr (SPEC §6).
ONE_LINE_ERRORS = (
    CommandError,
    DataDirError,
    DatabaseUnavailableError,
    DatabaseUrlError,
    DecryptionError,
    KeyringError,
    ListenError,
    SupervisorError,
    TlsConfigError,
)


def _configure_logging(settings: Settings, *, label: str | None = None) -> None:
    """Log lines to stderr; a worker process of ``serve --workers`` says which one it is."""
    log_format = LOG_FORMAT if label is None else LOG_FORMAT.replace("%(name)s", f"%(name)s [{label}]")
    # force: a worker replaces the handler it inherited; otherwise leave any (pytest's) in place.
    logging.basicConfig(
        level=settings.log_level, format=log_format, stream=sys.stderr, force=label is not None
    )
    if settings.log_level != "DEBUG":
        # One line per migration step, and aiosmtpd's one line per SMTP command, are noise.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mail.log").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_from(args)
        _configure_logging(settings)
        if args.run is _serve and (settings.workers > 1 or settings.delivery_workers):
            return _serve_workers(settings)  # forks: no event loop may be running here
        command: Command = args.run
        return asyncio.run(command(settings, args))
    except ONE_LINE_ERRORS as exc:
        print(f"poweremail: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
