"""`saga` as on-call engineers run it: a real process against the session's database."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from orchestrator.core.saga import decide_start, evolve
from orchestrator.postgres import store
from schemas import TransferRequested
from steps.saga import TRANSFER, TRANSFER_TYPE
from tests.cli_process import run_saga
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
    """Run the CLI in a process of its own (forked from one that imported it: see
    tests/cli_process.py), waited for in a thread, so the session's in-process workers keep
    running meanwhile."""
    return await asyncio.to_thread(run_saga, args, _env(harness), 60)


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
    assert any(e["detail"] == "held=12.34 [by it-participant:ledger]" for e in succeeded)
    assert all({"recorded_at", "actor", "payload"} <= set(e) for e in events)


async def test_timeline_by_saga_id_as_text(harness: Harness, completed: Any) -> None:
    saga, transfer_id = completed

    result = await saga_cli(harness, "timeline", str(saga.saga_id))

    assert result.returncode == 0, result.stderr
    first, *rest = result.stdout.splitlines()
    async with harness.engine.connect() as conn:
        [trace_id] = (await conn.execute(text(
            "SELECT DISTINCT trace_id FROM saga_events WHERE saga_id = :s"),
            {"s": saga.saga_id})).scalars()
    # The saga's trace ends the first line (ADR 0015).
    assert first == (f"saga {saga.saga_id}  transfer {transfer_id}  COMPLETED  definition v1"
                     f"  trace {trace_id}")
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


async def _start_saga_at(isolated: Isolated, at: datetime,
                         saga_id: uuid.UUID | None = None) -> uuid.UUID:
    """Record a saga's start as the orchestrator would have at `at` (so its first step's
    deadline is `at` + the step's timeout), in the isolated database, where no worker runs;
    under `saga_id` instead of the one its business key derives, if given."""
    request = TransferRequested(transfer_id=uuid.uuid4(), source_account="a",
                                destination_account="b", amount="1.00", currency="EUR",
                                requested_by="it")
    decision = decide_start(TRANSFER, None, TRANSFER_TYPE.start(request), at)
    state = None
    events = []
    for event in decision.events:
        state = evolve(state, event)
        if saga_id is not None:
            state = replace(state, saga_id=saga_id)
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


# ---------------------------------------------------------------- what a new user ran into

TIME_COLUMN = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} ")


def _refused_usage(result: subprocess.CompletedProcess[str], *wanted: str) -> None:
    """Exit 2 with argparse's or the CLI's message naming the problem, and no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    for expected in wanted:
        assert expected in result.stderr, result.stderr


async def test_timeline_takes_the_short_saga_id_the_tables_print(harness: Harness,
                                                               completed: Any) -> None:
    saga, _ = completed

    short = _ok(await saga_cli(harness, "timeline", str(saga.saga_id)[:8], "--json"))
    longer = _ok(await saga_cli(harness, "timeline", str(saga.saga_id)[:13].upper(), "--json"))
    too_short = await saga_cli(harness, "timeline", str(saga.saga_id)[:7])

    assert short["saga_id"] == longer["saga_id"] == str(saga.saga_id)
    assert too_short.returncode == 3
    assert "a saga id prefix needs at least 8 hex digits" in too_short.stderr


async def test_timeline_lines_carry_the_date_and_who_applied_each_step(
        harness: Harness, completed: Any) -> None:
    saga, transfer_id = completed

    data = _ok(await saga_cli(harness, "timeline", transfer_id, "--json"))
    as_text = await saga_cli(harness, "timeline", transfer_id)

    outcomes = {e["step"]: e["payload"]["applied_by"] for e in data["events"]
                if e["type"] == "StepSucceeded"}
    assert outcomes == {"screen": "it-participant:risk", "reserve": "it-participant:ledger",
                        "credit": "it-participant:ledger", "settle": "it-participant:ledger",
                        "notify": "it-participant:notify"}
    assert as_text.returncode == 0, as_text.stderr
    _, columns, *lines = as_text.stdout.splitlines()
    assert columns.startswith("time (UTC)")
    assert len(lines) == saga.version
    assert all(TIME_COLUMN.match(line) for line in lines), lines
    [credited] = [line for line in lines if "StepSucceeded" in line and " credit " in line]
    assert credited.endswith("[by it-participant:ledger]")
    assert data["dead_letters"] == []


