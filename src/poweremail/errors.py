"""The three error types of the document's "Error types" table, and the HTTP status each maps to.

SPEC §2: the error body carries the type twice, as ``name`` (the document's example) and as ``type``
(the document's table).
"""

from __future__ import annotations

from typing import ClassVar


class ApiError(Exception):
    """An error that the management API answers with the documented error body."""

    type_name: ClassVar[str] = "GeneralError"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        return {
            "status": "error",
            "code": "-1",
            "name": self.type_name,
            "type": self.type_name,
            "message": self.message,
        }


class ValidationError(ApiError):
    """A parameter is missing, of the wrong type, out of range, or names no SMTP user of this owner."""

    type_name = "ValidationError"
    http_status = 400


class AuthenticationError(ApiError):
    """``owner_id`` and ``token`` do not match an active owner."""

    type_name = "AuthenticationError"
    http_status = 401

    def __init__(self, message: str = "Token MissMatch") -> None:  # the document's wording
        super().__init__(message)


class GeneralError(ApiError):
    """Anything unexpected. The details go to the server log, never to the client."""

    type_name = "GeneralError"
    http_status = 500

    def __init__(self, message: str = "An unexpected error occurred; it has been logged.") -> None:
        super().__init__(message)
