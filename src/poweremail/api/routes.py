"""The ``/settings/*`` calls: the five of SPEC §2 and listMessages of SPEC §5.

Each call is a small function from validated parameters to the success fields. ``settings_call``
supplies what they all share, in the order SPEC §2 fixes: the body parses, the parameters are present
and well typed, the owner authenticates, then the call does its work, in one transaction.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from enum import Enum
from json.encoder import encode_basestring
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy import Connection

from poweremail.api.body import FORM_CONTENT_TYPE, parse_body
from poweremail.api.models import (
    AddSmtpRequest,
    CredentialsResponse,
    DeleteSmtpRequest,
    EditSmtpRequest,
    ErrorResponse,
    ListMessagesRequest,
    ListMessagesResponse,
    ListSmtpRequest,
    ListSmtpResponse,
    MessageOnlyResponse,
    ResetSmtpPasswordRequest,
    validate_params,
)
from poweremail.api.responses import NO_STORE, error_response, json_response
from poweremail.errors import ApiError, AuthenticationError, GeneralError, ValidationError
from poweremail.services import Services
from poweremail.store import message_listing, owners, smtp_users

logger = logging.getLogger("poweremail.api")
_PREFIX = "/settings"
_TAGS: list[str | Enum] = ["SMTP users"]
# The calls, as keyword arguments of ``FastAPI.add_api_route``: ``add_routes`` puts them on the app
# itself. Measured: through ``include_router`` (FastAPI 0.165) every request walked the included
# router to check it had not changed, ~10% of listSmtp's CPU (~70 µs a request).
_ROUTES: list[dict[str, Any]] = []


# Starlette tries an app's routes in order; listSmtp, the call dashboards poll, goes first of ours
# (behind only FastAPI's own /docs routes). Measured: ~3 µs of its ~80 µs in the app.
_FIRST = f"{_PREFIX}/listSmtp"


def add_routes(app: FastAPI) -> None:
    for route in sorted(_ROUTES, key=lambda route: route["path"] != _FIRST):
        app.add_api_route(**route)


P = TypeVar("P", bound=BaseModel)
# A call answers its success fields, or (listSmtp) the whole success answer already as JSON bytes.
CallBody = Callable[[P, Services], Awaitable[dict[str, Any] | bytes]]

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "ValidationError: a parameter is missing, wrong or unknown"},
    401: {"model": ErrorResponse, "description": "AuthenticationError: owner_id and token do not match"},
    500: {"model": ErrorResponse, "description": "GeneralError: something unexpected; details are logged"},
}


def settings_call(
    name: str,
    request_model: type[P],
    response_model: type[BaseModel],
    *,
    summary: str,
    example: dict[str, Any],
) -> Callable[[CallBody[P]], CallBody[P]]:
    schema = request_model.model_json_schema()
    openapi_extra = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema, "example": example},
                FORM_CONTENT_TYPE: {"schema": schema},
            },
        }
    }

    def register(body: CallBody[P]) -> CallBody[P]:
        async def endpoint(request: Request) -> Response:
            try:
                raw_params = parse_body(await request.body(), request.headers.get("content-type"))
                params = validate_params(request_model, raw_params)
                fields = await body(params, request.app.state.services)
            except ApiError as exc:
                logger.info("%s refused: %s %s", name, exc.type_name, exc.message)
                return error_response(exc)
            except Exception:
                logger.exception("%s failed unexpectedly", name)
                return error_response(GeneralError())
            if isinstance(fields, bytes):
                return Response(fields, media_type="application/json", headers=NO_STORE)
            return json_response({"status": "success", **fields})

        endpoint.__name__ = name
        _ROUTES.append(
            {
                "path": f"{_PREFIX}/{name}",
                "endpoint": endpoint,
                "methods": ["POST"],
                "tags": _TAGS,
                "summary": summary,
                "description": body.__doc__,
                "operation_id": name,
                "openapi_extra": openapi_extra,
                "responses": {200: {"model": response_model, "description": "success"}, **_ERROR_RESPONSES},
            }
        )
        return body

    return register


def _owner_pk(conn: Connection, params: Any) -> int:
    owner_pk = owners.authenticate_owner(conn, owner_id=params.owner_id, token=params.token)
    if owner_pk is None:
        raise AuthenticationError()
    return owner_pk


def _smtp_user_id(conn: Connection, owner_pk: int, name: str) -> int:
    smtp_user_id = smtp_users.find_smtp_user_id(conn, owner_pk=owner_pk, name=name)
    if smtp_user_id is None:
        # The same answer for another owner's user and for none at all (SPEC §2).
        raise ValidationError(f"smtp_user_name {name!r} names no SMTP user of this owner")
    return smtp_user_id


_CREDENTIALS = {"owner_id": "example id", "token": "example token"}
# listSmtp reads an owner's users on the event loop itself (Database.read_now) up to this many, at
# ~3 µs each (measured: 10,000 users in 31 ms); an owner with more is read in a thread instead.
LIST_AT_ONCE = 100
# Owners (authenticated) found to have more: read in a thread straight away from then on. Measured:
# trying at once first made listSmtp of 1,000 users 30% slower under load (282 -> 193 requests/s).
_LONG_LISTINGS: set[str] = set()
_LONG_LISTINGS_SIZE = 10_000


@settings_call(
    "addSmtp",
    AddSmtpRequest,
    CredentialsResponse,
    summary="Add a new SMTP User",
    example={**_CREDENTIALS, "total_limit": 100, "hourly_limit": 10},
)
async def add_smtp(params: AddSmtpRequest, services: Services) -> dict[str, Any]:
    """Creates an enabled SMTP user with a generated name and password, both returned."""

    def work(conn: Connection) -> tuple[str, str]:
        return smtp_users.create_smtp_user(
            conn,
            owner_pk=_owner_pk(conn, params),
            keyring=services.keyring,
            total_limit=params.total_limit,
            hourly_limit=params.hourly_limit,
        )

    name, password = await services.database.write(work)
    return {"message": "SMTP User Created", "smtp_user_name": name, "smtp_password": password}


@settings_call(
    "editSmtp",
    EditSmtpRequest,
    MessageOnlyResponse,
    summary="Edit SMTP User",
    example={
        **_CREDENTIALS,
        "smtp_user_name": "smtp12345",
        "total_limit": 80,
        "hourly_limit": 15,
        "status": "Disable",
    },
)
async def edit_smtp(params: EditSmtpRequest, services: Services) -> dict[str, Any]:
    """Sets the total limit, and the hourly limit and status when given. Lowering a limit below what
    was already sent is allowed: the user simply cannot send more."""

    def work(conn: Connection) -> None:
        smtp_users.update_smtp_user(
            conn,
            smtp_user_id=_smtp_user_id(conn, _owner_pk(conn, params), params.smtp_user_name),
            total_limit=params.total_limit,
            hourly_limit=params.hourly_limit,
            status=params.status,
        )

    await services.database.write(work)
    services.senders.forget_all()  # the next MAIL of its sessions sees the new status and limits
    return {"message": "SMTP User Updated"}


@settings_call(
    "resetSmtpPassword",
    ResetSmtpPasswordRequest,
    CredentialsResponse,
    summary="Password Reset for SMTP user",
    example={**_CREDENTIALS, "smtp_user_name": "smtp12345"},
)
async def reset_smtp_password(params: ResetSmtpPasswordRequest, services: Services) -> dict[str, Any]:
    """Issues a new password; the old one stops logging in at once."""

    def work(conn: Connection) -> str:
        return smtp_users.reset_smtp_password(
            conn,
            smtp_user_id=_smtp_user_id(conn, _owner_pk(conn, params), params.smtp_user_name),
            name=params.smtp_user_name,
            keyring=services.keyring,
        )

    password = await services.database.write(work)
    services.senders.forget_all()  # its sessions start no new transaction
    # "reseted" is the document's word; clients may match on it.
    return {"message": "password reseted", "smtp_user_name": params.smtp_user_name, "smtp_password": password}


@settings_call("listSmtp", ListSmtpRequest, ListSmtpResponse, summary="List SMTP users", example=_CREDENTIALS)
async def list_smtp(params: ListSmtpRequest, services: Services) -> dict[str, Any] | bytes:
    """This owner's SMTP users, oldest first, with passwords, limits and usage."""

    def work(conn: Connection, at_most: int | None = None) -> list[smtp_users.SmtpUserListing] | None:
        return smtp_users.list_owner_smtp_users(
            conn, owner_id=params.owner_id, token=params.token, keyring=services.keyring, at_most=at_most
        )

    if params.owner_id in _LONG_LISTINGS:
        listing = await services.database.read(work)
    else:
        try:
            listing = await services.database.read_now(functools.partial(work, at_most=LIST_AT_ONCE))
        except smtp_users.ListingTooLongError:  # read it all in a thread, not on the event loop
            if len(_LONG_LISTINGS) >= _LONG_LISTINGS_SIZE:
                _LONG_LISTINGS.clear()
            _LONG_LISTINGS.add(params.owner_id)
            listing = await services.database.read(work)
    if listing is None:
        raise AuthenticationError()
    return _list_smtp_answer(listing)


