"""The development identity provider of `saga serve --dev`: never an open door.

At start it makes an ES256 signing key in memory (never written anywhere) and a random login
key. It signs tokens like an OpenID Connect issuer would (`iss` = `<console>/dev`, the console's
audience, a `sub`, the role in the configured roles claim, an expiry), and the console verifies
them exactly as it verifies a real issuer's: the dev mode changes where the keys come from,
not the checks. Its endpoints, only mounted in dev mode:

- `GET /dev/.well-known/openid-configuration` and `GET /dev/jwks.json`: its discovery document
  and public key, as a real issuer publishes them;
- `GET /dev/login?key=K`: a page to pick a role, and `GET /dev/login?key=K&role=R`: a browser
  session as that role (the session and CSRF cookies), then the console;
- `POST /dev/token` with `{"key": K, "role": R}`: a bearer token for scripts (`saga dev token`).

Everything but the public key needs the login key, which `saga serve --dev` prints in its login
link and writes to a state file only the user can read (`dev_state_path`).
"""

from __future__ import annotations

import hmac
import html
import json
import os
import secrets
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from jwt.algorithms import ECAlgorithm
from pydantic import BaseModel, Field

from orchestrator.console.auth import Role, StaticKeys
from orchestrator.console.security import CSRF_COOKIE, SESSION_COOKIE
from orchestrator.errors import ConfigurationError, NotAllowed

DEV_SUBJECT_PREFIX: Final = "dev-"
TOKEN_TTL_S: Final = 8 * 3600
# Where a dev session lands after logging in: the console's saga list.
AFTER_LOGIN: Final = "/sagas"


def _nested(path: str, value: Any) -> dict[str, Any]:
    """`realm_access.roles` -> {"realm_access": {"roles": value}}."""
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


class DevIdentityProvider:
    def __init__(self, console_url: str, *, audience: str, roles_claim: str,
                 role_names: Mapping[str, str]) -> None:
        self.console_url = console_url.rstrip("/")
        self.issuer = f"{self.console_url}/dev"
        self.audience = audience
        self._roles_claim = roles_claim
        self._role_names = dict(role_names)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.kid = f"dev-{secrets.token_hex(8)}"
        self.login_key = secrets.token_urlsafe(24)

    def jwks(self) -> dict[str, Any]:
        public = json.loads(ECAlgorithm.to_jwk(self._key.public_key()))
        return {"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "ES256"}]}

    def keys(self) -> StaticKeys:
        return StaticKeys(self.jwks())

    def discovery(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks.json",
                "id_token_signing_alg_values_supported": ["ES256"]}

    def mint(self, role: Role, subject: str | None = None, ttl_s: int = TOKEN_TTL_S) -> str:
        """A token as `role`, for `subject` (by default `dev-<role>`)."""
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.audience,
                  "sub": subject or f"{DEV_SUBJECT_PREFIX}{role.label}", "iat": now,
                  "exp": now + ttl_s,
                  **_nested(self._roles_claim, [self._role_names[role.label]])}
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})

    def login_url(self, role: Role | None = None) -> str:
        url = f"{self.console_url}/dev/login?key={self.login_key}"
        return url + (f"&role={role.label}" if role else "")

    def check_login_key(self, key: str | None) -> None:
        if not key or not hmac.compare_digest(key.encode(), self.login_key.encode()):
            raise NotAllowed("the development login needs the login key that `saga serve"
                             " --dev` printed (and wrote to its state file)")


class TokenRequest(BaseModel):
    key: str = Field(description="the login key `saga serve --dev` printed")
    role: str = Field(pattern="^(viewer|operator|admin)$")
    subject: str | None = Field(default=None, min_length=1, max_length=200)


def dev_router(provider: DevIdentityProvider, *, secure_cookies: bool) -> APIRouter:
    router = APIRouter(prefix="/dev", include_in_schema=False)

    @router.get("/.well-known/openid-configuration")
    async def discovery() -> dict[str, Any]:
        return provider.discovery()

    @router.get("/jwks.json")
    async def jwks() -> dict[str, Any]:
        return provider.jwks()

    @router.get("/login", response_model=None)
    async def login(request: Request, key: str | None = Query(default=None),
                    role: str | None = Query(default=None, pattern="^(viewer|operator|admin)$"),
                    ) -> HTMLResponse | RedirectResponse:
        provider.check_login_key(key)
        if role is None:
            links = "".join(
                f'<li><a href="{html.escape(provider.login_url(r))}">{r.label}</a>: '
                f"{html.escape(_ROLE_TEXT[r])}</li>" for r in Role)
            return HTMLResponse(
                "<!doctype html><html lang=en><meta charset=utf-8><title>saga console: dev"
                " login</title><body style='font-family:sans-serif;max-width:40em;margin:2em'>"
                "<h1>Development login</h1><p>This console runs with <code>--dev</code>: its"
                " identity provider is a key made at start. Sign in as:</p>"
                f"<ul>{links}</ul></body></html>")
        token = provider.mint(Role.named(role))
        response = RedirectResponse(AFTER_LOGIN, status_code=303,
                                    headers={"Cache-Control": "no-store"})
        response.set_cookie(SESSION_COOKIE, token, max_age=TOKEN_TTL_S, httponly=True,
                            samesite="strict", secure=secure_cookies, path="/")
        # Readable by the console's own scripts, which copy it into X-CSRF-Token.
        response.set_cookie(CSRF_COOKIE, secrets.token_urlsafe(24), max_age=TOKEN_TTL_S,
                            httponly=False, samesite="strict", secure=secure_cookies, path="/")
        return response

    @router.post("/token")
    async def token(body: TokenRequest) -> JSONResponse:
        provider.check_login_key(body.key)
        return JSONResponse({"access_token": provider.mint(Role.named(body.role), body.subject),
                             "token_type": "Bearer", "expires_in": TOKEN_TTL_S},
                            headers={"Cache-Control": "no-store"})

    return router


_ROLE_TEXT = {Role.VIEWER: "reads, account ids masked",
              Role.OPERATOR: "reads and acts on one saga or dead letter",
              Role.ADMIN: "also redrives dead letters in bulk"}


# The state file a running `saga serve --dev` leaves for `saga dev token`.

def dev_state_path() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"saga-console-dev-{os.getuid()}.json"


def write_dev_state(path: Path, provider: DevIdentityProvider) -> None:
    """Readable by the user only: the login key signs anyone in."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump({"console_url": provider.console_url, "login_key": provider.login_key,
                   "pid": os.getpid()}, file)


def request_dev_token(console_url: str, login_key: str, role: Role,
                      subject: str | None = None) -> str:
    """A bearer token from a running `saga serve --dev` (what `saga dev token` prints)."""
    try:
        response = httpx.post(f"{console_url.rstrip('/')}/dev/token", timeout=10,
                              json={"key": login_key, "role": role.label, "subject": subject})
    except httpx.HTTPError as error:
        raise ConfigurationError(f"no development console answers at {console_url}: {error}"
                                 ) from error
    if response.status_code != 200:
        raise ConfigurationError(f"the development console at {console_url} refused: "
                                 f"{response.status_code} {response.text[:200]}")
    return str(response.json()["access_token"])


def dev_token_from_state(path: Path, role: Role, subject: str | None = None) -> str:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"no development console state at {path} ({error}): start"
                                 " `saga serve --dev` first") from error
    return request_dev_token(state["console_url"], state["login_key"], role, subject)