async def test_a_conflicting_resend_shows_on_the_original_sagas_timeline(
        harness: Harness, completed: Any) -> None:
    saga, transfer_id = completed
    original = (await harness.events(saga.saga_id))[0].payload["input"]
    conflicting = harness.publish({**original, "amount": "99.99"})
    letter = await harness.wait_dead_letter(conflicting)
    short = str(letter.dead_letter_id)[:8]

    data = _ok(await saga_cli(harness, "timeline", transfer_id, "--json"))
    as_text = await saga_cli(harness, "timeline", transfer_id)
    # the dead letter's short id, as `saga dlq list` prints it, leads to the saga too
    by_letter = _ok(await saga_cli(harness, "timeline", short, "--json"))

    assert data["status"] == "COMPLETED" and len(data["events"]) == saga.version  # unchanged
    [noted] = data["dead_letters"]
    assert (noted["dead_letter_id"], noted["reason_code"], noted["stage"], noted["show"]) == (
        str(letter.dead_letter_id), "CONFLICTING_DUPLICATE", "intake", f"saga dlq show {short}")
    last = as_text.stdout.splitlines()[-1]
    assert TIME_COLUMN.match(last)
    assert "DeadLetter" in last and "CONFLICTING_DUPLICATE: " in last
    assert last.endswith(f"see `saga dlq show {short}`")
    assert by_letter["saga_id"] == str(saga.saga_id)


async def test_a_rejected_sagas_timeline_leads_to_its_dead_letter(harness: Harness) -> None:
    source = await harness.open("rej-src", "10.00")
    destination = await harness.open("rej-dst", "0.00")
    request = harness.request(source, destination, "1.00", currency="XTS")
    raw = harness.publish(request)
    saga = await harness.wait_terminal(request["transfer_id"])
    letter = await harness.wait_dead_letter(raw)

    as_text = await saga_cli(harness, "timeline", request["transfer_id"])

    assert saga.status == "REJECTED"
    assert as_text.returncode == 0, as_text.stderr
    rejected, noted = as_text.stdout.splitlines()[2:]
    assert "SagaRejected" in rejected and "UNKNOWN_CURRENCY" in rejected
    assert "DeadLetter" in noted and "UNKNOWN_CURRENCY" in noted
    assert noted.endswith(f"see `saga dlq show {str(letter.dead_letter_id)[:8]}`")
    shown = _ok(await saga_cli(harness, "dlq", "show", str(letter.dead_letter_id)[:8], "--json"))
    assert shown["saga_id"] == str(saga.saga_id)


async def test_list_finds_sagas_by_account_time_and_business_key(harness: Harness,
                                                                completed: Any) -> None:
    saga, transfer_id = completed
    source = harness.account("src")
    destination = harness.account("dst")
    created = datetime.fromisoformat(_ok(await saga_cli(
        harness, "list", "--key", transfer_id, "--json"))[0]["created_at"])

    by_source = _ok(await saga_cli(harness, "list", "--account", source, "--json"))
    by_destination = _ok(await saga_cli(harness, "list", "--account", destination,
                                        "--status", "completed", "--type", "transfer",
                                        "--json"))
    in_range = _ok(await saga_cli(
        harness, "list", "--account", source, "--since",
        (created - timedelta(seconds=1)).isoformat(), "--until",
        (created + timedelta(seconds=1)).isoformat(), "--json"))
    recent = _ok(await saga_cli(harness, "list", "--account", source, "--since", "10m",
                                "--json"))
    later = _ok(await saga_cli(harness, "list", "--account", source, "--since",
                               (created + timedelta(seconds=1)).isoformat(), "--json"))
    by_key = _ok(await saga_cli(harness, "list", "--business-key", transfer_id, "--json"))
    nobody = _ok(await saga_cli(harness, "list", "--account", harness.account("nobody"),
                                "--json"))

    assert [r["saga_id"] for r in by_source] == [str(saga.saga_id)]
    assert by_source == by_destination == in_range == recent == by_key
    assert later == nobody == []
    as_text = await saga_cli(harness, "list", "--account", source)
    assert as_text.returncode == 0, as_text.stderr
    header, line = as_text.stdout.splitlines()
    assert "business key" in header and "started (UTC)" in header
    assert transfer_id in line and created.strftime("%Y-%m-%d %H:%M:%S") in line


async def test_list_pages_with_limit_and_offset(harness: Harness, completed: Any) -> None:
    first_two = _ok(await saga_cli(harness, "list", "--limit", "2", "--json"))
    second = _ok(await saga_cli(harness, "list", "--limit", "1", "--offset", "1", "--json"))
    as_text = await saga_cli(harness, "list", "--limit", "1")

    assert len(first_two) == 2
    assert second == first_two[1:]
    assert as_text.stdout.splitlines()[-1] == (
        "(a full page of 1: the next starts at --offset 1)")


