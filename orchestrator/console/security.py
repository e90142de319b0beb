"""Authentication and roles as FastAPI dependencies, shared by the API and (later) the
server-rendered pages, so every route states the role it needs in its signature.

A request carries its token in one of two ways:

- `Authorization: Bearer <token>`: scripts, the CLI, other services. Browsers never attach it
  on their own, so such requests need no protection against cross-site request forgery.
- the `saga_session` cookie, holding the token: a browser session. The cookie is `HttpOnly`
  and `SameSite=Strict` (a browser does not send it on a request another site starts), and,
  as a second wall, an unsafe request (POST, PUT, PATCH, DELETE) authenticated by it must
  also (1) not come from another site by `Sec-Fetch-Site` or `Origin`, and (2) repeat the value
  of the `saga_csrf` cookie in an `X-CSRF-Token` header (double submit: another site can make
  the browser send the cookie, never read it to copy it into a header).

A bearer header wins over a cookie when both are sent.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.console.auth import Principal, Role, TokenVerifier
from orchestrator.console.masking import AccountMask
from orchestrator.core.saga_type import SagaType
from orchestrator.errors import NotAllowed, NotAuthenticated
from orchestrator.settings import Settings

SESSION_COOKIE: Final = "saga_session"
CSRF_COOKIE: Final = "saga_csrf"
CSRF_HEADER: Final = "X-CSRF-Token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

bearer = HTTPBearer(
    auto_error=False, scheme_name="bearer",
    description="An OpenID Connect access or ID token of the configured issuer, for the"
                " configured audience, with a console role in the roles claim")


@dataclass(frozen=True)
class Console:
    """What the routes need, built once per process by `orchestrator.console.server`."""

    settings: Settings
    engine: AsyncEngine | None  # None only for the app built to export its OpenAPI document
    verifier: TokenVerifier | None
    sagas: Mapping[str, SagaType[Any]]
    mask: AccountMask

    def database(self) -> AsyncEngine:
        assert self.engine is not None, "the console was built without a database"
        return self.engine


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"


def check_csrf(request: Request) -> None:
    """Refuse an unsafe request made with the session cookie unless it comes from a page of
    the console itself (see the module docstring)."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        raise NotAllowed(f"a {fetch_site} request may not act with the session cookie")
    origin = request.headers.get("origin")
    if origin is not None and origin != own_origin(request):
        raise NotAllowed(f"a request from {origin} may not act with the session cookie")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = request.headers.get(CSRF_HEADER, "")
    if not cookie or not sent or not hmac.compare_digest(cookie.encode(), sent.encode()):
        raise NotAllowed(f"an action with the session cookie must repeat the {CSRF_COOKIE}"
                         f" cookie in the {CSRF_HEADER} header")


async def authenticate(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Principal:
    verifier = console_of(request).verifier
    if verifier is None:
        raise NotAuthenticated("this console has no identity provider configured")
    if credentials is not None:
        return await verifier.verify(credentials.credentials)
    if request.headers.get("authorization"):
        raise NotAuthenticated("the Authorization header must be `Bearer <token>`")
    session = request.cookies.get(SESSION_COOKIE)
    if session:
        principal = await verifier.verify(session, from_cookie=True)
        if request.method not in SAFE_METHODS:
            check_csrf(request)
        return principal
    raise NotAuthenticated("no credentials: send `Authorization: Bearer <token>` (an OpenID"
                           " Connect token of the configured issuer)")


def require(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency that authenticates the request and refuses a role below `role`."""

    async def dependency(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if principal.role < role:
            raise NotAllowed(f"{principal.subject} has the {principal.role.label} role; this"
                             f" needs {role.label}")
        return principal

    dependency.__name__ = f"require_{role.label}"
    return dependency
