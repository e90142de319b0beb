"""Read side for on-call engineers: a saga's timeline and lists of sagas, of every saga type.

A saga is named by its saga id or by its business key (the key its type derives from the start
message: a transfer's is its transfer id); a key that two saga types share needs the type too.
A saga may wait on several steps at once (a parallel group): `current_step`, `attempt` and
`deadline_at` are those of the step due first (the `sagas` projection's columns), and `runs`
lists every step it waits on, from the cached state.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.core.saga_type import SagaType
from orchestrator.errors import ConfigurationError, NotFound
from orchestrator.postgres.store import json_value, set_aside_outbox


async def resolve_saga_id(engine: AsyncEngine, any_id: str, saga_type: str | None = None
                          ) -> UUID:
    """Accept a saga id or a business key (of `saga_type`, when given)."""
    keys = [any_id]
    try:
        as_uuid: UUID | None = UUID(any_id)
        keys.append(str(as_uuid))  # a UUID key is stored in its canonical spelling
    except ValueError:
        as_uuid = None
    async with engine.connect() as conn:
        rows = (await conn.execute(
            text("SELECT saga_id, saga_type FROM sagas"
                 " WHERE (saga_id = CAST(:id AS uuid) OR business_key = ANY(:keys))"
                 " AND (CAST(:type AS text) IS NULL OR saga_type = :type)"
                 " ORDER BY saga_id = CAST(:id AS uuid) DESC"),
            {"id": as_uuid, "keys": keys, "type": saga_type})).all()
    where = f" of type {saga_type}" if saga_type else ""
    if not rows:
        raise NotFound(f"no saga{where} with saga id or business key {any_id}")
    if len(rows) > 1 and rows[0].saga_id != as_uuid:
        raise ConfigurationError(
            f"business key {any_id} names sagas of several types"
            f" ({', '.join(sorted(r.saga_type for r in rows))}): pass --type")
    return UUID(str(rows[0].saga_id))


def _runs(cached: Any) -> list[dict[str, Any]]:
    """The steps a saga waits on (each with its direction, attempt, deadline or retry time),
    from its cached state's `runs`; a row cached before parallel groups has none listed."""
    return [{key: run[key] for key in ("step", "direction", "attempt", "deadline_at",
                                       "next_attempt_at")} for run in json_value(cached) or ()]


def steps_label(row: dict[str, Any]) -> str:
    """`screen+reserve` for a saga waiting on both, else its current step."""
    return "+".join(run["step"] for run in row.get("runs") or ()) or row["current_step"] or ""


def _summary(saga_input: Mapping[str, Any]) -> str:
    """A start message as `field=value` pairs, by name (jsonb keeps no order), for a saga type
    that describes none itself."""
    return " ".join(f"{name}={value!r}" if isinstance(value, str) and " " in value
                    else f"{name}={value}"
                    for name, value in sorted(saga_input.items()) if name != "schema_version")


def _detail(event_type: str, payload: dict[str, Any],
            saga_type: SagaType[Any] | None = None) -> str:
    if event_type == "SagaStarted":
        describe = saga_type.describe if saga_type is not None else None
        summary = (describe or _summary)(payload["input"])
        # Started before definitions had versions: the one there was, version 1.
        return f"definition v{payload.get('definition_version', 1)}: {summary}"
    if event_type == "StepStarted":
        return f"{payload['direction']} {payload['action']} (deadline {payload['deadline_at']})"
    if event_type in ("StepFailed", "CompensationFailed"):
        retry = " (retryable)" if payload.get("retryable") else ""
        return f"{payload['code']}: {payload['reason']}{retry}"
    if event_type == "StepSucceeded":
        return ", ".join(f"{k}={v}" for k, v in payload.get("result", {}).items())
    if event_type == "SagaCompensated":
        return f"turned back at {payload['failed_step']}: {payload['reason']}"
    if event_type == "SagaRejected":
        return f"{payload['reason_code']}: {payload['reason']}"
    if event_type == "SagaFailed":
        return f"at {payload['step']}: {payload['reason']}"
    if event_type == "StepRetryScheduled":
        return (f"{payload['direction']} attempt {payload['attempt']} not before "
                f"{payload['not_before']}")
    if event_type == "StepTimedOut":
        if payload.get("gave_up"):
            return (f"{payload['direction']} attempt {payload['attempt']}: no reply, attempts "
                    "spent: gave up (outcome unknown)")
        return (f"{payload['direction']} attempt {payload['attempt']}: no reply, re-sent "
                f"(re-send {payload['resend']}, deadline {payload['deadline_at']})")
    if event_type == "StepCompensated":
        return f"undone (attempt {payload['attempt']})"
    return ""


