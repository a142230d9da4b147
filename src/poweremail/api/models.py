"""The parameters each call takes (SPEC §2 "Parameter types"), and the shapes of its answers.

The request models validate; the response models only document (they feed ``/openapi.json``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

from poweremail.domain.limits import LIMIT_RULE, MAX_LIMIT, parse_limit, parse_whole_number
from poweremail.errors import ValidationError

NonEmptyString = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=256)]


def _parse_status(value: object) -> object:
    """``Enable`` or ``Disable`` in any letter case, stored and returned as written here."""
    if isinstance(value, str):
        for status in ("Enable", "Disable"):
            if value.lower() == status.lower():
                return status
    raise ValueError("must be 'Enable' or 'Disable'")


Limit = Annotated[
    int,
    BeforeValidator(parse_limit),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                {"type": "string", "pattern": "^[0-9]+$"},
            ],
            "description": f"A positive whole number, as a JSON integer or a string of digits; {LIMIT_RULE}.",
        }
    ),
]
Status = Annotated[
    Literal["Enable", "Disable"],
    BeforeValidator(_parse_status),
    WithJsonSchema({"type": "string", "enum": ["Enable", "Disable"], "description": "Any letter case."}),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    owner_id: NonEmptyString = Field(description="a valid PowerEmailUser Id")
    token: NonEmptyString = Field(description="a valid token")


class AddSmtpRequest(_Request):
    total_limit: Limit = Field(description="recipients this SMTP user may send to over its whole life")
    hourly_limit: Limit = Field(description="recipients this SMTP user may send to in any rolling 60 minutes")


class _OneSmtpUserRequest(_Request):
    smtp_user_name: NonEmptyString = Field(description="a valid smtp user name")


class EditSmtpRequest(_OneSmtpUserRequest):
    total_limit: Limit
    hourly_limit: Limit | None = None
    status: Status | None = None

    @pydantic.field_validator("hourly_limit", "status", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # Leaving a parameter out keeps the stored value; an explicit null is a mistake.
        if value is None:
            raise ValueError("must not be null (leave it out to keep the current value)")
        return value


class ResetSmtpPasswordRequest(_OneSmtpUserRequest):
    pass


class DeleteSmtpRequest(_OneSmtpUserRequest):
    pass


class ListSmtpRequest(_Request):
    pass


# listMessages paging: the same whole-number rules as the limits, over other ranges.
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 20


def _whole_number(minimum: int, maximum: int) -> Callable[[object], int]:
    return lambda value: parse_whole_number(value, minimum=minimum, maximum=maximum)


def _whole_number_schema(minimum: int, maximum: int, description: str) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": minimum, "maximum": maximum},
                {"type": "string", "pattern": "^[0-9]+$"},
            ],
            "description": f"{description}: a JSON integer or a string of digits, {minimum} to {maximum}.",
        }
    )


PageSize = Annotated[
    int,
    BeforeValidator(_whole_number(1, MAX_PAGE_SIZE)),
    _whole_number_schema(1, MAX_PAGE_SIZE, f"Messages per page, default {DEFAULT_PAGE_SIZE}"),
]
# Bounded so that no number reaches the database that it cannot hold.
PageOffset = Annotated[
    int,
    BeforeValidator(_whole_number(0, MAX_LIMIT)),
    _whole_number_schema(0, MAX_LIMIT, "Newest messages to skip, default 0"),
]


class ListMessagesRequest(_OneSmtpUserRequest):
    limit: PageSize = DEFAULT_PAGE_SIZE
    offset: PageOffset = 0


_ERROR_TEXT = {
    "missing": "is required",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "string_too_long": "is too long",
}


M = TypeVar("M", bound=BaseModel)


def validate_params(model: type[M], params: dict[str, Any]) -> M:
    """Validate ``params`` against ``model``; a ValidationError names every parameter at fault."""
    try:
        return model.model_validate(params)
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            name = ".".join(str(part) for part in error["loc"]) or "body"
            if error["type"] == "extra_forbidden":
                problems.append(f"unknown parameter {name}")
            elif error["type"] == "value_error":
                problems.append(f"{name} {error['ctx']['error']}")
            else:
                problems.append(f"{name} {_ERROR_TEXT.get(error['type'], 'is invalid')}")
        raise ValidationError("; ".join(problems)) from None


# --- answers (documentation only) -------------------------------------------------------------


class ErrorResponse(BaseModel):
    status: Literal["error"]
    code: Literal["-1"]
    name: Literal["ValidationError", "AuthenticationError", "GeneralError"]
    type: Literal["ValidationError", "AuthenticationError", "GeneralError"]
    message: str


class _Success(BaseModel):
    status: Literal["success"]
    message: str


class CredentialsResponse(_Success):
    smtp_user_name: str
    smtp_password: str


class SmtpUserEntry(BaseModel):
    smtp_user_name: str
    smtp_password: str
    status: Literal["Enable", "Disable"]
    total_limit: int
    hourly_limit: int
    sent_total: int = Field(description="recipients sent to over the user's life")
    sent_last_hour: int = Field(description="recipients sent to in the last 60 minutes")


class ListSmtpResponse(_Success):
    smtp_list: list[SmtpUserEntry]


class MessageOnlyResponse(_Success):
    pass


class RecipientEntry(BaseModel):
    address: str
    state: Literal["queued", "deferred", "delivered", "bounced"] = Field(
        description="queued (not tried yet), deferred (failed for now, will be retried), delivered, bounced"
    )
    attempts: int = Field(description="delivery attempts so far")
    last_reply: str | None = Field(
        description="the last attempt's outcome: the remote server's reply, or what went wrong before one; "
        "null before the first attempt"
    )
    last_attempt_at: datetime | None = Field(
        description="UTC, ISO 8601 (2026-11-23T23:04:55Z); null before the first"
    )
    next_attempt_at: datetime | None = Field(
        description="when it is next due, UTC; null once delivered or bounced"
    )


class MessageEntry(BaseModel):
    queue_id: str = Field(description="the id of the SMTP 250 reply and the Received header")
    accepted_at: datetime = Field(
        description="when the SMTP server accepted it, UTC, ISO 8601 (2026-11-23T23:04:55Z)"
    )
    mail_from: str = Field(description="the envelope sender; empty for the null sender <>")
    size_bytes: int = Field(description="the message as stored, with PowerEmail's headers")
    recipients: list[RecipientEntry] = Field(description="in the order they were given")


class ListMessagesResponse(_Success):
    messages: list[MessageEntry] = Field(description="newest first")
    limit: int
    offset: int
    has_more: bool = Field(description="older messages follow: ask again with offset + limit")
