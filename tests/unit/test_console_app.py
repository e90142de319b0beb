"""The console app's edges that need no database: an unexpected error is a problem with an id
and no trace, unknown methods are problems too, and a cookie session cannot act without the
CSRF proof. Tokens are the development identity provider's, verified as any issuer's."""

from __future__ import annotations

import logging
import typing
from collections.abc import AsyncIterator

import httpx
import pytest

from orchestrator.console import AccountMask, Console, DevIdentityProvider, Role, TokenVerifier
from orchestrator.console.app import create_app
from orchestrator.settings import Settings

PROBLEM = "application/problem+json"


@pytest.fixture
async def app() -> AsyncIterator[tuple[httpx.AsyncClient, DevIdentityProvider]]:
    settings = Settings()
    idp = DevIdentityProvider("http://console.test", audience="saga-console",
                              roles_claim=settings.console_roles_claim,
                              role_names=settings.console_role_names)
    verifier = TokenVerifier(idp.keys(), issuer=idp.issuer, audience=idp.audience,
                             roles_claim=settings.console_roles_claim,
                             role_names=settings.console_role_names,
                             algorithms=settings.console_jwt_algorithms, leeway_s=0)
    # No database: a route that reaches for one fails, which is what the first test wants.
    console = Console(settings=settings, engine=None, verifier=verifier, sagas={},
                      mask=AccountMask(settings.console_masked_fields))
    # Starlette re-raises after answering an unexpected error (for the server's log): take the
    # answer as a client would.
    transport = httpx.ASGITransport(app=create_app(console, idp), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as client:
        yield client, idp


async def test_an_unexpected_error_answers_an_id_and_no_trace(
        app: tuple[httpx.AsyncClient, DevIdentityProvider],
        caplog: pytest.LogCaptureFixture) -> None:
    client, idp = app
    with caplog.at_level(logging.ERROR, logger="orchestrator.console.problems"):
        response = await client.get("/api/v1/overview", headers={
            "Authorization": f"Bearer {idp.mint(Role.VIEWER)}"})

    assert (response.status_code, response.headers["content-type"]) == (500, PROBLEM)
    body = response.json()
    assert body["code"] == "internal_error" and body["error_id"] in body["detail"]
    assert "Traceback" not in response.text and "assert" not in response.text
    assert body["error_id"] in caplog.text  # the log has it, with the traceback


async def test_a_wrong_method_is_a_problem(
        app: tuple[httpx.AsyncClient, DevIdentityProvider]) -> None:
    client, _ = app

    response = await client.delete("/api/v1/sagas")

    assert (response.status_code, response.headers["content-type"]) == (405, PROBLEM)
    assert response.json()["code"] == "http_405"


@pytest.mark.parametrize(("headers", "why"), [
    ({}, "X-CSRF-Token"),
    ({"X-CSRF-Token": "not-the-cookie"}, "X-CSRF-Token"),
    ({"X-CSRF-Token": "c" * 32, "Sec-Fetch-Site": "cross-site"}, "cross-site"),
    ({"X-CSRF-Token": "c" * 32, "Origin": "http://evil.test"}, "evil.test"),
])
async def test_a_cookie_session_cannot_act_without_the_csrf_proof(
        app: tuple[httpx.AsyncClient, DevIdentityProvider], headers: dict[str, str],
        why: str) -> None:
    client, idp = app
    client.cookies.set("saga_session", idp.mint(Role.ADMIN))
    client.cookies.set("saga_csrf", "c" * 32)

    response = await client.post("/api/v1/dead-letters/redrive", json={"all": True},
                                 headers=headers)
    reading = await client.get("/api/v1/whoami")

    assert response.status_code == 403 and why in response.json()["detail"]
    assert reading.json()["role"] == "admin"  # reads need no proof


async def test_a_token_from_another_dev_console_is_refused(
        app: tuple[httpx.AsyncClient, DevIdentityProvider]) -> None:
    client, idp = app
    other = DevIdentityProvider(idp.console_url, audience=idp.audience, roles_claim="roles",
                                role_names=Settings().console_role_names)

    response = await client.get("/api/v1/whoami",
                                headers={"Authorization": f"Bearer {other.mint(Role.ADMIN)}"})

    assert response.status_code == 401
    assert "did not make" in response.json()["detail"]


def test_the_console_knows_every_status_a_saga_can_have() -> None:
    """The status filter (API and page) and the page's count strip name the core's statuses,
    RESOLVED included: a status missing here could not be filtered on (a 422)."""
    from orchestrator.console import models
    from orchestrator.console.pages import templates
    from orchestrator.core.saga import SagaStatus

    [literal, *_] = typing.get_args(models.SagaStatus)
    assert set(typing.get_args(literal)) == {status.value for status in SagaStatus}
    assert set(templates.env.globals["statuses"]) == {status.value for status in SagaStatus}


async def test_a_resolved_filter_is_taken(
        app: tuple[httpx.AsyncClient, DevIdentityProvider]) -> None:
    """`?status=resolved` passes validation (it then needs the database, which this app has
    not: a 500 problem, not a 422)."""
    client, idp = app
    token = idp.mint(Role.VIEWER)
    answer = await client.get("/api/v1/sagas", params={"status": "resolved"},
                              headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 500, answer.text
