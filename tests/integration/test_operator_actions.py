"""Operator actions on the real PostgreSQL and broker: retry now, cancel, retry compensation and
resolve, each recorded as events of the saga with its actor and reason, acting once per action
id, refused (nothing written) when the saga's state does not allow it; from the ops layer, the
`saga` command and the HTTP API.

The recovery tests' rig gives each test a database and topic prefix of its own and lets the test
decide every participant's reply (a participant that keeps failing its compensation is a test
that keeps answering FAILED); the relay publishes what the actions queued."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import text

from orchestrator.console import ConsoleServer, Role
from orchestrator.core.saga import ActOnSaga, OperatorAction, SagaStatus, outcome_event_id
from orchestrator.errors import Conflict, OperatorActionRefused
from orchestrator.ops import dlq
from orchestrator.ops.actions import ActionResult, act_on_saga
from orchestrator.ops.queries import timeline
from orchestrator.workers.relay import OutboxRelay
from schemas import TOPIC_TRANSFER_EVENTS, Direction, Outcome, StepCommand
from steps import APPLICATION
from tests.cli_process import run_saga
from tests.integration.test_console import auth, console_settings, problem_of
from tests.integration.test_dlq import Letter, insert_letter
from tests.integration.test_outcomes import _outcome_rows
from tests.integration.test_recovery import Rig, rig, template_db  # noqa: F401 (fixtures)
from tests.oidc_issuer import OidcIssuer, running_issuer

pytestmark = pytest.mark.integration


async def act(rig: Rig, saga_id: uuid.UUID, action: OperatorAction,  # noqa: F811
              reason: str = "INC-12: on-call", actor: str = "it-operator",
              action_id: uuid.UUID | None = None) -> ActionResult:
    return await act_on_saga(rig.engine, rig.settings, APPLICATION.saga_types, saga_id,
                             ActOnSaga(action, action_id or uuid.uuid4(), actor, reason))


async def command(rig: Rig, saga_id: uuid.UUID, participant: str,  # noqa: F811
                  step: str, direction: Direction = Direction.FORWARD) -> StepCommand:
    """The last command the saga queued for `step` in `direction`."""
    return [c for c in await rig.commands(saga_id, participant)
            if (c.step, c.direction) == (step, direction)][-1]


async def at_credit(rig: Rig) -> uuid.UUID:  # noqa: F811
    """A saga whose screen and reserve succeeded; credit's command is out."""
    [saga_id] = await rig.start()
    for participant, step in (("risk", "screen"), ("ledger", "reserve")):
        await rig.orchestrator.handle_batch([rig.reply(await command(rig, saga_id, participant,
                                                                     step))])
    assert (await rig.saga(saga_id))[0].step == "credit"
    return saga_id


async def failed_compensating(rig: Rig) -> uuid.UUID:  # noqa: F811
    """A saga whose credit was refused and whose release (reserve's compensation) the ledger
    refused: FAILED."""
    saga_id = await at_credit(rig)
    credit = await command(rig, saga_id, "ledger", "credit")
    await rig.orchestrator.handle_batch([rig.reply(credit, Outcome.FAILED)])
    release = await command(rig, saga_id, "ledger", "reserve", Direction.COMPENSATE)
    await rig.orchestrator.handle_batch([rig.reply(release, Outcome.FAILED)])
    assert (await rig.saga(saga_id))[0].status is SagaStatus.FAILED
    return saga_id


async def test_retry_now_starts_a_waiting_retry_at_once_and_acts_once_per_action_id(
        rig: Rig) -> None:  # noqa: F811
    saga_id = await at_credit(rig)
    credit = await command(rig, saga_id, "ledger", "credit")
    await rig.orchestrator.handle_batch([rig.reply(credit, Outcome.FAILED, retryable=True)])
    waiting, _ = await rig.saga(saga_id)
    assert waiting.next_attempt_at is not None and waiting.next_attempt_at > datetime.now(UTC)
    relay = OutboxRelay(rig.settings, rig.engine, rig.producer)
    await relay.publish_once(grace_s=0)
    action_id = uuid.uuid4()

    first = await act(rig, saga_id, OperatorAction.RETRY_NOW, action_id=action_id)
    again = await act(rig, saga_id, OperatorAction.RETRY_NOW, action_id=action_id)
    await relay.publish_once(grace_s=0)

    assert (first.events, first.commands, first.repeated) == (
        ("OperatorActed", "StepStarted"), 1, False)
    assert again == ActionResult(**{**first.__dict__, "repeated": True})
    retried = await command(rig, saga_id, "ledger", "credit")
    assert retried.attempt == 2 and retried.command_id != credit.command_id
    # on the participant's topic at once, not at the backoff's end
    on_topic = await rig.published(saga_id, "ledger", 3)
    assert [c.command_id for c in on_topic][-1] == retried.command_id
    state = await rig.assert_consistent(saga_id)
    assert state.next_attempt_at is None and state.command_id == retried.command_id
    events = await rig.events(saga_id)
    assert [(e.type, actor) for e, actor in events[-2:]] == [
        ("OperatorActed", "it-operator"), ("StepStarted", "it-operator")]
    assert types_count(events, "OperatorActed") == 1  # the repeat wrote nothing
    # the same id for another action is a conflict, not a second action
    with pytest.raises(Conflict, match="used for retry_now"):
        await act(rig, saga_id, OperatorAction.CANCEL, action_id=action_id)
    await rig.orchestrator.handle_batch([rig.reply(retried)])
    assert (await rig.saga(saga_id))[0].step == "settle"


