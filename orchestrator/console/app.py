"""The console's ASGI application: the web pages (`orchestrator.console.pages`) with their
script and style under `/static`, the API under `/api/v1`, the development identity provider
under `/dev` in dev mode, and every error as problem details (or, to a browser asking for a
page, as a page)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from orchestrator.console import api, pages, problems
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
    app.state.dev_login = dev is not None
    app.state.error_page = pages.error_page
    problems.install(app)
    app.add_middleware(pages.SecurityHeaders)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    if dev is not None:
        app.include_router(dev_router(dev, secure_cookies=console.settings.console_cookie_secure))
    return app
