"""The console's API served for real (uvicorn on a free loopback port) over the real event store,
with tokens signed by a stand-in issuer whose keys the console fetches over HTTP: the auth
matrix, what each role sees and may do, problem details for every error.

Reads and single redrives use the session's database, with sagas run by the real workers; a
bulk redrive takes every pending dead letter, so it runs against a database of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.console import ConsoleServer
from orchestrator.console.openapi import build_document
from orchestrator.kafka.consumer import decode_headers
from orchestrator.postgres.store import json_value
from orchestrator.settings import Settings
from schemas import TOPIC_TRANSFER_COMMANDS
from steps import APPLICATION
from tests.integration.conftest import Harness, Isolated
from tests.integration.test_dlq import Letter, insert_letter, redrive_outbox_rows
from tests.oidc_issuer import AUDIENCE, OidcIssuer, new_key, running_issuer

pytestmark = pytest.mark.integration
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def oidc() -> Iterator[OidcIssuer]:
    with running_issuer() as issuer:
        yield issuer


def console_settings(settings: Settings, oidc: OidcIssuer) -> Settings:
    return settings.model_copy(update={
        "console_oidc_issuer": oidc.url, "console_oidc_audience": AUDIENCE,
        "console_jwks_min_refresh_s": 0.0, "console_jwt_leeway_s": 0.0,
        "console_payload_preview_bytes": 1024})


@pytest.fixture(scope="module")
async def api(stack_settings: Settings, engine: AsyncEngine, oidc: OidcIssuer
              ) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the console over the session's database."""
    async with ConsoleServer(console_settings(stack_settings, oidc), engine,
                             APPLICATION.saga_types, port=0) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        yield client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def problem_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["detail"] and body["title"]
    assert "Traceback" not in response.text
    return body


@pytest.fixture
async def transfer(harness: Harness) -> dict[str, Any]:
    """A completed transfer between two fresh accounts."""
    source = await harness.open("console-src", "100.00")
    destination = await harness.open("console-dst", "0.00")
    request = harness.request(source, destination, "12.34")
    harness.publish(request)
    saga = await harness.wait_terminal(request["transfer_id"])
    assert saga.status == "COMPLETED"
    return {**request, "saga_id": str(saga.saga_id)}


# The auth matrix.

async def test_no_token_is_401_with_a_bearer_challenge(api: httpx.AsyncClient) -> None:
    for path in ("/api/v1/sagas", "/api/v1/overview", "/api/v1/dead-letters"):
        body = problem_of(await api.get(path), 401)
        assert body["code"] == "not_authenticated"
    response = await api.get("/api/v1/sagas")
    assert response.headers["www-authenticate"] == 'Bearer realm="saga-console"'
    not_bearer = await api.get("/api/v1/sagas", headers={"Authorization": "Basic YTpi"})
    assert "Bearer <token>" in problem_of(not_bearer, 401)["detail"]
    # the API's description is public (it is committed in docs/); there is no Swagger UI
    described = await api.get("/api/openapi.json")
    assert described.json() == build_document()
    assert (await api.get("/api/docs")).status_code == 404


@pytest.mark.parametrize(("token_of", "why"), [
    (lambda o: o.token("admin", expires_in_s=-5), "expired"),
    (lambda o: o.token("admin", audience="some-other-api"), "not for this console"),
    (lambda o: o.token("admin", key=new_key()), "signature does not verify"),
])
async def test_untrusted_tokens_are_401(api: httpx.AsyncClient, oidc: OidcIssuer,
                                        token_of: Any, why: str) -> None:
    response = await api.get("/api/v1/sagas", headers=auth(token_of(oidc)))

    assert why in problem_of(response, 401)["detail"]
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_a_token_without_a_console_role_is_403(api: httpx.AsyncClient,
                                                     oidc: OidcIssuer) -> None:
    response = await api.get("/api/v1/sagas", headers=auth(oidc.token("payroll")))

    assert problem_of(response, 403)["code"] == "not_allowed"