# The bytes json_response would make of the same answer (compact, UTF-8 unescaped), written out
# directly. Measured: json.dumps of the dicts was ~7% of listSmtp's CPU for 10 users.
_SMTP_ENTRY = (
    '{"smtp_user_name":%s,"smtp_password":%s,"status":%s,"total_limit":%d,"hourly_limit":%d,'
    '"sent_total":%d,"sent_last_hour":%d}'
)


# Each user's entry, by the listing it was written from (which the store keeps while nothing in it
# changes). Measured: writing the entries anew was ~5 µs of listSmtp for 10 users. Bounded.
_ENTRIES: dict[smtp_users.SmtpUserListing, str] = {}
_ENTRIES_SIZE = 20_000


def _entry(user: smtp_users.SmtpUserListing) -> str:
    name, password, status, total, hourly, sent, last_hour = user
    quote = encode_basestring
    entry = _SMTP_ENTRY % (quote(name), quote(password), quote(status), total, hourly, sent, last_hour)
    if len(_ENTRIES) >= _ENTRIES_SIZE:
        _ENTRIES.clear()
    _ENTRIES[user] = entry
    return entry


def _list_smtp_answer(listing: list[smtp_users.SmtpUserListing]) -> bytes:
    count = len(listing)
    message = f"{count} SMTP user{'' if count == 1 else 's'}"
    entries = ",".join([_ENTRIES.get(user) or _entry(user) for user in listing])
    return f'{{"status":"success","message":{encode_basestring(message)},"smtp_list":[{entries}]}}'.encode()


