"""`saga` as on-call engineers run it: a real process against the session's database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestrator.core.saga import decide_start, evolve
from orchestrator.postgres import store
from schemas import TransferRequested
from steps.saga import TRANSFER, TRANSFER_TYPE
from tests.integration.conftest import Harness, Isolated

pytestmark = pytest.mark.integration


def _env(harness: Harness | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    if harness is not None:
        assert harness.settings.database_url and harness.settings.kafka_bootstrap
        env["SAGA_DATABASE_URL"] = harness.settings.database_url
        env["SAGA_KAFKA_BOOTSTRAP"] = harness.settings.kafka_bootstrap
    return env


async def saga_cli(harness: Harness | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a thread, so the session's in-process workers keep running meanwhile."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "orchestrator.cli", *args], env=_env(harness),
        capture_output=True, text=True, timeout=60, check=False)


def _ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.fixture
async def completed(harness: Harness) -> Any:
    source = await harness.open("src", "100.00")
    destination = await harness.open("dst", "0.00")
    request = harness.request(source, destination, "12.34")
    harness.publish(request)
    saga = await harness.wait_terminal(request["transfer_id"])
    assert saga.status == "COMPLETED"
    return saga, request["transfer_id"]


async def test_timeline_by_business_key_as_json(harness: Harness, completed: Any) -> None:
    saga, transfer_id = completed

    data = _ok(await saga_cli(harness, "timeline", transfer_id, "--json"))

    assert (data["saga_id"], data["business_key"]) == (str(saga.saga_id), transfer_id)
    assert (data["status"], data["saga_type"], data["definition_version"], data["version"]) == (
        "COMPLETED", "transfer", 1, saga.version)
    assert data["runs"] == []  # waits on nothing any more
    events = data["events"]
    assert [e["seq"] for e in events] == list(range(1, saga.version + 1))
    assert [e["type"] for e in events] == [e.type for e in await harness.events(saga.saga_id)]
    assert events[0]["type"] == "SagaStarted" and events[-1]["type"] == "SagaCompleted"
    # the transfer type describes its start message itself
    assert events[0]["detail"].startswith("definition v1: 12.34 EUR ")
    started = [e for e in events if e["type"] == "StepStarted"]
    assert [e["step"] for e in started] == ["screen", "reserve", "credit", "settle", "notify"]
    assert all(e["attempt"] == 1 for e in started)
    assert all(e["detail"].startswith("forward ") for e in started)
    succeeded = [e for e in events if e["type"] == "StepSucceeded"]
    # screen and reserve run in parallel: their replies come in either order
    assert sorted(e["step"] for e in succeeded[:2]) == ["reserve", "screen"]
    assert [e["step"] for e in succeeded[2:]] == ["credit", "settle", "notify"]
    # A step outcome's duration is measured from its command; it is never negative.
    assert all(e["duration_ms"] is not None and e["duration_ms"] >= 0 for e in succeeded)
    assert any(e["detail"] == "held=12.34" for e in succeeded)
    assert all({"recorded_at", "actor", "payload"} <= set(e) for e in events)


async def test_timeline_by_saga_id_as_text(harness: Harness, completed: Any) -> None:
    saga, transfer_id = completed

    result = await saga_cli(harness, "timeline", str(saga.saga_id))

    assert result.returncode == 0, result.stderr
    first, *rest = result.stdout.splitlines()
    assert first == f"saga {saga.saga_id}  transfer {transfer_id}  COMPLETED  definition v1"
    assert "SagaCompleted" in result.stdout
    assert sum("StepStarted" in line for line in rest) == 5


@pytest.mark.parametrize("wanted", ["unknown_uuid", "not-a-uuid"])
async def test_timeline_of_nothing_exits_3(harness: Harness, wanted: str) -> None:
    any_id = str(uuid.uuid4()) if wanted == "unknown_uuid" else wanted

    result = await saga_cli(harness, "timeline", any_id)

    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert any_id in result.stderr
    assert result.stderr.startswith("saga: ")
    assert "Traceback" not in result.stderr


async def test_list_completed_contains_the_saga(harness: Harness, completed: Any) -> None:
    saga, transfer_id = completed

    rows = _ok(await saga_cli(harness, "list", "--status", "COMPLETED", "--json",
                              "--limit", "500"))

    assert {r["status"] for r in rows} == {"COMPLETED"}
    [row] = [r for r in rows if r["saga_id"] == str(saga.saga_id)]
    assert (row["saga_type"], row["business_key"], row["definition_version"],
            row["version"]) == ("transfer", transfer_id, 1, saga.version)
    assert (row["input"]["amount"], row["input"]["currency"]) == ("12.34", "EUR")
    assert [r["updated_at"] for r in rows] == sorted((r["updated_at"] for r in rows),
                                                     reverse=True)


async def test_list_respects_its_limit(harness: Harness, completed: Any) -> None:
    rows = _ok(await saga_cli(harness, "list", "--json", "--limit", "1"))

    assert len(rows) == 1


async def test_list_filters_by_type_business_key_and_definition_version(
        harness: Harness, completed: Any) -> None:
    saga, transfer_id = completed

    [row] = _ok(await saga_cli(harness, "list", "--json", "--type", "transfer", "--key",
                               transfer_id, "--definition-version", "1"))
    assert row["saga_id"] == str(saga.saga_id)
    assert _ok(await saga_cli(harness, "list", "--json", "--type", "payout", "--key",
                              transfer_id)) == []
    assert _ok(await saga_cli(harness, "list", "--json", "--key", transfer_id,
                              "--definition-version", "2")) == []
    as_text = await saga_cli(harness, "list", "--key", transfer_id)
    assert as_text.returncode == 0, as_text.stderr
    header, line = as_text.stdout.splitlines()
    assert header.split()[:4] == ["saga", "id", "type", "business"]
    assert line.split()[:5] == [str(saga.saga_id), "transfer", transfer_id, "v1", "COMPLETED"]


async def test_timeline_takes_the_type_of_a_business_key(harness: Harness,
                                                         completed: Any) -> None:
    saga, transfer_id = completed

    data = _ok(await saga_cli(harness, "timeline", transfer_id, "--type", "transfer",
                              "--json"))
    assert data["saga_id"] == str(saga.saga_id)
    other = await saga_cli(harness, "timeline", transfer_id, "--type", "payout")
    assert other.returncode == 3 and "of type payout" in other.stderr


async def test_check_passes_on_a_healthy_store(harness: Harness, completed: Any) -> None:
    report = _ok(await saga_cli(harness, "check", "--json"))

    assert (report["ok"], report["money_conserved"], report["duplicate_effects"]) == (
        True, True, 0)
    assert report["counts"]["sagas_completed"] >= 1
    assert {c["invariant"] for c in report["checks"]} >= {"I1", "I2", "I4", "I5", "I6", "I7"}
    assert all(c["ok"] for c in report["checks"])


async def test_migrate_again_applies_nothing(harness: Harness) -> None:
    assert _ok(await saga_cli(harness, "migrate", "--json")) == {"applied": []}


async def test_without_a_database_url_list_is_a_usage_error() -> None:
    result = await saga_cli(None, "list")

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "SAGA_DATABASE_URL is not set" in result.stderr
    assert "Traceback" not in result.stderr


async def _start_saga_at(isolated: Isolated, at: datetime) -> uuid.UUID:
    """Record a saga's start as the orchestrator would have at `at` (so its first step's
    deadline is `at` + the step's timeout), in the isolated database, where no worker runs."""
    request = TransferRequested(transfer_id=uuid.uuid4(), source_account="a",
                                destination_account="b", amount="1.00", currency="EUR",
                                requested_by="it")
    decision = decide_start(TRANSFER, None, TRANSFER_TYPE.start(request), at)
    state = None
    events = []
    for event in decision.events:
        state = evolve(state, event)
        events.append(store.NewEvent(state.saga_id, state.version, event, "it", None))
    assert state is not None
    async with isolated.engine.begin() as conn:
        await store.write_batch(conn, "it", [], events, [state], [], [], at)
    return state.saga_id