async def test_whoami_names_the_subject_and_role(api: httpx.AsyncClient,
                                                 oidc: OidcIssuer) -> None:
    response = await api.get("/api/v1/whoami", headers=auth(oidc.token("viewer", sub="vera")))

    assert response.json() == {"subject": "vera", "role": "viewer", "accounts_masked": True}


async def test_a_viewer_reads_a_saga_with_account_ids_masked(
        api: httpx.AsyncClient, oidc: OidcIssuer, transfer: dict[str, Any]) -> None:
    source, destination = transfer["source_account"], transfer["destination_account"]
    path = f"/api/v1/sagas/{transfer['transfer_id']}"

    as_viewer = await api.get(path, headers=auth(oidc.token("viewer")))
    as_operator = await api.get(path, headers=auth(oidc.token("operator")))

    assert as_viewer.status_code == 200, as_viewer.text
    viewed = as_viewer.json()
    assert (viewed["saga_id"], viewed["status"], viewed["accounts_masked"]) == (
        transfer["saga_id"], "COMPLETED", True)
    assert source not in as_viewer.text and destination not in as_viewer.text
    started = viewed["events"][0]
    assert started["payload"]["input"]["source_account"] == "****" + source[-4:]
    assert f"****{source[-4:]} -> ****{destination[-4:]}" in started["detail"]
    # the operator sees the same timeline, accounts and all
    operated = as_operator.json()
    assert operated["accounts_masked"] is False
    assert operated["events"][0]["payload"]["input"]["source_account"] == source
    assert [e["type"] for e in operated["events"]] == [e["type"] for e in viewed["events"]]
    assert operated["events"][-1]["type"] == "SagaCompleted"


async def test_one_saga_by_id_prefix_or_key_and_in_the_list(
        api: httpx.AsyncClient, oidc: OidcIssuer, transfer: dict[str, Any]) -> None:
    headers = auth(oidc.token("viewer"))
    for ref in (transfer["saga_id"], transfer["saga_id"][:13], transfer["transfer_id"]):
        response = await api.get(f"/api/v1/sagas/{ref}", headers=headers)
        assert response.json()["saga_id"] == transfer["saga_id"], (ref, response.text)

    listed = await api.get("/api/v1/sagas", headers=headers, params={
        "key": transfer["transfer_id"], "type": "transfer", "status": "completed"})
    [row] = listed.json()["sagas"]
    assert (row["saga_id"], row["input"]["source_account"]) == (
        transfer["saga_id"], "****" + transfer["source_account"][-4:])


async def test_a_viewer_may_not_act(api: httpx.AsyncClient, oidc: OidcIssuer,
                                    harness: Harness) -> None:
    dead_letter_id = await insert_letter(harness.engine, Letter(payload=b'{"broken":'))
    viewer = auth(oidc.token("viewer", sub="vera"))

    one = await api.post(f"/api/v1/dead-letters/{dead_letter_id}/redrive", headers=viewer)
    bulk = await api.post("/api/v1/dead-letters/redrive", headers=viewer, json={"all": True})

    assert "vera has the viewer role; this needs operator" in problem_of(one, 403)["detail"]
    assert problem_of(bulk, 403)["code"] == "not_allowed"
    async with harness.engine.connect() as conn:
        assert (await conn.execute(text(
            "SELECT redriven_at FROM dead_letters WHERE dead_letter_id = :id"),
            {"id": dead_letter_id})).scalar_one() is None


async def test_an_operator_redrives_one_dead_letter_as_its_actor(
        api: httpx.AsyncClient, oidc: OidcIssuer, harness: Harness) -> None:
    topic = harness.settings.topic(TOPIC_TRANSFER_COMMANDS)
    dead_letter_id = await insert_letter(harness.engine, Letter(
        payload=f'{{"console-test": "{uuid.uuid4()}"'.encode(), topic=topic))
    operator = auth(oidc.token("operator", sub="olivia@example.com"))

    response = await api.post(f"/api/v1/dead-letters/{str(dead_letter_id)[:12]}/redrive",
                              headers=operator)
    again = await api.post(f"/api/v1/dead-letters/{dead_letter_id}/redrive", headers=operator)
    bulk = await api.post("/api/v1/dead-letters/redrive", headers=operator, json={"all": True})

    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["actor"], result["redriven"]) == ("olivia@example.com", [str(dead_letter_id)])
    [outbox] = await redrive_outbox_rows(harness.engine, dead_letter_id, topic)
    assert ("saga-redriven-by", b"olivia@example.com") in decode_headers(
        json_value(outbox.headers))
    assert again.json()["already_redriven"] == [str(dead_letter_id)]
    assert len(await redrive_outbox_rows(harness.engine, dead_letter_id, topic)) == 1
    assert "needs admin" in problem_of(bulk, 403)["detail"]
    missing = await api.post(f"/api/v1/dead-letters/{uuid.uuid4()}/redrive", headers=operator)
    assert problem_of(missing, 404)["code"] == "not_found"


