"""Every error the console answers is problem details JSON (RFC 9457,
`application/problem+json`): a `title` for the kind, a `detail` in words an operator can act on,
the `status`, and a stable `code` to branch on. Never a stack trace: an unexpected error is
logged with an id, and only the id is answered.

    code                  status  raised as
    not_authenticated     401     NotAuthenticated (with `WWW-Authenticate: Bearer ...`)
    not_allowed           403     NotAllowed
    not_found             404     NotFound, or an unknown path
    conflict              409     Conflict: what a saga's or dead letter's state does not allow
    invalid_parameters    422     a parameter or body that does not validate (`errors` lists them)
    issuer_unreachable    503     IssuerUnreachable
    internal_error        500     anything else (logged with `error_id`)
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.console.security import SESSION_COOKIE
from orchestrator.errors import (
    Conflict,
    IssuerUnreachable,
    NotAllowed,
    NotAuthenticated,
    NotFound,
)

PROBLEM_JSON: Final = "application/problem+json"
REALM: Final = "saga-console"
log = logging.getLogger(__name__)


class ParameterError(BaseModel):
    where: str = Field(description="e.g. `query.limit` or `body.ids`")
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    errors: list[ParameterError] | None = None
    error_id: str | None = None


def problem(status: int, code: str, title: str, detail: str, request: Request | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> Response:
    body = Problem(title=title, status=status, detail=detail, code=code,
                   instance=request.url.path if request is not None else None, **extra)
    # A browser asking for a page gets the error as a page (orchestrator.console.pages).
    page = getattr(request.app.state, "error_page", None) if request is not None else None
    if page is not None:
        shown = page(request, status, title, detail, headers)
        if isinstance(shown, Response):
            return shown
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status,
                        media_type=PROBLEM_JSON, headers=headers)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem details."""

    async def not_authenticated(request: Request, error: Exception) -> Response:
        # RFC 6750: say which scheme to use, and why a token that was sent is refused.
        challenge = f'Bearer realm="{REALM}"'
        if request.headers.get("authorization") or request.cookies.get(SESSION_COOKIE):
            challenge += f', error="invalid_token", error_description="{_quoted(str(error))}"'
        return problem(401, "not_authenticated", "Not authenticated", str(error), request,
                       headers={"WWW-Authenticate": challenge})

    async def not_allowed(request: Request, error: Exception) -> Response:
        return problem(403, "not_allowed", "Not allowed", str(error), request)

    async def not_found(request: Request, error: Exception) -> Response:
        return problem(404, "not_found", "Not found", str(error), request)

    async def conflict(request: Request, error: Exception) -> Response:
        return problem(409, "conflict", "Conflict", str(error), request)

    async def unreachable(request: Request, error: Exception) -> Response:
        return problem(503, "issuer_unreachable", "Identity provider unreachable", str(error),
                       request, headers={"Retry-After": "5"})

    async def invalid(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        errors = [ParameterError(where=".".join(str(part) for part in e.get("loc", ())),
                                 message=str(e.get("msg", "invalid")))
                  for e in error.errors()]
        detail = "; ".join(f"{e.where}: {e.message}" for e in errors) or "invalid request"
        return problem(422, "invalid_parameters", "Invalid parameters", detail, request,
                       errors=errors)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        if error.status_code == 404:
            return problem(404, "not_found", "Not found", f"no such path: {request.url.path}",
                           request)
        return problem(error.status_code, f"http_{error.status_code}", str(error.detail),
                       str(error.detail), request, headers=dict(error.headers or {}))

    async def unexpected(request: Request, error: Exception) -> Response:
        error_id = uuid.uuid4().hex[:12]
        log.exception("console request %s %s failed (error id %s)", request.method,
                      request.url.path, error_id, exc_info=error)
        return problem(500, "internal_error", "Internal error",
                       f"the request failed; the console's log has the details under error id"
                       f" {error_id}", request, error_id=error_id)

    app.add_exception_handler(NotAuthenticated, not_authenticated)
    app.add_exception_handler(NotAllowed, not_allowed)
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(Conflict, conflict)
    app.add_exception_handler(IssuerUnreachable, unreachable)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
