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

# No NUL character: no owner or SMTP user has one, and PostgreSQL cannot even hold one to compare.
NonEmptyString = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=256, pattern=r"^[^\x00]*$")
]


def _parse_status(value: object) -> object:
    """``Enable`` or ``Disable`` in any letter case, stored and returned as written here."""
    if isinstance(value, str):
        for status in ("Enable", "Disable"):
            if value.lower() == status.lower():
                return status
    raise ValueError("must be 'Enable' or 'Disable'")


def _digits(first: int, last: int, then: int = 0) -> str:
    """A regular expression for one digit from ``first`` to ``last``, then ``then`` digits of any value."""
    head = str(first) if first == last else f"[{first}-{last}]"
    return head + ("" if then == 0 else "[0-9]" if then == 1 else f"[0-9]{{{then}}}")


def _digit_runs(low: str, high: str) -> list[str]:
    """Regular expressions that together match exactly the digit strings from ``low`` to ``high``,
    two strings of the same length."""
    if low == high:
        return [low]
    rest = len(low) - 1
    if low[0] == high[0]:
        return [low[0] + run for run in _digit_runs(low[1:], high[1:])]
    runs = []
    first, last = int(low[0]), int(high[0])
    if low[1:] != "0" * rest:  # low's leading digit only with what follows from low on
        runs += [low[0] + run for run in _digit_runs(low[1:], "9" * rest)]
        first += 1
    if high[1:] != "9" * rest:
        last -= 1
    if first <= last:
        runs.append(_digits(first, last, rest))
    if high[1:] != "9" * rest:  # high's leading digit only with what follows up to high
        runs += [high[0] + run for run in _digit_runs("0" * rest, high[1:])]
    return runs


def digits_pattern(minimum: int, maximum: int) -> str:
    """The JSON Schema ``pattern`` of the strings of ASCII digits whose value is from ``minimum`` to
    ``maximum`` (leading zeros allowed): exactly the strings ``parse_whole_number`` accepts."""
    runs: list[str] = []
    whole: list[int] = []  # lengths (after the first digit) whose every number is in range: one run
    for length in range(len(str(minimum)), len(str(maximum)) + 1):
        low = max(minimum, 10 ** (length - 1) if length > 1 else 0)
        high = min(maximum, 10**length - 1)
        if length > 1 and (low, high) == (10 ** (length - 1), 10**length - 1):
            if not whole:
                runs.append("")  # its place, filled in below
            whole.append(length - 1)
        else:
            runs += _digit_runs(str(low), str(high))
    if whole:
        runs[runs.index("")] = (
            _digits(1, 9, whole[0]) if len(whole) == 1 else f"[1-9][0-9]{{{whole[0]},{whole[-1]}}}"
        )
    return "^0*(?:" + "|".join(runs) + ")$"


# JSON Schema counts 5.0 as an integer too and has no way to say otherwise: the description says it.
_WRITTEN_AS_INTEGER = "written as an integer: 5, not 5.0 or 5e0"

Limit = Annotated[
    int,
    BeforeValidator(parse_limit),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "description": _WRITTEN_AS_INTEGER},
                {"type": "string", "pattern": digits_pattern(1, MAX_LIMIT)},
            ],
            "description": f"A positive whole number, as a JSON integer or a string of digits; {LIMIT_RULE}.",
        }
    ),
]
Status = Annotated[
    Literal["Enable", "Disable"],
    BeforeValidator(_parse_status),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": "^(?:[Ee][Nn][Aa][Bb][Ll][Ee]|[Dd][Ii][Ss][Aa][Bb][Ll][Ee])$",
            "examples": ["Enable", "Disable"],
            "description": "Enable or Disable, in any letter case.",
        }
    ),
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


def _never_null(schema: dict[str, Any]) -> None:
    """The document of an optional parameter that may be left out but is never null (null is refused)."""
    schema.pop("default", None)
    [branch] = [branch for branch in schema.pop("anyOf") if branch != {"type": "null"}]
    schema.update({**branch, **schema})


class EditSmtpRequest(_OneSmtpUserRequest):
    total_limit: Limit
    hourly_limit: Limit | None = Field(None, json_schema_extra=_never_null)
    status: Status | None = Field(None, json_schema_extra=_never_null)

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
                {
                    "type": "integer",
                    "minimum": minimum,
                    "maximum": maximum,
                    "description": _WRITTEN_AS_INTEGER,
                },
                {"type": "string", "pattern": digits_pattern(minimum, maximum)},
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
    "string_pattern_mismatch": "must not contain a NUL character",
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
