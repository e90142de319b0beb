"""Read side for on-call engineers: a saga's timeline and lists of sagas, of every saga type.

A saga is named by its saga id, a unique prefix of it (8 hex digits or more, as the tables
print them), or its business key (the key its type derives from the start message: a
transfer's is its transfer id); a key that two saga types share needs the type too.
A saga may wait on several steps at once (a parallel group): `current_step`, `attempt` and
`deadline_at` are those of the step due first (the `sagas` projection's columns), and `runs`
lists every step it waits on, from the cached state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Self
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.core.saga import SagaStatus
from orchestrator.core.saga_type import SagaType
from orchestrator.errors import ConfigurationError, NotFound
from orchestrator.postgres.store import json_value, set_aside_outbox

# A saga id prefix must be at least this long: what `saga list`, `saga dlq list` and the
# timeline's dead-letter notes print. Shorter hex strings are read as business keys only.
SAGA_ID_PREFIX_MIN_HEX_DIGITS: Final = 8
SHORT_ID_HEX_DIGITS: Final = 8
_CANDIDATES_SHOWN: Final = 5
_HEX: Final = frozenset("0123456789abcdef")


def id_prefix(spelled: str) -> str | None:
    """The hex digits of `spelled` if it can be the start of a uuid (dashes anywhere, any
    case), else None. Not checked for length."""
    digits = spelled.strip().lower().replace("-", "")
    return digits if digits and len(digits) <= 32 and set(digits) <= _HEX else None


def prefix_range(digits: str) -> tuple[UUID, UUID]:
    """The lowest and highest uuid starting with these hex digits. PostgreSQL orders uuids by
    their bytes, the order of their hex spelling, so a prefix is a range scan of the key."""
    return UUID(digits.ljust(32, "0")), UUID(digits.ljust(32, "f"))


def _candidates(rows: list[Any]) -> str:
    shown = ", ".join(f"{r.saga_id} ({r.saga_type} {r.business_key}, {r.status})"
                      for r in rows[:_CANDIDATES_SHOWN])
    return shown + (" and more" if len(rows) > _CANDIDATES_SHOWN else "")


async def resolve_saga_id(engine: AsyncEngine, any_id: str, saga_type: str | None = None
                          ) -> UUID:
    """The saga `any_id` names (of `saga_type`, when given): its saga id, its business key, a
    unique prefix of its saga id of 8 hex digits or more, or failing those a unique prefix of
    one of its dead letters' ids (what `saga dlq list` prints). Exact names win over prefixes.
    A prefix that matches several sagas raises ConfigurationError listing them: guessing would
    show the operator a saga they did not mean."""
    keys = [any_id]
    try:
        as_uuid: UUID | None = UUID(any_id)
        keys.append(str(as_uuid))  # a UUID key is stored in its canonical spelling
    except ValueError:
        as_uuid = None
    digits = id_prefix(any_id) if as_uuid is None else None
    by_prefix = digits is not None and len(digits) >= SAGA_ID_PREFIX_MIN_HEX_DIGITS
    async with engine.connect() as conn:
        rows = (await conn.execute(
            text("SELECT saga_id, saga_type FROM sagas"
                 " WHERE (saga_id = CAST(:id AS uuid) OR business_key = ANY(:keys))"
                 " AND (CAST(:type AS text) IS NULL OR saga_type = :type)"
                 " ORDER BY saga_id = CAST(:id AS uuid) DESC"),
            {"id": as_uuid, "keys": keys, "type": saga_type})).all()
        prefixed: list[Any] = []
        lettered: list[Any] = []
        if not rows and by_prefix:
            assert digits is not None
            low, high = prefix_range(digits)
            prefixed = list((await conn.execute(
                text("SELECT saga_id, saga_type, business_key, status FROM sagas"
                     " WHERE saga_id BETWEEN :low AND :high"
                     " AND (CAST(:type AS text) IS NULL OR saga_type = :type)"
                     " ORDER BY saga_id LIMIT :n"),
                {"low": low, "high": high, "type": saga_type, "n": _CANDIDATES_SHOWN + 1})).all())
            if not prefixed:
                lettered = list((await conn.execute(
                    text("SELECT DISTINCT s.saga_id, s.saga_type, s.business_key, s.status"
                         " FROM dead_letters d JOIN sagas s USING (saga_id)"
                         " WHERE d.dead_letter_id BETWEEN :low AND :high"
                         " AND (CAST(:type AS text) IS NULL OR s.saga_type = :type)"
                         " ORDER BY s.saga_id LIMIT :n"),
                    {"low": low, "high": high, "type": saga_type,
                     "n": _CANDIDATES_SHOWN + 1})).all())
    where = f" of type {saga_type}" if saga_type else ""
    if rows:
        if len(rows) > 1 and rows[0].saga_id != as_uuid:
            raise ConfigurationError(
                f"business key {any_id} names sagas of several types"
                f" ({', '.join(sorted(r.saga_type for r in rows))}): pass --type")
        return UUID(str(rows[0].saga_id))
    for matches, what in ((prefixed, "saga id"), (lettered, "dead letter id")):
        if len(matches) == 1:
            return UUID(str(matches[0].saga_id))
        if matches:
            raise ConfigurationError(
                f"{any_id} is the start of the {what}s of several sagas{where}:"
                f" {_candidates(matches)}; give more of the id")
    hint = ""
    if digits is not None and not by_prefix and as_uuid is None:
        hint = (f" (a saga id prefix needs at least {SAGA_ID_PREFIX_MIN_HEX_DIGITS} hex"
                " digits)")
    raise NotFound(f"no saga{where} with saga id, saga id prefix or business key {any_id}"
                   + hint)


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
        return f"{payload['code']}: {payload['reason']}{retry}{_by(payload)}"
    if event_type == "StepSucceeded":
        return ", ".join(f"{k}={v}" for k, v in payload.get("result", {}).items()) + _by(payload)
    if event_type == "SagaCompensated":
        return f"turned back at {payload['failed_step']}: {payload['reason']}"
    if event_type == "SagaRejected":
        return f"{payload['reason_code']}: {payload['reason']}"
    if event_type == "SagaFailed":
        return f"at {payload['step']}: {payload['reason']}"
    if event_type == "SagaResolved":
        return f"closed by {payload['resolved_by']}: {payload['note']}"
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
        return f"undone (attempt {payload['attempt']}){_by(payload)}"
    if event_type == "OperatorActed":
        action = str(payload["action"]).replace("_", " ")
        return f"{action} by {payload['actor']}: {payload['reason']}"
    if event_type == "StepResent":
        return (f"{payload['direction']} attempt {payload['attempt']} re-sent by an operator"
                f" (deadline {payload['deadline_at']})")
    return ""


def _by(payload: Mapping[str, Any]) -> str:
    """Which participant instance decided a step's outcome (its worker name), when its reply
    said: replies from participants before this was recorded say nothing."""
    applied_by = payload.get("applied_by")
    return f" [by {applied_by}]" if applied_by else ""


# A saga's dead letters, for its timeline; indexed both ways (migration 0012).
SAGA_DEAD_LETTERS = (
    "SELECT dead_letter_id, stage, reason_code, reason, first_failed_at,"
    " last_failed_at, attempts, redriven_at, redriven_by FROM dead_letters"
    " WHERE saga_id = :id"
    " OR (saga_id IS NULL AND saga_type = :type AND business_key = :key)"
    " ORDER BY first_failed_at, dead_letter_id")


async def timeline(engine: AsyncEngine, any_id: str, saga_type: str | None = None,
                   sagas: Mapping[str, SagaType[Any]] | None = None) -> dict[str, Any]:
    """Every event of one saga (by saga id, id prefix or business key: `resolve_saga_id`),
    each with what it says in a line, then the dead letters in its name, each with the command
    that shows it. `sagas` (the application's types) lets a type describe its start message."""
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
        # What was refused in this saga's name: its own rejected request, a conflicting
        # re-send of its business key (the saga is unchanged, so no event records it), a
        # reply or command set aside, its FAILED record. Each leads to `saga dlq show`.
        # Intake dead letters written before 0009 name no saga id, only the (backfilled) key.
        letters = (await conn.execute(text(SAGA_DEAD_LETTERS), {
            "id": saga_id, "type": saga.saga_type, "key": saga.business_key})).all()
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
        "dead_letters": [{
            "dead_letter_id": str(d.dead_letter_id), "stage": d.stage,
            "reason_code": d.reason_code, "reason": d.reason,
            "first_failed_at": d.first_failed_at.isoformat(),
            "last_failed_at": d.last_failed_at.isoformat(), "attempts": d.attempts,
            "redriven_at": d.redriven_at.isoformat() if d.redriven_at else None,
            "redriven_by": d.redriven_by,
            "show": f"saga dlq show {str(d.dead_letter_id)[:SHORT_ID_HEX_DIGITS]}",
        } for d in letters],
    }