@pytest.fixture
async def own_api(stack_settings: Settings, isolated: Isolated, oidc: OidcIssuer
                  ) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a console over a database of its own."""
    async with ConsoleServer(console_settings(stack_settings, oidc), isolated.engine,
                             APPLICATION.saga_types, port=0) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        yield client


async def test_an_admin_redrives_in_bulk(own_api: httpx.AsyncClient, oidc: OidcIssuer,
                                         isolated: Isolated) -> None:
    pending = [await insert_letter(isolated.engine, Letter(payload=f"bad {n}".encode()))
               for n in range(3)]
    failed_saga = await insert_letter(isolated.engine, Letter(payload=b"", stage="recovery",
                                                              reason_code="COMPENSATION_FAILED"))
    admin = auth(oidc.token("admin", sub="ada"))

    by_ids = await own_api.post("/api/v1/dead-letters/redrive", headers=admin,
                                json={"ids": [str(pending[0])]})
    refused = await own_api.post("/api/v1/dead-letters/redrive", headers=admin,
                                 json={"ids": [str(failed_saga)]})
    everything = await own_api.post("/api/v1/dead-letters/redrive", headers=admin,
                                    json={"all": True})
    neither = await own_api.post("/api/v1/dead-letters/redrive", headers=admin, json={})

    assert by_ids.json()["redriven"] == [str(pending[0])]
    assert "FAILED in recovery" in problem_of(refused, 409)["detail"]
    assert (everything.json()["actor"], sorted(everything.json()["redriven"])) == (
        "ada", sorted(str(i) for i in pending[1:]))
    assert "either `ids` or `all: true`" in problem_of(neither, 422)["detail"]
    async with isolated.engine.connect() as conn:
        actors = (await conn.execute(text(
            "SELECT count(*) FROM outbox WHERE headers @> CAST(:h AS jsonb)"),
            {"h": json.dumps([["saga-redriven-by", "YWRh"]])})).scalar_one()  # base64("ada")
    assert actors == 3


async def test_a_dead_letter_is_shown_truncated_with_a_download_of_the_whole(
        own_api: httpx.AsyncClient, oidc: OidcIssuer, isolated: Isolated) -> None:
    big = json.dumps({"source_account": "acc-hidden-7777", "note": "x" * 5000}).encode()
    letter = await insert_letter(isolated.engine, Letter(payload=big))
    binary = await insert_letter(isolated.engine, Letter(payload=b"\xff\xfe" * 10))
    operator, viewer = auth(oidc.token("operator")), auth(oidc.token("viewer"))

    shown = (await own_api.get(f"/api/v1/dead-letters/{letter}", headers=operator)).json()
    whole = await own_api.get(shown["payload"]["download_url"], headers=operator)
    seen = (await own_api.get(f"/api/v1/dead-letters/{letter}", headers=viewer)).json()
    viewer_whole = await own_api.get(shown["payload"]["download_url"], headers=viewer)
    viewer_binary = await own_api.get(f"/api/v1/dead-letters/{binary}/payload", headers=viewer)
    listed = await own_api.get("/api/v1/dead-letters", headers=viewer,
                               params={"reason": "processing_failed"})

    assert (shown["payload"]["size_bytes"], shown["payload"]["truncated"],
            len(shown["payload"]["value"])) == (len(big), True, 1024)
    assert whole.content == big
    assert whole.headers["content-disposition"] == (
        f'attachment; filename="dead-letter-{letter}.bin"')
    assert "acc-hidden-7777" in shown["payload"]["value"]
    assert "acc-hidden" not in seen["payload"]["value"] and seen["accounts_masked"]
    assert "acc-hidden" not in viewer_whole.text and "****7777" in viewer_whole.text
    assert "not text" in problem_of(viewer_binary, 403)["detail"]
    assert {d["dead_letter_id"] for d in listed.json()["dead_letters"]} == {str(letter),
                                                                          str(binary)}


# Bad parameters, unknown things.

@pytest.mark.parametrize(("path", "params", "where"), [
    ("/api/v1/sagas", {"limit": "0"}, "query.limit"),
    ("/api/v1/sagas", {"limit": "many"}, "query.limit"),
    ("/api/v1/sagas", {"limit": "-1"}, "query.limit"),
    ("/api/v1/sagas", {"status": "rejected-ish"}, "query.status"),
    ("/api/v1/sagas", {"definition_version": "0"}, "query.definition_version"),
    ("/api/v1/stuck", {"grace_s": "-1"}, "query.grace_s"),
    ("/api/v1/dead-letters", {"reason": "nope; drop table"}, "query.reason"),
    ("/api/v1/dead-letters/abc", {}, "path.dead_letter_ref"),
])
async def test_bad_parameters_are_422_problems(api: httpx.AsyncClient, oidc: OidcIssuer,
                                               path: str, params: dict[str, str],
                                               where: str) -> None:
    response = await api.get(path, params=params, headers=auth(oidc.token("operator")))

    body = problem_of(response, 422)
    assert body["code"] == "invalid_parameters"
    assert where in [error["where"] for error in body["errors"]], body


async def test_unknown_things_are_404_problems(api: httpx.AsyncClient,
                                               oidc: OidcIssuer) -> None:
    headers = auth(oidc.token("operator"))

    saga = await api.get(f"/api/v1/sagas/{uuid.uuid4()}", headers=headers)
    letter = await api.get(f"/api/v1/dead-letters/{uuid.uuid4()}", headers=headers)
    nowhere = await api.get("/api/v1/nowhere", headers=headers)

    assert "no saga" in problem_of(saga, 404)["detail"]
    assert "no dead letter" in problem_of(letter, 404)["detail"]
    assert problem_of(nowhere, 404)["detail"] == "no such path: /api/v1/nowhere"


async def test_overview_and_stuck(api: httpx.AsyncClient, oidc: OidcIssuer,
                                  transfer: dict[str, Any]) -> None:
    headers = auth(oidc.token("viewer"))

    overview = (await api.get("/api/v1/overview", headers=headers)).json()
    stuck = await api.get("/api/v1/stuck", headers=headers, params={"grace_s": "3600"})

    assert overview["by_status"]["COMPLETED"] >= 1
    assert overview["by_type"]["transfer"]["COMPLETED"] >= 1
    assert overview["total"] == sum(overview["by_status"].values())
    last_hour = overview["last_hour"]
    assert last_hour["finished"] >= 1 and last_hour["window_s"] == 3600
    assert 0 < last_hour["p50_ms"] <= last_hour["p99_ms"]
    assert last_hour["by_type"]["transfer"]["finished"] >= 1
    assert stuck.status_code == 200, stuck.text
    assert set(stuck.json()) == {"sagas", "outbox_set_aside", "accounts_masked"}


# The dev mode, run as a user runs it.

def _saga_env(harness: Harness, runtime_dir: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    assert harness.settings.database_url
    return {**clean, "SAGA_DATABASE_URL": harness.settings.database_url,
            "XDG_RUNTIME_DIR": str(runtime_dir)}


async def test_serve_dev_signs_in_by_link_and_mints_tokens_for_scripts(
        harness: Harness, tmp_path: Path) -> None:
    env = _saga_env(harness, tmp_path)
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orchestrator.cli", "serve", "--dev", "--port", "0", "--json",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr)
        try:
            assert server.stdout is not None
            line = await asyncio.wait_for(server.stdout.readline(), 60)
            assert line, log.read_text()
            await _use_dev_console(json.loads(line), env)
        finally:
            server.terminate()
            await asyncio.wait_for(server.wait(), 30)
    # SIGTERM stops it cleanly, and the login key goes with it
    assert server.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    assert [name for name in os.listdir(tmp_path) if name.endswith(".json")] == []


async def _use_dev_console(info: dict[str, Any], env: dict[str, str]) -> None:
    """What a user of `saga serve --dev` does: a token for a script, a session by the link."""
    url = info["console_url"]
    assert info["login_url"].startswith(f"{url}/dev/login?key=")
    assert oct(os.stat(info["dev_state"]).st_mode & 0o777) == "0o600"

    minted = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "orchestrator.cli", "dev", "token", "--role", "operator"],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        me = await client.get("/api/v1/whoami", headers=auth(token))
        assert me.json() == {"subject": "dev-operator", "role": "operator",
                             "accounts_masked": False}
        # the login page and the token endpoint need the login key
        assert (await client.get("/dev/login")).status_code == 403
        assert (await client.post("/dev/token", json={"key": "guess", "role": "admin"}
                                  )).status_code == 403
        assert (await client.get("/api/v1/whoami")).status_code == 401

        # a browser session by the printed link, as a viewer
        page = await client.get(info["login_url"])
        assert page.status_code == 200 and "operator" in page.text
        signed_in = await client.get(f"{info['login_url']}&role=admin")
        assert (signed_in.status_code, signed_in.headers["location"]) == (303, "/sagas")
        assert (await client.get("/api/v1/whoami")).json() == {
            "subject": "dev-admin", "role": "admin", "accounts_masked": False}
        # acting with the session cookie needs the CSRF header; with it, auth passes
        act = "/api/v1/dead-letters/redrive"
        without = await client.post(act, json={"ids": [str(uuid.uuid4())]})
        assert "X-CSRF-Token" in problem_of(without, 403)["detail"]
        cross = await client.post(act, json={"ids": [str(uuid.uuid4())]}, headers={
            "X-CSRF-Token": client.cookies["saga_csrf"], "Origin": "https://evil.example"})
        assert "evil.example" in problem_of(cross, 403)["detail"]
        allowed = await client.post(act, json={"ids": [str(uuid.uuid4())]}, headers={
            "X-CSRF-Token": client.cookies["saga_csrf"], "Origin": url})
        assert allowed.status_code == 200, allowed.text
        assert allowed.json()["actor"] == "dev-admin"


async def test_serve_with_an_issuer_verifies_its_tokens(harness: Harness, oidc: OidcIssuer,
                                                        tmp_path: Path) -> None:
    """`saga serve` as deployed: the issuer's keys found through its discovery document."""
    env = {**_saga_env(harness, tmp_path), "SAGA_CONSOLE_OIDC_ISSUER": oidc.url,
           "SAGA_CONSOLE_OIDC_AUDIENCE": AUDIENCE,
           "SAGA_CONSOLE_ROLE_NAMES": json.dumps({"viewer": "ro", "operator": "rw",
                                                  "admin": "root"})}
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orchestrator.cli", "serve", "--port", "0", "--json",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr)
        try:
            assert server.stdout is not None
            line = await asyncio.wait_for(server.stdout.readline(), 60)
            assert line, log.read_text()
            info = json.loads(line)
            assert "login_url" not in info
            async with httpx.AsyncClient(base_url=info["console_url"], timeout=30) as client:
                me = await client.get("/api/v1/whoami", headers=auth(oidc.token("rw", sub="o")))
                default_names = await client.get("/api/v1/whoami",
                                                 headers=auth(oidc.token("operator")))
                no_dev = await client.get("/dev/login")
        finally:
            server.terminate()
            await asyncio.wait_for(server.wait(), 30)
    assert me.json() == {"subject": "o", "role": "operator", "accounts_masked": False}
    assert problem_of(default_names, 403)["code"] == "not_allowed"  # names are configured
    assert no_dev.status_code == 404  # no development identity provider outside --dev
    assert server.returncode == 0, log.read_text()