async def test_stuck_lists_sagas_past_their_due_time_and_exits_1(isolated: Isolated) -> None:
    assert _ok(await saga_cli(isolated.harness, "stuck", "--json")) == {
        "sagas": [], "outbox_set_aside": []}
    # screen and reserve start together; the saga is due at the earlier deadline (equal here)
    timeout_s = min(TRANSFER.step("screen").timeout_s, TRANSFER.step("reserve").timeout_s)
    overdue = await _start_saga_at(isolated, datetime.now(UTC) - timedelta(seconds=timeout_s + 90))
    await _start_saga_at(isolated, datetime.now(UTC))  # due in timeout_s: not stuck

    result = await saga_cli(isolated.harness, "stuck", "--json", "--grace", "30")

    assert result.returncode == 1, (result.stdout, result.stderr)
    [row] = json.loads(result.stdout)["sagas"]
    assert (row["saga_id"], row["status"], row["current_step"], row["direction"]) == (
        str(overdue), "RUNNING", "screen", "forward")
    # the saga waits on both steps of its parallel group, each with its own deadline
    assert [(r["step"], r["direction"], r["attempt"]) for r in row["runs"]] == [
        ("screen", "forward", 1), ("reserve", "forward", 1)]
    assert row["runs"][0]["deadline_at"] == row["due_at"]
    assert 89 <= row["overdue_s"] < 200
    text_result = await saga_cli(isolated.harness, "stuck", "--grace", "30")
    assert str(overdue) in text_result.stdout and "saga worker recovery" in text_result.stdout
    assert "screen+reserve" in text_result.stdout
    # With a grace longer than it is overdue, nothing counts as stuck.
    assert _ok(await saga_cli(isolated.harness, "stuck", "--json", "--grace", "3600"))[
        "sagas"] == []