def types_count(events: list[tuple[object, str]], kind: str) -> int:
    return sum(getattr(event, "type", None) == kind for event, _actor in events)


async def test_cancel_compensates_a_running_saga_and_its_outcome_says_compensated(
        rig: Rig) -> None:  # noqa: F811
    saga_id = await at_credit(rig)
    credit = await command(rig, saga_id, "ledger", "credit")

    done = await act(rig, saga_id, OperatorAction.CANCEL, reason="customer withdrew")
    # the orchestrator knew the saga as it was: its known-state write must lose, and decide
    # the late success of the cancelled step from the stored state (stale: undone anyway)
    late = rig.reply(credit)
    await rig.orchestrator.handle_batch([late])

    assert done.events == ("OperatorActed", "StepStarted") and done.status == "COMPENSATING"
    assert await rig.verdicts(f"reply:{json.loads(late.value)['reply_id']}") == ["stale"]
    reverse = await command(rig, saga_id, "ledger", "credit", Direction.COMPENSATE)
    await rig.orchestrator.handle_batch([rig.reply(reverse)])
    release = await command(rig, saga_id, "ledger", "reserve", Direction.COMPENSATE)
    await rig.orchestrator.handle_batch([rig.reply(release)])
    state = await rig.assert_consistent(saga_id)
    assert state.status is SagaStatus.COMPENSATED
    [outcome] = await _outcome_rows(rig.engine, rig.settings, saga_id)
    assert outcome.outcome == "compensated" and outcome.failed_step == "credit"  # type: ignore[union-attr]
    assert outcome.reason == "CANCELLED: customer withdrew (by it-operator)"  # type: ignore[union-attr]
    with pytest.raises(OperatorActionRefused, match="COMPENSATED"):
        await act(rig, saga_id, OperatorAction.CANCEL)


async def test_cancel_after_the_pivot_is_refused_and_changes_nothing(
        rig: Rig) -> None:  # noqa: F811
    saga_id = await at_credit(rig)
    for step in ("credit", "settle"):
        await rig.orchestrator.handle_batch([rig.reply(await command(rig, saga_id, "ledger",
                                                                     step))])
    before = await rig.events(saga_id)

    with pytest.raises(OperatorActionRefused, match="past its pivot: step settle succeeded"):
        await act(rig, saga_id, OperatorAction.CANCEL)

    assert await rig.events(saga_id) == before
    async with rig.engine.connect() as conn:
        assert (await conn.execute(text(
            "SELECT count(*) FROM inbox WHERE consumer = 'operator'"))).scalar_one() == 0


async def test_a_failed_compensation_is_retried_and_a_saga_failed_again_is_resolved(
        rig: Rig) -> None:  # noqa: F811
    saga_id = await failed_compensating(rig)
    with pytest.raises(OperatorActionRefused,
                       match="FAILED while compensating: retry its compensation"):
        await act(rig, saga_id, OperatorAction.RETRY_NOW)

    retried = await act(rig, saga_id, OperatorAction.RETRY_COMPENSATION, reason="ledger back")
    assert (retried.status, retried.commands) == ("COMPENSATING", 1)
    release = await command(rig, saga_id, "ledger", "reserve", Direction.COMPENSATE)
    assert release.attempt == 2
    await rig.orchestrator.handle_batch([rig.reply(release, Outcome.FAILED)])  # refused again
    assert (await rig.saga(saga_id))[0].status is SagaStatus.FAILED

    resolved = await act(rig, saga_id, OperatorAction.RESOLVE, actor="carol",
                         reason="INC-12: hold released by hand")

    assert resolved.status == "RESOLVED" and resolved.outcome is not None
    assert (await rig.assert_consistent(saga_id)).status is SagaStatus.RESOLVED
    rows = await _outcome_rows(rig.engine, rig.settings, saga_id)
    assert [r.outcome for r in rows] == ["failed", "failed", "resolved"]
    said = await timeline(rig.engine, str(saga_id))
    acted = [(e["type"], e["actor"], e["detail"]) for e in said["events"]
             if e["type"] in ("OperatorActed", "SagaResolved")]
    assert acted == [
        ("OperatorActed", "it-operator", "retry compensation by it-operator: ledger back"),
        ("SagaResolved", "carol", "closed by carol: INC-12: hold released by hand")]


