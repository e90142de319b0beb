"""Saga types on the real stack: two types side by side in one deployment, and a new version of
a definition deployed while sagas of the old one are in flight (they finish on it; a deployment
without it is refused at start). Each test has a database and topics of its own, and runs the
workers of the application it deploys."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text

from orchestrator.application import Application
from orchestrator.core.definition import SagaDefinition, Step
from orchestrator.core.saga_type import IntakeRules, SagaType
from orchestrator.errors import ConfigurationError
from orchestrator.workers.runner import run_worker, workers_ready
from steps import APPLICATION
from steps.registry import notify
from steps.saga import TRANSFER, TRANSFER_TYPE
from tests.integration.conftest import Harness, Isolated
from tests.integration.test_cli import saga_cli

pytestmark = pytest.mark.integration

# Version 2 of the transfer: screening moved upstream, so it starts at `reserve`.
# Version 2 drops the screening: the hold alone, then the rest as in version 1.
TRANSFER_V2 = SagaDefinition(name="transfer", version=2,
                             steps=(TRANSFER.step("reserve"), *TRANSFER.steps[1:]))
V1_AND_V2 = dataclasses.replace(APPLICATION, sagas=(
    dataclasses.replace(TRANSFER_TYPE, definitions=(TRANSFER, TRANSFER_V2)),))
V2_ONLY = dataclasses.replace(APPLICATION, sagas=(
    dataclasses.replace(TRANSFER_TYPE, definitions=(TRANSFER_V2,)),))


class NoticeRequested(BaseModel):
    """A second saga type's start message: a notice to an account holder, keyed by its id."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    notice_id: Annotated[str, Field(min_length=1, max_length=64)]
    destination_account: str
    reference: str = ""


NOTICE_TOPIC = "notices.commands.v1"
NOTICE_TYPE = SagaType(
    name="notice",
    definitions=(SagaDefinition(name="notice", steps=(
        Step("notify", action=notify.SEND, compensation=None, has_effect=False),)),),
    start_model=NoticeRequested, start_topic=NOTICE_TOPIC,
    business_key=lambda request: request.notice_id,
    intake=IntakeRules(key_of_refused=lambda d: d.get("notice_id") if isinstance(d, dict)
                       else None))
TRANSFERS_AND_NOTICES = dataclasses.replace(APPLICATION, sagas=(TRANSFER_TYPE, NOTICE_TYPE))


@contextlib.asynccontextmanager
async def deployed(harness: Harness, application: Application, tag: str,
                   kinds: Sequence[str] | None = None) -> AsyncIterator[None]:
    """`application`'s workers (all of them, or `kinds`) running until the block ends."""
    settings = harness.settings
    stop = asyncio.Event()
    names = {kind: f"{tag}-{kind.replace(':', '-')}-{uuid.uuid4().hex[:6]}"
             for kind in kinds or application.worker_kinds}
    tasks = [asyncio.create_task(run_worker(
        kind, settings.model_copy(update={"worker_name": name}), stop, application=application))
        for kind, name in names.items()]
    try:
        deadline = time.monotonic() + 60
        while not await workers_ready(harness.engine, set(names.values())):
            for task in tasks:
                if task.done():
                    task.result()  # raises the worker's startup error
            assert time.monotonic() < deadline, "workers did not get their partitions in 60 s"
            await asyncio.sleep(0.1)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)


@pytest.fixture
def own_topics(isolated: Isolated) -> Harness:
    """A harness on the isolated database, with topics of its own (no session worker reads
    them)."""
    settings = isolated.harness.settings.model_copy(
        update={"topic_prefix": f"st-{uuid.uuid4().hex[:8]}."})
    return Harness(settings, isolated.engine)


async def sagas_of(harness: Harness, saga_type: str, key: str) -> Any:
    async with harness.engine.connect() as conn:
        return (await conn.execute(text(
            "SELECT saga_id, status, definition_version, version FROM sagas"
            " WHERE saga_type = :type AND business_key = :key"),
            {"type": saga_type, "key": key})).one_or_none()


async def wait_for(harness: Harness, saga_type: str, key: str, statuses: Sequence[str],
                   timeout_s: float = 60, step: str | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    row = None
    while time.monotonic() < deadline:
        row = await sagas_of(harness, saga_type, key)
        if row is not None and row.status in statuses:
            if step is None:
                return row
            async with harness.engine.connect() as conn:
                current = (await conn.execute(text(
                    "SELECT current_step FROM sagas WHERE saga_id = :s"),
                    {"s": row.saga_id})).scalar_one()
            if current == step:
                return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"{saga_type} {key} not {statuses} after {timeout_s}s: {row}")


async def intake_verdicts(harness: Harness, saga_id: Any) -> list[str]:
    """What became of each start record consumed for a saga, in the order they came."""
    async with harness.engine.connect() as conn:
        return list((await conn.execute(text(
            "SELECT verdict FROM inbox WHERE message_id LIKE 'sha256:%' AND saga_id = :s"
            " ORDER BY received_at"), {"s": saga_id})).scalars())


async def started_steps(harness: Harness, saga_id: Any) -> list[str]:
    return [e.step for e in await harness.events(saga_id) if e.type == "StepStarted"]


