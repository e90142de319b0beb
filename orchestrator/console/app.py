"""The console's ASGI application: the API under `/api/v1`, the development identity provider
under `/dev` in dev mode, and every error as problem details. Server-rendered pages are to be
added as another router here, with the same `require(role)` dependencies."""

from __future__ import annotations

from fastapi import FastAPI

from orchestrator.console import api, problems
from orchestrator.console.devidp import DevIdentityProvider, dev_router
from orchestrator.console.security import Console

TITLE = "saga console API"
VERSION = "1"
DESCRIPTION = (
    "The on-call console's HTTP API: sagas and their timelines, stuck sagas, dead letters and"
    " their redrive, counts and throughput. Every request needs an OpenID Connect bearer token"
    " of the configured issuer with a console role (viewer: reads, account ids masked;"
    " operator: reads and acts; admin: also bulk redrive). Errors are problem details"
    " (RFC 9457). See docs/operations/console.md.")


def create_app(console: Console, dev: DevIdentityProvider | None = None) -> FastAPI:
    # No Swagger UI: it loads its scripts from a CDN at run time. The document itself is public
    # (it is committed in the repository); every route it describes needs a token.
    app = FastAPI(title=TITLE, version=VERSION, description=DESCRIPTION,
                  docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.console = console
    problems.install(app)
    app.include_router(api.router)
    if dev is not None:
        app.include_router(dev_router(dev, secure_cookies=console.settings.console_cookie_secure))
    return app