async def test_retry_compensation_that_succeeds_ends_the_saga_compensated(
        rig: Rig) -> None:  # noqa: F811
    saga_id = await failed_compensating(rig)
    await act(rig, saga_id, OperatorAction.RETRY_COMPENSATION)
    release = await command(rig, saga_id, "ledger", "reserve", Direction.COMPENSATE)
    await rig.orchestrator.handle_batch([rig.reply(release)])
    assert (await rig.assert_consistent(saga_id)).status is SagaStatus.COMPENSATED
    rows = await _outcome_rows(rig.engine, rig.settings, saga_id)
    assert [r.outcome for r in rows] == ["failed", "compensated"]
    # A new end, a new outcome id: readers deduplicate on event ids (docs/client.md)
    assert rows[1].event_id == outcome_event_id(saga_id, 1) != rows[0].event_id
    assert rig.settings.topic(TOPIC_TRANSFER_EVENTS)


async def test_retry_now_sends_the_failed_step_past_the_pivot_again_and_it_completes(
        rig: Rig) -> None:  # noqa: F811
    """Past its pivot a saga cannot compensate: notify refused for good leaves it FAILED. Retry
    now sends notify again (its next attempt, a new command id, through the relay to the
    participant's topic); its success completes the saga, with a second outcome of its own."""
    saga_id = await at_credit(rig)
    for step in ("credit", "settle"):
        await rig.orchestrator.handle_batch([rig.reply(await command(rig, saga_id, "ledger",
                                                                     step))])
    notify = await command(rig, saga_id, "notify", "notify")
    await rig.orchestrator.handle_batch([rig.reply(notify, Outcome.FAILED)])
    assert (await rig.saga(saga_id))[0].status is SagaStatus.FAILED
    relay = OutboxRelay(rig.settings, rig.engine, rig.producer)
    await relay.publish_once(grace_s=0)

    done = await act(rig, saga_id, OperatorAction.RETRY_NOW, reason="mail relay back")
    await relay.publish_once(grace_s=0)

    assert (done.events, done.commands, done.status) == (
        ("OperatorActed", "StepStarted"), 1, "RUNNING")
    again = await command(rig, saga_id, "notify", "notify")
    assert again.attempt == notify.attempt + 1 and again.command_id != notify.command_id
    assert [c.command_id for c in await rig.published(saga_id, "notify", 2)][-1] == (
        again.command_id)
    await rig.orchestrator.handle_batch([rig.reply(again)])
    assert (await rig.assert_consistent(saga_id)).status is SagaStatus.COMPLETED
    rows = await _outcome_rows(rig.engine, rig.settings, saga_id)
    assert [r.outcome for r in rows] == ["failed", "completed"]
    assert rows[1].event_id == outcome_event_id(saga_id, 1) != rows[0].event_id


async def test_the_saga_command_acts_with_the_os_user_and_answers_a_repeat_the_same(
        rig: Rig) -> None:  # noqa: F811
    saga_id = await at_credit(rig)
    assert rig.settings.database_url and rig.settings.kafka_bootstrap
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")} | {
        "SAGA_DATABASE_URL": rig.settings.database_url,
        "SAGA_KAFKA_BOOTSTRAP": rig.settings.kafka_bootstrap,
        "SAGA_TOPIC_PREFIX": rig.settings.topic_prefix, "USER": "carol"}
    action_id = str(uuid.uuid4())

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_saga(args, env, 60)

    first = await asyncio.to_thread(cli, "retry-now", str(saga_id)[:8], "--reason", "stuck",
                                    "--action-id", action_id, "--json")
    again = await asyncio.to_thread(cli, "retry-now", str(saga_id), "--reason", "stuck",
                                    "--action-id", action_id, "--json")
    no_reason = await asyncio.to_thread(cli, "cancel", str(saga_id), "--reason", " ")
    refused = await asyncio.to_thread(cli, "retry-compensation", str(saga_id), "--reason", "x")

    assert first.returncode == 0, first.stderr
    said = json.loads(first.stdout)
    assert (said["actor"], said["action"], said["events"], said["repeated"]) == (
        "carol", "retry_now", ["OperatorActed", "StepResent"], False)
    assert json.loads(again.stdout) == {**said, "repeated": True}
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    assert refused.returncode == 2 and "only a FAILED saga" in refused.stderr
    assert types_count(await rig.events(saga_id), "OperatorActed") == 1