@settings_call(
    "deleteSmtp",
    DeleteSmtpRequest,
    MessageOnlyResponse,
    summary="Delete SMTP User (not in the document)",
    example={**_CREDENTIALS, "smtp_user_name": "smtp12345"},
)
async def delete_smtp(params: DeleteSmtpRequest, services: Services) -> dict[str, Any]:
    """Stops the user's logins at once; mail it already queued is still delivered. Its name is never
    issued again."""

    def work(conn: Connection) -> None:
        smtp_users.delete_smtp_user(
            conn, smtp_user_id=_smtp_user_id(conn, _owner_pk(conn, params), params.smtp_user_name)
        )

    await services.database.write(work)
    services.senders.forget_all()  # its sessions start no new transaction
    return {"message": "SMTP User Deleted"}


def _utc_iso(moment: datetime | None) -> str | None:
    """``2026-11-23T23:04:55Z``: as the SMTP replies write times."""
    if moment is None:
        return None
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@settings_call(
    "listMessages",
    ListMessagesRequest,
    ListMessagesResponse,
    summary="List an SMTP user's messages and their delivery (not in the document)",
    example={**_CREDENTIALS, "smtp_user_name": "smtp12345", "limit": 20, "offset": 0},
)
async def list_messages(params: ListMessagesRequest, services: Services) -> dict[str, Any]:
    """The SMTP user's messages, newest first, `limit` at a time (1 to 100, default 20) after skipping
    `offset`; `has_more` says whether older ones follow. For each recipient: its state (`queued`,
    `deferred`, `delivered` or `bounced`), the delivery attempts so far, the last one's outcome
    (`last_reply`: the remote server's reply, or what went wrong before one) and when the next is due.
    Times are UTC, ISO 8601."""

    def work(conn: Connection) -> message_listing.MessagePage:
        return message_listing.list_messages(
            conn,
            smtp_user_id=_smtp_user_id(conn, _owner_pk(conn, params), params.smtp_user_name),
            limit=params.limit,
            offset=params.offset,
        )

    page = await services.database.read(work)
    count = len(page.messages)
    return {
        "message": f"{count} message{'' if count == 1 else 's'}",
        "messages": [
            {
                "queue_id": message.queue_id,
                "accepted_at": _utc_iso(message.accepted_at),
                "mail_from": message.mail_from,
                "size_bytes": message.size_bytes,
                "recipients": [
                    {
                        "address": rcpt.address,
                        "state": rcpt.state,
                        "attempts": rcpt.attempts,
                        "last_reply": rcpt.last_reply,
                        "last_attempt_at": _utc_iso(rcpt.last_attempt_at),
                        "next_attempt_at": _utc_iso(rcpt.next_attempt_at),
                    }
                    for rcpt in message.recipients
                ],
            }
            for message in page.messages
        ],
        "limit": params.limit,
        "offset": params.offset,
        "has_more": page.has_more,
    }