@pytest.mark.timeout(240)
async def test_sagas_started_on_v1_finish_on_v1_after_a_restart_with_v2(
        own_topics: Harness) -> None:
    harness = own_topics
    source = await harness.open("src", "100.00")
    destination = await harness.open("dst", "0.00")
    old_requests = [harness.request(source, destination, "1.00") for _ in range(3)]

    # Version 1 alone, with no risk participant: the sagas start and wait on their screen.
    v1_kinds = [k for k in APPLICATION.worker_kinds if k != "participant:risk"]
    async with deployed(harness, APPLICATION, "v1", v1_kinds):
        for request in old_requests:
            harness.publish(request)
        for request in old_requests:
            row = await wait_for(harness, "transfer", request["transfer_id"], ["RUNNING"],
                                 step="screen")
            assert row.definition_version == 1

    # A deployment without version 1 is refused while sagas run on it, by the workers that
    # decide; the sagas are left as they were.
    for kind in ("orchestrator", "recovery"):
        with pytest.raises(ConfigurationError, match=r"transfer v1 \(3 in flight\)"):
            await run_worker(kind, harness.settings.model_copy(
                update={"worker_name": f"v2-only-{kind}"}), asyncio.Event(),
                application=V2_ONLY)

    # Versions 1 and 2: the old sagas finish on version 1, new ones start on version 2.
    new_requests = [harness.request(source, destination, "2.00") for _ in range(2)]
    async with deployed(harness, V1_AND_V2, "v1v2"):
        for request in new_requests:
            harness.publish(request)
        # An old request delivered again (other bytes) is still a duplicate of its v1 saga.
        again = json.dumps(old_requests[0], indent=1).encode()
        harness.publish(again, key=old_requests[0]["transfer_id"])
        old = [await wait_for(harness, "transfer", r["transfer_id"], ["COMPLETED"])
               for r in old_requests]
        new = [await wait_for(harness, "transfer", r["transfer_id"], ["COMPLETED"])
               for r in new_requests]
        for saga in old:
            assert saga.definition_version == 1
            assert await started_steps(harness, saga.saga_id) == [
                "screen", "reserve", "credit", "settle", "notify"]
        for saga in new:
            assert saga.definition_version == 2
            assert await started_steps(harness, saga.saga_id) == [
                "reserve", "credit", "settle", "notify"]
        deadline = time.monotonic() + 30
        while (verdicts := await intake_verdicts(harness, old[0].saga_id)) != [
                "started", "duplicate"]:
            assert time.monotonic() < deadline, verdicts
            await asyncio.sleep(0.05)
        assert await harness.balances(source, destination) == {
            source: (Decimal("93.00"), Decimal("0")), destination: (Decimal("7.00"), Decimal("0"))}
        await harness.assert_invariants()
    harness.close()


@pytest.mark.timeout(240)
async def test_two_saga_types_run_side_by_side(own_topics: Harness) -> None:
    harness = own_topics
    source = await harness.open("src", "50.00")
    destination = await harness.open("dst", "0.00")
    transfer = harness.request(source, destination, "5.00")
    key = transfer["transfer_id"]  # the same key in both types: two sagas, one of each
    notice = NoticeRequested(notice_id=key, destination_account=destination,
                             reference="your statement is ready")
    refused = b'{"notice_id": "n-' + uuid.uuid4().hex.encode() + b'"}'  # no destination
    refused_key = json.loads(refused)["notice_id"]

    async with deployed(harness, TRANSFERS_AND_NOTICES, "types"):
        notices = harness.settings.topic(NOTICE_TOPIC)
        harness.publish(transfer)
        for value in (notice.model_dump_json().encode(), refused):
            harness.producer.produce(notices, value=value, key=key.encode())
        assert harness.producer.flush(10) == 0

        as_transfer = await wait_for(harness, "transfer", key, ["COMPLETED"])
        as_notice = await wait_for(harness, "notice", key, ["COMPLETED"])
        rejected = await wait_for(harness, "notice", refused_key, ["REJECTED"])
        letter = await harness.wait_dead_letter(refused)
        await harness.assert_invariants()

    assert as_transfer.saga_id != as_notice.saga_id
    assert await started_steps(harness, as_notice.saga_id) == ["notify"]
    assert (as_notice.definition_version, rejected.definition_version) == (1, None)
    assert (letter.saga_type, letter.business_key, letter.reason_code) == (
        "notice", refused_key, "SCHEMA_VIOLATION")
    async with harness.engine.connect() as conn:
        recipients = (await conn.execute(text(
            "SELECT saga_id, recipient FROM notifications WHERE saga_id = ANY(:s)"),
            {"s": [as_transfer.saga_id, as_notice.saga_id]})).all()
    assert sorted(r.recipient for r in recipients) == [destination, destination]
    assert await harness.balances(source, destination) == {
        source: (Decimal("45.00"), Decimal("0")), destination: (Decimal("5.00"), Decimal("0"))}

    # On-call: the key names two sagas; the type tells them apart.
    ambiguous = await saga_cli(harness, "timeline", key)
    assert ambiguous.returncode == 2 and "pass --type" in ambiguous.stderr
    shown = await saga_cli(harness, "timeline", key, "--type", "notice", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert (data["saga_type"], data["saga_id"], data["status"]) == (
        "notice", str(as_notice.saga_id), "COMPLETED")
    # A type the CLI's application does not describe is shown field by field.
    assert data["events"][0]["detail"] == (
        f"definition v1: destination_account={destination} notice_id={key}"
        " reference='your statement is ready'")
    listed = await saga_cli(harness, "list", "--type", "notice", "--json")
    assert sorted(r["business_key"] for r in json.loads(listed.stdout)) == sorted(
        [key, refused_key])
    harness.close()