# ---------------------------------------------------------------- the HTTP API


@pytest.fixture(scope="module")
def oidc() -> Iterator[OidcIssuer]:
    with running_issuer() as issuer:
        yield issuer


async def test_the_api_lets_operators_act_as_their_subject_and_refuses_viewers(
        rig: Rig, oidc: OidcIssuer) -> None:  # noqa: F811
    saga_id = await at_credit(rig)
    url = f"/api/v1/sagas/{saga_id}/actions/cancel"
    action_id = str(uuid.uuid4())
    body = {"reason": "customer withdrew", "action_id": action_id}

    async with ConsoleServer(console_settings(rig.settings, oidc), rig.engine,
                             APPLICATION.saga_types, port=0) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=30) as api:
        nobody = await api.post(url, json=body)
        viewer = await api.post(url, json=body, headers=auth(oidc.token("viewer", sub="vera")))
        operator = auth(oidc.token("operator", sub="olivia@example.com"))
        no_reason = await api.post(url, json={"reason": "  "}, headers=operator)
        done = await api.post(f"/api/v1/sagas/{str(saga_id)[:8]}/actions/cancel", json=body,
                              headers=operator)
        again = await api.post(url, json=body, headers=operator)
        refused = await api.post(url, json={"reason": "twice"}, headers=operator)
        admin = await api.post(f"/api/v1/sagas/{saga_id}/actions/retry-now",
                               json={"reason": "release is slow"},
                               headers=auth(oidc.token("admin", sub="ada")))
        unknown = await api.post(f"/api/v1/sagas/{saga_id}/actions/undo", json=body,
                                 headers=operator)
        saga = (await api.get(f"/api/v1/sagas/{saga_id}", headers=operator)).json()

    assert problem_of(nobody, 401)
    assert "vera has the viewer role; this needs operator" in problem_of(viewer, 403)["detail"]
    assert problem_of(no_reason, 422)
    assert done.status_code == 200, done.text
    result = done.json()
    assert (result["actor"], result["action"], result["status"], result["repeated"]) == (
        "olivia@example.com", "cancel", "COMPENSATING", False)
    assert again.json() == {**result, "repeated": True}
    assert "COMPENSATING already" in problem_of(refused, 409)["detail"]
    assert admin.status_code == 200 and admin.json()["events"] == ["OperatorActed",
                                                                    "StepResent"]
    assert problem_of(unknown, 422)
    acted = [(e["actor"], e["detail"]) for e in saga["events"] if e["type"] == "OperatorActed"]
    assert acted == [("olivia@example.com", "cancel by olivia@example.com: customer withdrew"),
                     ("ada", "retry now by ada: release is slow")]
    events = await rig.events(saga_id)
    assert [e.type for e, actor in events if actor == "vera"] == []


async def test_the_saga_page_offers_the_allowed_actions_and_performs_them(
        rig: Rig, oidc: OidcIssuer) -> None:  # noqa: F811
    saga_id = await failed_compensating(rig)
    operator = auth(oidc.token("operator", sub="olivia@example.com")) | {"Accept": "text/html"}
    viewer = auth(oidc.token("viewer", sub="vera")) | {"Accept": "text/html"}
    form = {"reason": "INC-12: ledger back", "action_id": str(uuid.uuid4())}

    async with ConsoleServer(console_settings(rig.settings, oidc), rig.engine,
                             APPLICATION.saga_types, port=0) as server, \
            httpx.AsyncClient(base_url=server.url, timeout=30) as api:
        as_operator = (await api.get(f"/sagas/{saga_id}", headers=operator)).text
        as_viewer = (await api.get(f"/sagas/{saga_id}", headers=viewer)).text
        done = await api.post(f"/sagas/{saga_id}/actions/retry-compensation", json=form,
                              headers=operator)
        twice = await api.post(f"/sagas/{saga_id}/actions/retry-compensation", json=form,
                               headers=operator)
        cancel = await api.post(f"/sagas/{saga_id}/actions/cancel",
                                json={**form, "action_id": str(uuid.uuid4())}, headers=operator)
        after = (await api.get(f"/sagas/{saga_id}", headers=operator)).text

    offered = set(re.findall(r'data-action="([a-z-]+)"', as_operator))
    assert offered == {"retry-compensation", "resolve"}  # a FAILED saga: no retry now, no cancel
    assert 'data-action="' not in as_viewer
    assert done.status_code == 200, done.text
    assert "Done by olivia@example.com" in done.text and "COMPENSATING" in done.text
    assert "Already done" in twice.text
    assert problem_of(cancel, 409)  # the page no longer offers it; the server refuses too
    assert "retry compensation by olivia@example.com: INC-12: ledger back" in html.unescape(after)
    assert set(re.findall(r'data-action="([a-z-]+)"', after)) == {"retry-now"}


