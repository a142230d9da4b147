"""Turning a request body into a dict of parameters (SPEC §2: JSON or form, tolerant of the
document's trailing commas), or a ValidationError that says where it broke."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from poweremail.errors import ValidationError

MAX_BODY_BYTES = 64 * 1024  # the largest legitimate body is a few hundred bytes
_MAX_FORM_FIELDS = 64
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

# A JSON string (skipped over whole, so commas inside strings are never touched) or a comma that
# only white space separates from a closing bracket. The document prints every example with such a
# trailing comma, and SPEC §2 says those bodies are accepted verbatim. Our own ten-line rule rather
# than a JSON5 parser: json5 is pure Python and ~30x slower, and JSON5 would also admit comments,
# single quotes and hex numbers, which nobody asked for.
_STRING_OR_TRAILING_COMMA = re.compile(r'"(?:[^"\\]|\\.)*"|,(\s*[}\]])', re.DOTALL)


def _drop_trailing_commas(text: str) -> str:
    return _STRING_OR_TRAILING_COMMA.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(0), text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValidationError(f"parameter {key} is given more than once")
        result[key] = value
    return result


# Built once: json.loads with these options builds a new decoder (and scanner) on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant)


def _load_json(text: str) -> Any:
    if text.startswith("\ufeff"):  # as json.loads answers it
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


def parse_json_body(text: str) -> dict[str, Any]:
    try:
        document = _load_json(text)
    except json.JSONDecodeError as first_error:
        try:
            document = _load_json(_drop_trailing_commas(text))
        except (json.JSONDecodeError, ValueError, RecursionError):
            raise ValidationError(
                f"request body is not valid JSON: {first_error.msg} at line {first_error.lineno} "
                f"column {first_error.colno}"
            ) from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, or nesting deeper than the stack
        raise ValidationError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValidationError("request body must be a JSON object of parameters, not " + _json_kind(document))
    return document


def parse_form_body(text: str) -> dict[str, Any]:
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True, max_num_fields=_MAX_FORM_FIELDS)
    except ValueError as exc:
        raise ValidationError(f"request body is not a valid form: {exc}") from None
    return _object_without_duplicates(pairs)


def parse_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """The parameters of a request, from JSON or a urlencoded form.

    A body that starts with ``{`` or ``[`` is read as JSON whatever its Content-Type says: ``curl -d``
    labels everything as a form, and a form field name never starts with a brace.
    """
    if len(raw) > MAX_BODY_BYTES:
        raise ValidationError(f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"request body is not valid UTF-8 (byte {exc.start})") from None
    stripped = text.strip()
    if not stripped:
        raise ValidationError("request body is empty: send the parameters as a JSON object or a form")
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if stripped[0] in "{[" or media_type != FORM_CONTENT_TYPE:
        if media_type.startswith("multipart/"):
            raise ValidationError(f"send the parameters as application/json or {FORM_CONTENT_TYPE}")
        return parse_json_body(text)
    return parse_form_body(stripped)


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"