def _utc(iso: str) -> str:
    """An ISO 8601 time as `2026-12-05 09:22:20.123`, in UTC (the column says so)."""
    at = datetime.fromisoformat(iso).astimezone(UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S.") + f"{at.microsecond // 1000:03d}"


def _letter_line(letter: dict[str, Any]) -> str:
    """A dead letter in this saga's name (its own refused request, a conflicting re-send of
    its key, a reply or command set aside, its FAILED record), and how to see it."""
    by = f" by {letter['redriven_by']}" if letter.get("redriven_by") else ""
    redriven = (f", redriven {_utc(letter['redriven_at'])}{by}" if letter["redriven_at"]
                else "")
    return (f"{_utc(letter['first_failed_at']):<23} {'-':>3}  {'DeadLetter':<18} {'':<8} "
            f"{letter['attempts']:>3} {'':>8}  {letter['reason_code']}: {letter['reason']}"
            f" ({letter['stage']}{redriven}); see `{letter['show']}`")


def render_timeline(data: dict[str, Any]) -> str:
    definition = (f"  definition v{data['definition_version']}"
                  if data["definition_version"] is not None else "")
    # The trace on the first line, so the columns stay the second (ADR 0015).
    trace = f"  trace {data['trace_id']}" if data.get("trace_id") else ""
    lines = [f"saga {data['saga_id']}  {data['saga_type']} {data['business_key']}  "
             f"{data['status']}{definition}{trace}"]
    lines.append(f"{'time (UTC)':<23} {'seq':>3}  {'type':<18} {'step':<8} {'att':>3} "
                 f"{'ms':>8}  detail")
    for e in data["events"]:
        ms = f"{e['duration_ms']:.1f}" if e["duration_ms"] is not None else ""
        lines.append(
            f"{_utc(e['recorded_at']):<23} {e['seq']:>3}  {e['type']:<18} {e['step'] or '':<8} "
            f"{e['attempt'] or '':>3} {ms:>8}  {e['detail']}")
    # After the events, not between them: a dead letter's time is its worker's clock, an
    # event's the database's, so interleaving them by time could misplace one.
    lines += [_letter_line(letter) for letter in data.get("dead_letters", ())]
    return "\n".join(lines)


# The largest page `search_sagas` returns: a caller wanting more pages on with `offset`.
SEARCH_LIMIT_MAX: Final = 1000
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(spelled: str, now: datetime) -> datetime:
    """A point in time as an operator types it: ISO 8601 (`2026-12-05`, `2026-12-05T09:30`,
    with an offset or `Z`; without one it is UTC), or an age before `now` (`90s`, `15m`, `2h`,
    `3d`). Raises ValueError saying what is accepted."""
    relative = _RELATIVE.match(spelled.strip().lower())
    if relative:
        return now - timedelta(seconds=float(relative[1]) * _UNIT_S[relative[2]])
    try:
        at = datetime.fromisoformat(spelled.strip())
    except ValueError:
        raise ValueError(f"{spelled!r} is not a time: give ISO 8601 (2026-12-05,"
                         " 2026-12-05T09:30:00Z; UTC unless an offset is given) or an age"
                         " such as 15m, 2h, 3d") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


class SagaFilter(BaseModel):
    """What `search_sagas` looks for; every field optional, all of them must hold. Validated
    when built (pydantic), so a caller (the CLI, an HTTP API) refuses a bad value before any
    query: a page of 1 to `SEARCH_LIMIT_MAX`, an offset of 0 or more, `since` before `until`,
    a status in any case.

    `since` and `until` bound when a saga started (`created_at`, half open: since <= t <
    until); `account` matches any of the fields its saga type declares as accounts
    (`SagaType.account_fields`: a transfer's source and destination)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: SagaStatus | None = None
    saga_type: str | None = Field(default=None, min_length=1)
    business_key: str | None = Field(default=None, min_length=1)
    definition_version: int | None = Field(default=None, ge=1)
    account: str | None = Field(default=None, min_length=1, max_length=200)
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    limit: int = Field(default=50, ge=1, le=SEARCH_LIMIT_MAX)
    offset: int = Field(default=0, ge=0)

    @field_validator("status", mode="before")
    @classmethod
    def _status_in_any_case(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _since_before_until(self) -> Self:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(f"since ({self.since.isoformat()}) must be before until"
                             f" ({self.until.isoformat()})")
        return self


def _account_clause(wanted: SagaFilter, sagas: Mapping[str, SagaType[Any]],
                    params: dict[str, Any]) -> str:
    """`(type is T and the account is one of T's account fields) or ...`, over the types the
    filter allows; the paths are bound parameters, never spliced into the SQL."""
    types = [t for name, t in sorted(sagas.items())
             if t.account_fields and (wanted.saga_type is None or name == wanted.saga_type)]
    if not types:
        which = f"saga type {wanted.saga_type!r} declares" if wanted.saga_type else \
            "no saga type of this deployment declares"
        raise ConfigurationError(f"{which} no account fields (SagaType.account_fields): it"
                                 " cannot be searched by account")
    params["account"] = wanted.account
    clauses = []
    for i, saga_type in enumerate(types):
        params[f"account_type_{i}"] = saga_type.name
        paths = []
        for j, path in enumerate(saga_type.account_fields):
            params[f"account_path_{i}_{j}"] = ["input", *path.split(".")]
            paths.append(f"state #>> CAST(:account_path_{i}_{j} AS text[])")
        clauses.append(f"(saga_type = :account_type_{i} AND :account IN ({', '.join(paths)}))")
    return "(" + " OR ".join(clauses) + ")"


async def search_sagas(engine: AsyncEngine, wanted: SagaFilter,
                       sagas: Mapping[str, SagaType[Any]] | None = None) -> list[dict[str, Any]]:
    """Sagas matching `wanted`, most recently changed first (ties by saga id, so pages do not
    overlap while nothing changes), one page of `wanted.limit` from `wanted.offset`. Each row
    carries the saga's start message as `input`. Searching by account needs the deployment's
    saga types (`sagas`): each says where its start message names accounts.

    By account, the search reads each candidate's cached state (no index covers a start
    message's fields): narrow it by type, status or time on a large event store."""
    params: dict[str, Any] = {
        "status": wanted.status.value if wanted.status else None, "type": wanted.saga_type,
        "definition": wanted.definition_version, "key": wanted.business_key,
        "since": wanted.since, "until": wanted.until, "limit": wanted.limit,
        "offset": wanted.offset}
    by_account = "TRUE"
    if wanted.account is not None:
        by_account = _account_clause(wanted, sagas or {}, params)
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT saga_id, saga_type, business_key, definition_version, status, current_step,"
            " attempt, version, deadline_at, created_at, updated_at, state->'input' AS input,"
            " state->>'failure' AS failure, state->'runs' AS runs FROM sagas"
            " WHERE (CAST(:status AS text) IS NULL OR status = :status)"
            " AND (CAST(:type AS text) IS NULL OR saga_type = :type)"
            " AND (CAST(:definition AS int) IS NULL OR definition_version = :definition)"
            " AND (CAST(:key AS text) IS NULL OR business_key = :key)"
            " AND (CAST(:since AS timestamptz) IS NULL OR created_at >= :since)"
            " AND (CAST(:until AS timestamptz) IS NULL OR created_at < :until)"
            f" AND {by_account}"
            " ORDER BY updated_at DESC, saga_id DESC LIMIT :limit OFFSET :offset"),
            params)).all()
    return [
        {"saga_id": str(r.saga_id), "saga_type": r.saga_type, "business_key": r.business_key,
         "definition_version": r.definition_version, "status": r.status,
         "current_step": r.current_step, "runs": _runs(r.runs), "attempt": r.attempt,
         "version": r.version,
         "input": json_value(r.input), "failure": r.failure,
         "deadline_at": r.deadline_at.isoformat() if r.deadline_at else None,
         "created_at": r.created_at.isoformat(), "updated_at": r.updated_at.isoformat()}
        for r in rows
    ]


async def list_sagas(engine: AsyncEngine, status: str | None, limit: int,
                     saga_type: str | None = None, definition_version: int | None = None,
                     business_key: str | None = None) -> list[dict[str, Any]]:
    """`search_sagas` by status, saga type, definition version and business key (the
    filters it had before searching by account and time)."""
    return await search_sagas(engine, SagaFilter(
        status=status, saga_type=saga_type, definition_version=definition_version,
        business_key=business_key, limit=limit))


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