async def test_a_redrive_records_its_actor_with_the_dead_letter(rig: Rig) -> None:  # noqa: F811
    dead_letter_id = await insert_letter(rig.engine, Letter(
        payload=f'{{"it-actions": "{uuid.uuid4()}"'.encode(),
        topic=rig.settings.topic("transfers.commands.v1")))

    async with rig.engine.begin() as conn:
        first = await dlq.redrive(conn, [str(dead_letter_id)], actor="olivia@example.com")
    async with rig.engine.begin() as conn:
        again = await dlq.redrive(conn, [str(dead_letter_id)], actor="mallory")
    async with rig.engine.connect() as conn:
        [letter] = await dlq.list_dead_letters(conn, limit=10, include_redriven=True,
                                               reason=None)

    assert first.redriven == (dead_letter_id,) and again.already_redriven == (dead_letter_id,)
    assert letter.redriven_by == "olivia@example.com"  # the first, and only, redrive's actor
    assert letter.to_json()["redriven_by"] == "olivia@example.com"


# ---------------------------------------------------------------- in a real browser


async def test_an_operator_retries_a_failed_compensation_then_resolves_in_the_browser(
        rig: Rig) -> None:  # noqa: F811
    """Headless Chromium (skipped, with the reason, without one), signed in through the dev
    login link as an operator: the saga's buttons, a reason asked for, the result shown, and
    the timeline showing the action with the operator's name."""
    browser_tests = pytest.importorskip("tests.integration.test_console_browser")
    path = browser_tests.chromium_path()
    if path is None:
        pytest.skip("no Chromium on this machine")
    saga_id = await failed_compensating(rig)
    playwright = browser_tests.playwright_api
    async with ConsoleServer(rig.settings, rig.engine, APPLICATION.saga_types, port=0,
                             dev=True) as console, playwright.async_playwright() as driver:
        try:
            chromium = await driver.chromium.launch(executable_path=path, headless=True)
        except playwright.Error as error:
            pytest.skip(f"Chromium at {path} does not start here: {error}")
        try:
            page = await browser_tests.signed_in(chromium, console, Role.OPERATOR)
            page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await page.goto(f"{console.url}/sagas/{saga_id}")

            retry = page.locator("form[data-action=retry-compensation]")
            await retry.locator("textarea[name=reason]").fill("INC-12: ledger back")
            await retry.locator("button").click()
            await retry.locator("output .done").wait_for()
            assert "Done by dev-operator" in await retry.locator("output").inner_text()
            release = await command(rig, saga_id, "ledger", "reserve", Direction.COMPENSATE)
            await rig.orchestrator.handle_batch([rig.reply(release, Outcome.FAILED)])

            await page.reload()
            resolve = page.locator("form[data-action=resolve]")
            await resolve.locator("textarea[name=reason]").fill("INC-12: released by hand")
            await resolve.locator("button").click()
            await resolve.locator("output .done").wait_for()
            await page.reload()
            text_shown = await page.inner_text("body")
            assert "RESOLVED" in text_shown
            assert "retry compensation by dev-operator: INC-12: ledger back" in text_shown
            assert "closed by dev-operator: INC-12: released by hand" in text_shown
            assert await page.locator("form[data-action]").count() == 0
        finally:
            await chromium.close()
    events = await rig.events(saga_id)
    assert [(e.type, actor) for e, actor in events if actor == "dev-operator"] == [
        ("OperatorActed", "dev-operator"), ("StepStarted", "dev-operator"),
        ("SagaResolved", "dev-operator")]
