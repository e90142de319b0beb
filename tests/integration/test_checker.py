"""The checker trips on a broken database: a consumed request that led to no saga and no dead
letter is found, by the checker and by `saga check` (rows written as the orchestrator writes
them, `store.write_batch`, into a database of its own where no worker runs). And `saga check
--against-topic` finds requests on the real commands topic that nobody read."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text

from orchestrator.consuming.handling import REDRIVE_HEADER, message_id_of
from orchestrator.core.saga import decide_start, evolve
from orchestrator.kafka.consumer import Consumed, encode_headers, ensure_topics
from orchestrator.ops.checker import check
from orchestrator.postgres import store
from orchestrator.settings import Settings
from orchestrator.workers.runner import run_worker
from orchestrator.workers.saga_worker import CONSUMER
from schemas import TOPIC_TRANSFER_COMMANDS, TransferRequested
from steps import APPLICATION
from steps.saga import TRANSFER, TRANSFER_TYPE
from tests.cli_process import run_saga
from tests.integration.conftest import Harness, Isolated
from tests.integration.test_cli import saga_cli

COMMANDS = f"ck-{uuid.uuid4().hex[:6]}.{TOPIC_TRANSFER_COMMANDS}"
NEW_CHECK = "every consumed request led to a saga or a dead letter"
VERDICT_CHECK = ("every consumed message's verdict is backed by what it recorded (its events,"
                 " its saga, or its dead letter)")
PAIRED_CHECK = "every event log has its projection row and every projection row its events"


def record(value: bytes, offset: int, headers: tuple[tuple[str, bytes], ...] = ()) -> Consumed:
    return Consumed(topic=COMMANDS, partition=0, offset=offset, key=None, value=value,
                    headers=headers, timestamp_ms=None)


async def consume_start(isolated: Isolated, offset: int) -> tuple[Consumed, uuid.UUID]:
    """A valid request consumed: its inbox row and its saga, in one batch."""
    now = datetime.now(UTC)
    request = TransferRequested(transfer_id=uuid.uuid4(), source_account="a",
                                destination_account="b", amount="1.00", currency="EUR",
                                requested_by="it")
    message = record(request.model_dump_json().encode(), offset)
    decision = decide_start(TRANSFER, None, TRANSFER_TYPE.start(request), now)
    state = None
    events = []
    for event in decision.events:
        state = evolve(state, event)
        # As the orchestrator records them: each event names the message that caused it.
        events.append(store.NewEvent(state.saga_id, state.version, event, "it",
                                     message_id_of(message)))
    assert state is not None
    inbox = store.InboxRow(message_id_of(message), COMMANDS, 0, offset, "started",
                           state.saga_id)
    async with isolated.engine.begin() as conn:
        await store.write_batch(conn, CONSUMER, [inbox], events, [state], [], [], now)
    return message, state.saga_id


async def consume_refused(isolated: Isolated, message: Consumed, dead_letter: bool) -> None:
    """An unparseable request consumed: its inbox row and (unless told not to) its dead letter."""
    now = datetime.now(UTC)
    inbox = store.InboxRow(message_id_of(message), COMMANDS, 0, message.offset, "rejected", None)
    letters = [store.DeadLetterRow(
        dead_letter_id=uuid.uuid4(), stage="intake", reason_code="SCHEMA_VIOLATION",
        reason="not JSON", error_class="intake.SCHEMA_VIOLATION", original_topic=COMMANDS,
        original_partition=0, original_offset=message.offset, original_key=None,
        payload=message.value, headers=encode_headers(message.headers), failed_at=now,
        saga_id=None, saga_type="transfer")] if dead_letter else []
    async with isolated.engine.begin() as conn:
        await store.write_batch(conn, CONSUMER, [inbox], [], [], [], letters, now)


def failing(report_json: dict[str, object]) -> list[dict[str, object]]:
    checks = report_json["checks"]
    assert isinstance(checks, list)
    return [c for c in checks if not c["ok"]]


async def test_a_consumed_request_without_saga_or_dead_letter_is_a_violation(
        isolated: Isolated) -> None:
    started, saga_id = await consume_start(isolated, offset=0)
    await consume_refused(isolated, record(b'{"amount": ', 1), dead_letter=True)
    # A redriven copy is a message of its own (its id includes the redrive id): its dead
    # letter must be found under that id, not under the original's.
    redrive = ((REDRIVE_HEADER, str(uuid.uuid4()).encode()), ("other", b"\x00\xff"))
    await consume_refused(isolated, record(b'{"amount": ', 2, redrive), dead_letter=True)

    healthy = await check(isolated.engine, APPLICATION)
    assert healthy.ok, healthy.failures()
    assert healthy.counts["requests_consumed"] == 3
    assert healthy.counts["requests_without_outcome"] == 0

    # Break it: the saga of a consumed request vanishes (the projection has no trigger), and
    # a refused request is recorded as consumed without its dead letter.
    async with isolated.engine.begin() as conn:
        await conn.execute(text("DELETE FROM sagas WHERE saga_id = :s"), {"s": saga_id})
    lonely = record(b"not json at all", 3)
    await consume_refused(isolated, lonely, dead_letter=False)

    broken = await check(isolated.engine, APPLICATION)
    # Also found apart: the saga's events lost their projection row (I4), and the lonely
    # request's verdict, "rejected", has no dead letter behind it (I5).
    assert [(c.invariant, c.name) for c in broken.failures()] == [
        ("I4", PAIRED_CHECK), ("I5", VERDICT_CHECK), ("I5", NEW_CHECK)]
    assert broken.counts["requests_without_outcome"] == 2
    [unpaired, unbacked, violation] = broken.failures()
    assert str(saga_id) in unpaired.detail
    assert message_id_of(lonely) in unbacked.detail
    assert message_id_of(started) not in unbacked.detail  # its events are there
    assert message_id_of(started) in violation.detail
    assert message_id_of(lonely) in violation.detail
    assert message_id_of(record(b'{"amount": ', 1)) not in violation.detail

    result = await saga_cli(isolated.harness, "check", "--json")
    assert result.returncode == 1, (result.stdout, result.stderr)
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [c["name"] for c in failing(report)] == [PAIRED_CHECK, VERDICT_CHECK, NEW_CHECK]
    text_result = await saga_cli(isolated.harness, "check")
    assert text_result.returncode == 1
    assert f"VIOLATED  I5  {NEW_CHECK}" in text_result.stdout


def _cli_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    assert settings.database_url and settings.kafka_bootstrap
    env.update({"SAGA_DATABASE_URL": settings.database_url,
                "SAGA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                "SAGA_TOPIC_PREFIX": settings.topic_prefix})
    return env


async def check_against_topic(settings: Settings, *args: str) -> tuple[int, Any]:
    result = await asyncio.to_thread(
        run_saga, ["check", "--against-topic", "--json", *args], _cli_env(settings), 90)
    assert result.returncode in (0, 1), (result.returncode, result.stdout, result.stderr)
    return result.returncode, json.loads(result.stdout)


@pytest.mark.timeout(180)
async def test_against_topic_reports_requests_nobody_read_until_the_orchestrator_runs(
        isolated: Isolated) -> None:
    # Topics of their own and a database of its own: no worker reads them yet.
    settings = isolated.harness.settings.model_copy(
        update={"topic_prefix": f"ck-{uuid.uuid4().hex[:8]}."})
    await asyncio.to_thread(ensure_topics, settings)
    upstream = Harness(settings, isolated.engine)
    source = await upstream.open("src", "100.00")
    destination = await upstream.open("dst", "0.00")
    requests = [upstream.request(source, destination, "1.00") for _ in range(3)]
    for request in requests:
        upstream.publish(request)
    upstream.publish(b'{"transfer_id": "not even json')
    upstream.publish(requests[0])  # the same bytes again: the same message

    # Fresh records are not judged within the grace: the orchestrator may just be behind.
    code, report = await check_against_topic(settings)
    assert code == 0, report
    [topic] = report["topics"]  # the one saga type's start topic
    assert (topic["records"], topic["too_recent"], topic["missing"]) == (5, 5, 0)

    code, report = await check_against_topic(settings, "--grace", "0")
    assert code == 1
    [topic] = report["topics"]
    assert (topic["topic"], topic["saga_type"]) == (
        settings.topic(TOPIC_TRANSFER_COMMANDS), "transfer")
    assert (topic["records"], topic["missing"], topic["too_recent"]) == (5, 5, 0)
    sample = topic["missing_sample"]
    assert sorted(m["business_key"] or "" for m in sample) == sorted(
        ["", *(r["transfer_id"] for r in requests), requests[0]["transfer_id"]])
    assert len({(m["partition"], m["offset"]) for m in sample}) == 5
    assert not any(m["consumed"] for m in sample)
    [i8] = [c for c in report["checks"] if c["invariant"] == "I8"]
    assert i8["ok"] is False and "never read" in i8["detail"]
    as_text = await asyncio.to_thread(
        run_saga, ["check", "--against-topic", "--grace", "0"], _cli_env(settings), 90)
    assert as_text.returncode == 1, as_text.stderr
    assert f"VIOLATED  I8  every request on {topic['topic']} led to" in as_text.stdout
    assert "5 with neither a saga nor a dead letter" in as_text.stdout
    assert as_text.stdout.count("never read") >= 5
    assert "(undecodable)" in as_text.stdout

    # Now the workers run: every request is read and leads to a saga or a dead letter.
    stop = asyncio.Event()
    names = {kind: f"ck-{kind}-{uuid.uuid4().hex[:6]}" for kind in APPLICATION.worker_kinds}
    tasks = [asyncio.create_task(run_worker(kind, settings.model_copy(
        update={"worker_name": names[kind]}), stop)) for kind in APPLICATION.worker_kinds]
    try:
        for request in requests:
            assert (await upstream.wait_terminal(request["transfer_id"], 60)).status == (
                "COMPLETED")
        await upstream.wait_dead_letter(b'{"transfer_id": "not even json')
        async with isolated.engine.connect() as conn:
            for _ in range(200):
                if not (await conn.execute(text(
                        "SELECT count(*) FROM outbox WHERE published_at IS NULL"))).scalar_one():
                    break
                await conn.rollback()
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        upstream.close()

    code, report = await check_against_topic(settings, "--grace", "0")
    assert code == 0, report
    [topic] = report["topics"]
    assert (topic["records"], topic["missing"]) == (5, 0)
    assert topic["missing_sample"] == []
    assert report["counts"]["requests_consumed"] == 4  # the exact re-send is one message
