"""The ASGI application: the ``/settings/*`` calls, ``/docs`` and ``/openapi.json``."""

from __future__ import annotations

import gc

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from poweremail import __version__
from poweremail.api.responses import error_response
from poweremail.api.routes import add_routes
from poweremail.errors import ValidationError
from poweremail.services import Services

DESCRIPTION = """\
The SMTP-user calls of the PowerEmail Email API. Every call is `POST /settings/<call>` with a JSON
(`application/json`, trailing commas tolerated) or form (`application/x-www-form-urlencoded`) body.
Errors answer `{"status": "error", "code": "-1", "name": T, "type": T, "message": "..."}` with T one
of `ValidationError` (400), `AuthenticationError` (401), `GeneralError` (500).
"""


def create_app(services: Services) -> FastAPI:
    app = FastAPI(title="PowerEmail Email API", version=__version__, description=DESCRIPTION)
    app.state.services = services
    add_routes(app)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        # Unknown paths and wrong methods still answer in the documented error shape.
        if exc.status_code == 405:
            message = f"{request.method} is not allowed here: every call is POST /settings/<call>"
        elif exc.status_code == 404:
            message = f"there is no call {request.url.path}"
        else:
            message = str(exc.detail)
        response = error_response(ValidationError(message), exc.status_code)
        # A 405 must say what is allowed (RFC 9110 §15.5.6): Starlette puts it in the headers.
        response.headers.update(exc.headers or {})
        return response

    # Measured: the process's startup heap (FastAPI, pydantic, SQLAlchemy; ~85 ms to traverse) was
    # walked by a full collection every ~0.7 s under load, ~12% of listSmtp's CPU and its p99 (90 ms).
    # Freezing it leaves full collections only the objects made since (1 ms). The node builds the
    # API last, after the store and the SMTP servers, so their long-lived objects are frozen too.
    gc.collect()
    gc.freeze()
    return app