@pytest.mark.parametrize(("args", "wanted"), [
    (("list", "--limit", "-1"), "argument --limit: must be from 1 to 1000, not -1"),
    (("list", "--limit", "1001"), "argument --limit: must be from 1 to 1000, not 1001"),
    (("list", "--limit", "ten"), "argument --limit: 'ten' is not a whole number"),
    (("list", "--offset", "-5"), "argument --offset: must be at least 0, not -5"),
    (("list", "--status", "nope"), "argument --status: invalid choice: 'NOPE'"),
    (("list", "--since", "yesterday"), "argument --since: 'yesterday' is not a time"),
    (("list", "--since", "2h", "--until", "3h"), "saga: since ("),
    (("stuck", "--limit", "-1"), "argument --limit: must be at least 1, not -1"),
    (("stuck", "--grace", "-1"), "argument --grace: must be a number of seconds, 0 or more"),
    (("stuck", "--grace", "nan"), "argument --grace: must be a number of seconds, 0 or more"),
    (("check", "--grace", "-3"), "argument --grace: must be a number of seconds, 0 or more"),
])
async def test_bad_arguments_are_refused_before_any_query(args: tuple[str, ...],
                                                         wanted: str) -> None:
    """`saga list --limit -1` and `saga stuck --limit -1` ended in SQLAlchemy's traceback;
    `--grace -1` was accepted. No database is configured here: nothing gets that far."""
    _refused_usage(await saga_cli(None, *args), wanted)


async def test_list_status_is_taken_in_any_case(harness: Harness, completed: Any) -> None:
    saga, transfer_id = completed

    [row] = _ok(await saga_cli(harness, "list", "--status", "Completed", "--key", transfer_id,
                               "--json"))

    assert row["saga_id"] == str(saga.saga_id)


async def test_timeline_refuses_an_ambiguous_prefix_listing_the_sagas(
        isolated: Isolated) -> None:
    twins = [uuid.UUID("abcdef01-1111-4111-8111-111111111111"),
             uuid.UUID("abcdef01-2222-4222-8222-222222222222")]
    for saga_id in twins:
        await _start_saga_at(isolated, datetime.now(UTC), saga_id)

    ambiguous = await saga_cli(isolated.harness, "timeline", "abcdef01")
    [first] = [_ok(await saga_cli(isolated.harness, "timeline", "ABCDEF01-1", "--json"))]

    _refused_usage(ambiguous, "abcdef01 is the start of the saga ids of several sagas:",
                   str(twins[0]), str(twins[1]), "give more of the id")
    assert first["saga_id"] == str(twins[0])


def test_dev_serves_the_console_and_keeps_the_logs_in_a_named_folder(tmp_path: Path) -> None:
    """`saga dev` deleted the workers' logs when it stopped. They stay in a folder named for the
    start, under .saga/ of the directory it runs in, said when ready and when stopped. It also
    serves the console behind its development identity provider: `console_url` in its JSON,
    no request without a token, and `saga dev token` gives a script one per role."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    with (open(tmp_path / "stderr.txt", "wb") as stderr,
          subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "dev", "--json"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr,
                           text=True) as process):
        try:
            assert process.stdout is not None
            ready = json.loads(process.stdout.readline())
            logs = Path(ready["logs"])
            assert logs.parent.parent == tmp_path / ".saga"
            assert re.fullmatch(r"dev-\d{8}T\d{6}Z-\d+", logs.parent.name)
            assert set(ready["workers"]) >= {"orchestrator", "relay", "recovery"}
            whoami = f"{ready['console_url']}/api/v1/whoami"
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(whoami, timeout=10)
            assert refused.value.code == 401
            refused.value.close()
            minted = subprocess.run(
                [sys.executable, "-m", "orchestrator.cli", "dev", "token", "--role", "operator",
                 "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
            token = json.loads(minted.stdout)["access_token"]
            with urllib.request.urlopen(urllib.request.Request(
                    whoami, headers={"Authorization": f"Bearer {token}"}), timeout=10) as answer:
                assert json.load(answer)["role"] == "operator"
            process.send_signal(signal.SIGINT)
            stopped = json.loads(process.stdout.readline())
            assert process.wait(60) == 0, (tmp_path / "stderr.txt").read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    assert stopped == {"stopped": True, "logs": str(logs)}
    kept = {p.name for p in logs.iterdir()}
    assert {"orchestrator.log", "relay.log", "recovery.log", "postgres.log"} <= kept, kept
    assert (logs / "orchestrator.log").stat().st_size > 0


async def test_check_details_write_times_in_iso_8601(isolated: Isolated) -> None:
    """`saga check` printed `datetime.datetime(...)` in a violation's detail. A saga in flight
    that is due at no time breaks I3; its detail names it with its last change, in ISO 8601."""
    saga_id = await _start_saga_at(isolated, datetime.now(UTC))
    async with isolated.engine.begin() as conn:
        await conn.execute(text("UPDATE sagas SET due_at = NULL WHERE saga_id = :s"),
                           {"s": saga_id})

    result = await saga_cli(isolated.harness, "check")

    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("VIOLATED  I3")))
    detail = lines[at + 1].strip()
    assert detail.startswith(f"({saga_id}, RUNNING, screen, forward, 20")
    assert re.search(r", \d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d+\+00:00\)$", detail), detail
    assert "datetime" not in result.stdout and "UUID(" not in result.stdout
