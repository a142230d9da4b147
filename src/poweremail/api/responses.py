"""Every answer of the API is JSON and carries ``Cache-Control: no-store`` (SPEC §2): answers hold
passwords, and no proxy or browser may keep them."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import Response

from poweremail.errors import ApiError

NO_STORE = {"Cache-Control": "no-store"}


def json_response(content: dict[str, Any], status_code: int = 200) -> Response:
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status_code, media_type="application/json", headers=NO_STORE)


def error_response(error: ApiError, status_code: int | None = None) -> Response:
    return json_response(error.body(), status_code or error.http_status)
