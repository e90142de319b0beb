"""`saga serve`: the console on uvicorn, with the issuer's keys or the dev identity provider.

`ConsoleServer` binds its socket before anything else (so port 0 gives a free port whose URL is
known before the app is built: the dev issuer's URL contains it), then runs uvicorn on the
caller's event loop without touching its signal handlers, so the CLI, `saga dev` and tests all
start and stop it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.console.app import create_app
from orchestrator.console.auth import RemoteKeys, TokenVerifier
from orchestrator.console.devidp import DevIdentityProvider
from orchestrator.console.masking import AccountMask
from orchestrator.console.security import Console
from orchestrator.core.saga_type import SagaType
from orchestrator.errors import ConfigurationError
from orchestrator.settings import Settings

DEV_AUDIENCE = "saga-console"


def require_identity_provider(settings: Settings, *, dev: bool) -> None:
    """Refuse to serve without a way to authenticate: outside dev mode, the issuer and the
    audience must be configured. Checked before anything is connected or bound."""
    if dev:
        return
    missing = [name for name, value in (("SAGA_CONSOLE_OIDC_ISSUER", settings.console_oidc_issuer),
                                        ("SAGA_CONSOLE_OIDC_AUDIENCE",
                                         settings.console_oidc_audience)) if not value]
    if missing:
        raise ConfigurationError(
            f"saga serve needs an OpenID Connect issuer to authenticate every request: set "
            f"{' and '.join(missing)} (docs/operations/console.md), or run `saga serve --dev` "
            "on this machine for a development identity provider")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: whoever runs the console decides when it stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class ConsoleServer:
    """The console on `host:port` (port 0: a free one), until `stop()`."""

    def __init__(self, settings: Settings, engine: AsyncEngine,
                 sagas: Mapping[str, SagaType[Any]], *, host: str = "127.0.0.1",
                 port: int = 8080, dev: bool = False) -> None:
        require_identity_provider(settings, dev=dev)
        if dev and not _is_loopback(host):
            raise ConfigurationError(f"saga serve --dev listens on loopback only, not {host}:"
                                     " its identity provider is for this machine's user")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as error:
            self._socket.close()
            raise ConfigurationError(f"cannot listen on {host}:{port}: {error}") from error
        bound_port = self._socket.getsockname()[1]
        shown_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown_host}:{bound_port}"
        self.dev: DevIdentityProvider | None = None
        self._remote_keys: RemoteKeys | None = None
        if dev:
            self.dev = DevIdentityProvider(
                self.url, audience=settings.console_oidc_audience or DEV_AUDIENCE,
                roles_claim=settings.console_roles_claim,
                role_names=settings.console_role_names)
            keys: Any = self.dev.keys()
            issuer, audience = self.dev.issuer, self.dev.audience
            settings = settings.model_copy(update={"console_cookie_secure": False})
        else:
            assert settings.console_oidc_issuer and settings.console_oidc_audience
            issuer, audience = settings.console_oidc_issuer, settings.console_oidc_audience
            keys = self._remote_keys = RemoteKeys(
                issuer, jwks_url=settings.console_oidc_jwks_url,
                cache_s=settings.console_jwks_cache_s,
                min_refresh_s=settings.console_jwks_min_refresh_s)
        verifier = TokenVerifier(
            keys, issuer=issuer, audience=audience, roles_claim=settings.console_roles_claim,
            role_names=settings.console_role_names, algorithms=settings.console_jwt_algorithms,
            leeway_s=settings.console_jwt_leeway_s)
        console = Console(settings=settings, engine=engine, verifier=verifier, sagas=sagas,
                          mask=AccountMask(settings.console_masked_fields))
        self.app = create_app(console, self.dev)
        self._server = _Server(uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                              access_log=False))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> ConsoleServer:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]),
                                         name="console")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it did not start
                raise ConfigurationError("the console stopped as it started")
            await asyncio.sleep(0.01)
        return self

    async def wait(self) -> None:
        """Until the server stops by itself (it does not, unless it fails)."""
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._socket.close()
        if self._remote_keys is not None:
            await self._remote_keys.close()

    async def __aenter__(self) -> ConsoleServer:
        return await self.start()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.stop()