async def timeline(engine: AsyncEngine, any_id: str, saga_type: str | None = None,
                   sagas: Mapping[str, SagaType[Any]] | None = None) -> dict[str, Any]:
    """Every event of one saga (by saga id or business key), each with what it says in a line.
    `sagas` (the application's types) lets a type describe its start message itself."""
    saga_id = await resolve_saga_id(engine, any_id, saga_type)
    async with engine.connect() as conn:
        saga = (await conn.execute(text(
            "SELECT saga_id, saga_type, business_key, definition_version, status, current_step,"
            " version, created_at, updated_at, state->'runs' AS runs"
            " FROM sagas WHERE saga_id = :id"),
            {"id": saga_id})).one()
        rows = (await conn.execute(text(
            "SELECT seq, type, step, attempt, payload, actor, recorded_at, trace_id"
            " FROM saga_events WHERE saga_id = :id ORDER BY seq"), {"id": saga_id})).all()
    started_at: dict[str, datetime] = {}
    previous: datetime | None = None
    events = []
    for row in rows:
        payload = json_value(row.payload)
        command_id = payload.get("command_id")
        if row.type == "StepStarted" and command_id:
            started_at[command_id] = row.recorded_at
        # A step outcome's duration is from its command; any other event's, from the last event.
        since = started_at.get(command_id) if row.type != "StepStarted" and command_id else previous
        duration_ms = (row.recorded_at - since).total_seconds() * 1000 if since else None
        previous = row.recorded_at
        events.append({
            "seq": row.seq, "recorded_at": row.recorded_at.isoformat(), "type": row.type,
            "step": row.step, "attempt": row.attempt,
            "duration_ms": round(duration_ms, 2) if duration_ms is not None else None,
            "actor": row.actor,
            "detail": _detail(row.type, payload, (sagas or {}).get(saga.saga_type)),
            "payload": payload,
            "trace_id": row.trace_id,
        })
    # The saga's trace (ADR 0015); events written before migration 0010 have none.
    trace_ids = list(dict.fromkeys(row.trace_id for row in rows if row.trace_id))
    return {
        "saga_id": str(saga.saga_id), "saga_type": saga.saga_type,
        "business_key": saga.business_key, "definition_version": saga.definition_version,
        "status": saga.status, "current_step": saga.current_step, "runs": _runs(saga.runs),
        "version": saga.version, "created_at": saga.created_at.isoformat(),
        "updated_at": saga.updated_at.isoformat(),
        "trace_id": trace_ids[0] if trace_ids else None, "events": events,
    }


def render_timeline(data: dict[str, Any]) -> str:
    definition = (f"  definition v{data['definition_version']}"
                  if data["definition_version"] is not None else "")
    lines = [f"saga {data['saga_id']}  {data['saga_type']} {data['business_key']}  "
             f"{data['status']}{definition}"]
    if data.get("trace_id"):
        lines.append(f"trace {data['trace_id']}")
    lines.append(f"{'time (UTC)':<15} {'seq':>3}  {'type':<18} {'step':<8} {'att':>3} "
                 f"{'ms':>8}  detail")
    for e in data["events"]:
        ms = f"{e['duration_ms']:.1f}" if e["duration_ms"] is not None else ""
        lines.append(
            f"{e['recorded_at'][11:26]:<15} {e['seq']:>3}  {e['type']:<18} {e['step'] or '':<8} "
            f"{e['attempt'] or '':>3} {ms:>8}  {e['detail']}")
    return "\n".join(lines)


async def list_sagas(engine: AsyncEngine, status: str | None, limit: int,
                     saga_type: str | None = None, definition_version: int | None = None,
                     business_key: str | None = None) -> list[dict[str, Any]]:
    """Sagas, most recently changed first, filtered by any of status, saga type, definition
    version and business key. Each row carries the saga's start message as `input`."""
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT saga_id, saga_type, business_key, definition_version, status, current_step,"
            " attempt, version, deadline_at, updated_at, state->'input' AS input,"
            " state->>'failure' AS failure, state->'runs' AS runs FROM sagas"
            " WHERE (CAST(:status AS text) IS NULL OR status = :status)"
            " AND (CAST(:type AS text) IS NULL OR saga_type = :type)"
            " AND (CAST(:definition AS int) IS NULL OR definition_version = :definition)"
            " AND (CAST(:key AS text) IS NULL OR business_key = :key)"
            " ORDER BY updated_at DESC LIMIT :limit"),
            {"status": status, "type": saga_type, "definition": definition_version,
             "key": business_key, "limit": limit})).all()
    return [
        {"saga_id": str(r.saga_id), "saga_type": r.saga_type, "business_key": r.business_key,
         "definition_version": r.definition_version, "status": r.status,
         "current_step": r.current_step, "runs": _runs(r.runs), "attempt": r.attempt,
         "version": r.version,
         "input": json_value(r.input), "failure": r.failure,
         "deadline_at": r.deadline_at.isoformat() if r.deadline_at else None,
         "updated_at": r.updated_at.isoformat()}
        for r in rows
    ]


async def stuck_sagas(engine: AsyncEngine, grace_s: float, limit: int) -> list[dict[str, Any]]:
    """In-flight sagas more than `grace_s` past their due time: the recovery worker should have
    moved them by then (it polls every fraction of a second), so either no recovery worker runs
    or it cannot reach the broker or this saga. Oldest first."""
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT saga_id, saga_type, business_key, definition_version, status, current_step,"
            " direction, attempt, due_at,"
            " updated_at, extract(epoch FROM clock_timestamp() - due_at) AS overdue_s,"
            " state->>'failure' AS failure, state->'runs' AS runs"
            " FROM sagas WHERE status IN ('RUNNING', 'COMPENSATING')"
            " AND due_at < clock_timestamp() - make_interval(secs => :grace)"
            " ORDER BY due_at LIMIT :limit"),
            {"grace": grace_s, "limit": limit})).all()
    return [
        {"saga_id": str(r.saga_id), "saga_type": r.saga_type, "business_key": r.business_key,
         "definition_version": r.definition_version, "status": r.status,
         "current_step": r.current_step, "runs": _runs(r.runs), "direction": r.direction,
         "attempt": r.attempt,
         "due_at": r.due_at.isoformat(), "overdue_s": round(float(r.overdue_s), 1),
         "updated_at": r.updated_at.isoformat(), "failure": r.failure}
        for r in rows
    ]


async def outbox_set_aside(engine: AsyncEngine, limit: int) -> list[dict[str, Any]]:
    """Outbox rows the relay set aside unpublished after the broker refused them (an unknown
    topic, a record too large): nothing will publish them, so an operator must look."""
    async with engine.connect() as conn:
        return await set_aside_outbox(conn, limit)
