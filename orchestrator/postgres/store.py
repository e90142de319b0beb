"""PostgreSQL access: the engine, versioned migrations, and the event store's writes and reads.

All writes of one consumed batch happen in one transaction: inbox rows, saga events, the
projection, outbox rows and dead letters. The `(saga_id, seq)` primary key is the concurrency
control: a writer that lost a race gets `ConcurrencyConflict` and redoes its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from orchestrator.core.saga import SagaState
from orchestrator.errors import (
    ConcurrencyConflict,
    ConfigurationError,
    StoreError,
    StoreUnavailable,
)
from orchestrator.tracing import saga_span_id
from schemas import SAGA_EVENT_ADAPTER, SagaEvent

_MIGRATION_LOCK = 0x5A6A0001
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def create_engine(url: str, pool_size: int = 5,
                  idle_in_transaction_timeout_s: float | None = None) -> AsyncEngine:
    """The pool. With `idle_in_transaction_timeout_s`, PostgreSQL ends a session that sits in
    an open transaction that long (a frozen or stopped worker's), so its row locks do not block
    the workers that took over."""
    connect_args: dict[str, Any] = {}
    if idle_in_transaction_timeout_s is not None:
        timeout_ms = str(int(idle_in_transaction_timeout_s * 1000))
        connect_args["server_settings"] = {"idle_in_transaction_session_timeout": timeout_ms}
    # hide_parameters: a statement's error names the statement, never its values (account
    # ids, amounts, payloads), since such errors are logged and may become dead-letter reasons.
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size,
                               connect_args=connect_args, hide_parameters=True)


class HeldConnection:
    """One autocommit connection a worker keeps for its one-statement writes (ADR 0005, 0006).

    Those writes need no transaction, and taking a connection from SQLAlchemy's pool and giving
    it back costs ~0.3 ms of CPU per batch on this machine (sampled with py-spy), on every hop of
    every saga. After any error in `use` the connection is closed and the next `use` takes a new
    one from the pool, so a connection lost with its server costs one failed batch, as a pooled
    one does. `close` it when the worker stops."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._conn: AsyncConnection | None = None
        self._lock = asyncio.Lock()  # one statement at a time on one connection

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[AsyncConnection]:
        async with self._lock:
            if self._conn is None:
                self._conn = await self._engine.connect()
            try:
                yield self._conn
            except BaseException:
                await self._discard()
                raise

    async def close(self) -> None:
        async with self._lock:
            await self._discard()

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


async def migrate(engine: AsyncEngine, extra: Sequence[Path] = ()) -> list[str]:
    """Apply the migrations not applied yet under an advisory lock, so that workers starting
    together do not race: the engine's own first, then each folder of `extra` (an
    application's, e.g. its ledger), each in name order. Returns the names applied now.

    Names are what `schema_migrations` remembers, so they must be unique across the folders."""
    files: list[tuple[str, str]] = []
    for folder in (MIGRATIONS_DIR, *extra):
        files += sorted((path.name, path.read_text()) for path in folder.glob("*.sql"))
    names = [name for name, _ in files]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ConfigurationError(f"migration names must be unique across folders: {twice}")
    applied_now: list[str] = []
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        await conn.execute(text(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        ))
        done = set((await conn.execute(text("SELECT name FROM schema_migrations"))).scalars())
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        for name, sql in files:
            if name in done:
                continue
            await raw.execute(sql)  # a multi-statement script: the simple query protocol
            await conn.execute(
                text("INSERT INTO schema_migrations (name) VALUES (:n)"), {"n": name}
            )
            applied_now.append(name)
    return applied_now


_UNIQUE_VIOLATION = "23505"
# Server states that say nothing about the batch: connection trouble (class 08), shutdown or
# restart (57P01-57P03), too many connections, a deadlock or serialization victim, a lock or
# idle-session timeout.
_TRANSIENT_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300", "40001", "40P01", "55P03",
                                  "25P03", "57P05",
                                  # disk full, out of memory, a read-only server after a
                                  # failover, a statement cancelled by a timeout or an admin
                                  "53100", "53200", "25006", "57014"})


def _sqlstate(error: DBAPIError) -> str | None:
    state = getattr(error.orig, "sqlstate", None) or getattr(
        getattr(error.orig, "__cause__", None), "sqlstate", None)
    return str(state) if state else None


def translate(error: DBAPIError) -> StoreError:
    """A driver error as ours: a unique-key collision means another writer won a race, a lost
    or refused connection means the database is away (both retryable); anything else is a
    refusal that retrying will not cure."""
    sqlstate = _sqlstate(error)
    if isinstance(error, IntegrityError) and sqlstate == _UNIQUE_VIOLATION:
        return ConcurrencyConflict(f"another writer recorded part of this batch first: {error}")
    if is_transient_db_error(error):
        return StoreUnavailable(f"the database is unavailable: {error}")
    return StoreError(f"the database refused the batch: {error}")


def is_transient_db_error(error: BaseException) -> bool:
    """Whether a database error is about the connection or the server's state, not the data."""
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        sqlstate = _sqlstate(error)
        if sqlstate is not None:
            return sqlstate.startswith("08") or sqlstate in _TRANSIENT_SQLSTATES
        # No SQLSTATE: transient only if the driver says the connection is gone.
        cause = getattr(error.orig, "__cause__", None) or error.orig
        return isinstance(error, InterfaceError) or isinstance(
            cause, (OSError, asyncpg.exceptions.ConnectionDoesNotExistError,
                    asyncpg.exceptions.InterfaceError))
    # SQLAlchemy's pool timeout: every connection is busy, nothing to do with the record.
    return isinstance(error, (OSError, ConnectionError, TimeoutError, PoolTimeout,
                              asyncpg.exceptions.ConnectionDoesNotExistError))


@dataclass(frozen=True)
class NewEvent:
    saga_id: UUID
    seq: int
    event: SagaEvent
    actor: str
    causation_id: str | None
    # The saga's trace (32 hex digits), so a timeline links to its trace (ADR 0015).
    trace_id: str | None = None


@dataclass(frozen=True)
class StoredTrace:
    """A saga's W3C trace context as `sagas` keeps it: the `traceparent` of its saga span and
    the upstream's `tracestate`."""

    traceparent: str
    tracestate: str | None = None


@dataclass(frozen=True)
class InboxRow:
    message_id: str
    topic: str
    partition: int | None
    offset: int | None
    verdict: str
    saga_id: UUID | None


@dataclass(frozen=True)
class OutboxRow:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[list[str]]
    saga_id: UUID | None


@dataclass(frozen=True)
class DeadLetterRow:
    dead_letter_id: UUID
    stage: str
    reason_code: str
    reason: str
    error_class: str
    original_topic: str
    original_partition: int | None
    original_offset: int | None
    original_key: str | None
    payload: bytes
    headers: list[list[str]]
    failed_at: datetime
    saga_id: UUID | None
    # The saga type whose start topic the record came from, or of the saga it concerns, and the
    # saga's business key, where known.
    saga_type: str | None = None
    business_key: str | None = None
    # A record set aside after repeated failures: how many tries, and when the first one failed.
    attempts: int = 1
    first_failed_at: datetime | None = None


def _event_step(event: SagaEvent) -> tuple[str | None, int | None]:
    return getattr(event, "step", None), getattr(event, "attempt", None)


async def seen_and_states(conn: AsyncConnection, consumer: str, message_ids: Sequence[str],
                          saga_ids: Sequence[UUID]) -> tuple[set[str], dict[UUID, SagaState]]:
    """In one round trip: which messages this consumer already recorded, and the cached state
    of the sagas the batch touches."""
    seen, states, _ = await seen_states_and_traces(conn, consumer, message_ids, saga_ids)
    return seen, states


async def seen_states_and_traces(
        conn: AsyncConnection, consumer: str, message_ids: Sequence[str],
        saga_ids: Sequence[UUID]
) -> tuple[set[str], dict[UUID, SagaState], dict[UUID, StoredTrace]]:
    """`seen_and_states`, with the stored trace context of each saga that has one."""
    rows = (await conn.execute(
        text(
            "SELECT message_id, NULL AS state, NULL AS traceparent, NULL AS tracestate"
            " FROM inbox WHERE consumer = :c AND message_id = ANY(:ids)"
            " UNION ALL SELECT NULL, state, traceparent, tracestate FROM sagas"
            " WHERE saga_id = ANY(:saga_ids)"
        ),
        {"c": consumer, "ids": list(message_ids), "saga_ids": list(saga_ids)},
    )).all()
    seen = {row.message_id for row in rows if row.message_id is not None}
    states: dict[UUID, SagaState] = {}
    traces: dict[UUID, StoredTrace] = {}
    for row in rows:
        if row.state is None:
            continue
        state = SagaState.from_json(json_value(row.state))
        states[state.saga_id] = state
        if row.traceparent is not None:
            traces[state.saga_id] = StoredTrace(row.traceparent, row.tracestate)
    return seen, states, traces


def json_value(value: Any) -> Any:
    """A jsonb column as Python: asyncpg hands it over as text."""
    return json.loads(value) if isinstance(value, str) else value


_WRITE_BATCH = text("""
WITH new_inbox AS (
    INSERT INTO inbox (consumer, message_id, topic, partition, "offset", verdict, saga_id)
    SELECT CAST(:consumer AS text), * FROM unnest(
        CAST(:i_id AS text[]), CAST(:i_topic AS text[]), CAST(:i_partition AS int[]),
        CAST(:i_offset AS bigint[]), CAST(:i_verdict AS text[]), CAST(:i_saga AS uuid[]))
), new_events AS (
    INSERT INTO saga_events (saga_id, seq, type, step, attempt, payload, actor, causation_id,
                             trace_id)
    SELECT * FROM unnest(
        CAST(:e_saga AS uuid[]), CAST(:e_seq AS int[]), CAST(:e_type AS text[]),
        CAST(:e_step AS text[]), CAST(:e_attempt AS int[]), CAST(:e_payload AS jsonb[]),
        CAST(:e_actor AS text[]), CAST(:e_cause AS text[]), CAST(:e_trace AS text[]))
), projection AS (
    INSERT INTO sagas (saga_id, saga_type, business_key, definition_version, status,
                       current_step, direction, attempt, version, deadline_at, due_at,
                       requested_at, created_at, updated_at, state, traceparent, tracestate)
    SELECT saga_id, saga_type, business_key, definition_version, status, step, direction,
           attempt, version, deadline_at, due_at, requested_at, CAST(:now AS timestamptz),
           CAST(:now AS timestamptz), state, traceparent, tracestate
    FROM unnest(
        CAST(:s_saga AS uuid[]), CAST(:s_type AS text[]), CAST(:s_key AS text[]),
        CAST(:s_definition AS int[]),
        CAST(:s_status AS text[]), CAST(:s_step AS text[]), CAST(:s_direction AS text[]),
        CAST(:s_attempt AS int[]), CAST(:s_version AS int[]),
        CAST(:s_deadline AS timestamptz[]), CAST(:s_due AS timestamptz[]),
        CAST(:s_requested AS timestamptz[]), CAST(:s_state AS jsonb[]),
        CAST(:s_traceparent AS text[]), CAST(:s_tracestate AS text[]))
        AS s(saga_id, saga_type, business_key, definition_version, status, step, direction,
             attempt, version, deadline_at, due_at, requested_at, state, traceparent,
             tracestate)
    -- A saga's trace context is set once; one created before migration 0010 gets it here.
    ON CONFLICT (saga_id) DO UPDATE SET status = EXCLUDED.status,
        current_step = EXCLUDED.current_step, direction = EXCLUDED.direction,
        attempt = EXCLUDED.attempt, version = EXCLUDED.version,
        deadline_at = EXCLUDED.deadline_at, due_at = EXCLUDED.due_at,
        updated_at = EXCLUDED.updated_at, state = EXCLUDED.state,
        traceparent = COALESCE(sagas.traceparent, EXCLUDED.traceparent),
        tracestate = CASE WHEN sagas.traceparent IS NULL THEN EXCLUDED.tracestate
                          ELSE sagas.tracestate END
), new_outbox AS (
    INSERT INTO outbox (topic, key, value, headers, saga_id)
    SELECT * FROM unnest(
        CAST(:o_topic AS text[]), CAST(:o_key AS bytea[]), CAST(:o_value AS bytea[]),
        CAST(:o_headers AS jsonb[]), CAST(:o_saga AS uuid[]))
    RETURNING id
)
SELECT id FROM new_outbox
""")


async def write_batch(
    conn: AsyncConnection,
    consumer: str,
    inbox: Sequence[InboxRow],
    events: Sequence[NewEvent],
    states: Sequence[SagaState],
    outbox: Sequence[OutboxRow],
    dead_letters: Sequence[DeadLetterRow],
    now: datetime,
    traces: Mapping[UUID, StoredTrace] | None = None,
) -> list[int]:
    """Write one batch's effects in one round trip; returns the new outbox row ids, in the
    order of `outbox`. `traces` gives the trace context of the sagas in `states` (kept on a
    saga's row from its first write on).

    Raises ConcurrencyConflict if another writer recorded part of it first.
    """
    traces = traces or {}
    stored = [traces.get(s.saga_id) for s in states]
    params = {
        "consumer": consumer, "now": now,
        "i_id": [r.message_id for r in inbox], "i_topic": [r.topic for r in inbox],
        "i_partition": [r.partition for r in inbox], "i_offset": [r.offset for r in inbox],
        "i_verdict": [r.verdict for r in inbox], "i_saga": [r.saga_id for r in inbox],
        "e_saga": [e.saga_id for e in events], "e_seq": [e.seq for e in events],
        "e_type": [e.event.type for e in events],
        "e_step": [_event_step(e.event)[0] for e in events],
        "e_attempt": [_event_step(e.event)[1] for e in events],
        "e_payload": [e.event.model_dump_json() for e in events],
        "e_actor": [e.actor for e in events], "e_cause": [e.causation_id for e in events],
        "e_trace": [e.trace_id for e in events],
        "s_saga": [s.saga_id for s in states], "s_type": [s.saga_type for s in states],
        "s_key": [s.business_key for s in states],
        "s_definition": [s.definition_version for s in states],
        "s_status": [s.status.value for s in states],
        "s_step": [s.step for s in states],
        "s_direction": [s.direction.value if s.direction else None for s in states],
        "s_attempt": [s.attempt for s in states], "s_version": [s.version for s in states],
        "s_deadline": [s.deadline_at for s in states],
        "s_due": [s.due_at for s in states],
        "s_requested": [s.requested_at for s in states],
        "s_state": [json.dumps(s.to_json()) for s in states],
        "s_traceparent": [t.traceparent if t else None for t in stored],
        "s_tracestate": [t.tracestate if t else None for t in stored],
        "o_topic": [o.topic for o in outbox], "o_key": [o.key for o in outbox],
        "o_value": [o.value for o in outbox],
        "o_headers": [json.dumps(o.headers) for o in outbox],
        "o_saga": [o.saga_id for o in outbox],
    }
    try:
        rows = (await conn.execute(_WRITE_BATCH, params)).all()
        if dead_letters:
            await insert_dead_letters(conn, dead_letters)
    except DBAPIError as error:
        raise translate(error) from error
    # In the order of `outbox`: a bigserial is drawn row by row as unnest yields them, so the
    # ids ascend in that order (RETURNING itself promises no order).
    return sorted(row.id for row in rows)


async def mark_published(conn: AsyncConnection, ids: Sequence[int]) -> None:
    await conn.execute(
        text("UPDATE outbox SET published_at = clock_timestamp()"
             " WHERE id = ANY(:ids) AND published_at IS NULL"),
        {"ids": list(ids)},
    )


@dataclass(frozen=True)
class Refusal:
    """The broker refused an outbox row: why, and whether it is final (refused for what it is:
    set aside now) or may heal (refused for its topic: tried again with backoff)."""

    outbox_id: int
    error: str
    final: bool


@dataclass(frozen=True)
class RefusalRecorded:
    outbox_id: int
    topic: str
    attempts: int
    set_aside: bool
    error: str


_RECORD_REFUSALS = text("""
UPDATE outbox o SET attempts = o.attempts + 1, last_error = r.error,
    next_attempt_at = clock_timestamp() + make_interval(
        secs => least(CAST(:backoff_s AS float8) * power(2, o.attempts),
                      CAST(:backoff_max_s AS float8))),
    set_aside_at = CASE WHEN r.final OR o.attempts + 1 >= :max_attempts
                        THEN clock_timestamp() END
FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[]), CAST(:final AS boolean[]))
    AS r(id, error, final)
WHERE o.id = r.id AND o.published_at IS NULL AND o.set_aside_at IS NULL
RETURNING o.id, o.topic, o.attempts, o.set_aside_at IS NOT NULL AS set_aside, o.last_error
""")


async def record_refusals(conn: AsyncConnection, refusals: Sequence[Refusal],
                          max_attempts: int, backoff_s: float, backoff_max_s: float
                          ) -> list[RefusalRecorded]:
    """Count a refusal on each row and set aside those refused for good or `max_attempts`
    times; the others wait `backoff_s` doubling per attempt (at most `backoff_max_s`)."""
    if not refusals:
        return []
    rows = (await conn.execute(_RECORD_REFUSALS, {
        "ids": [r.outbox_id for r in refusals], "errors": [r.error for r in refusals],
        "final": [r.final for r in refusals], "max_attempts": max_attempts,
        "backoff_s": backoff_s, "backoff_max_s": backoff_max_s})).all()
    return [RefusalRecorded(row.id, row.topic, row.attempts, row.set_aside, row.last_error)
            for row in rows]


async def set_aside_outbox(conn: AsyncConnection, limit: int) -> list[dict[str, Any]]:
    """Outbox rows set aside after the broker refused them, oldest first: never published, and
    never tried again by the relay (`outbox_set_aside` index)."""
    rows = (await conn.execute(text(
        "SELECT id, topic, saga_id, attempts, last_error, length(value) AS size_bytes,"
        " created_at, set_aside_at FROM outbox"
        " WHERE set_aside_at IS NOT NULL AND published_at IS NULL"
        " ORDER BY set_aside_at, id LIMIT :limit"), {"limit": limit})).all()
    return [
        {"outbox_id": r.id, "topic": r.topic,
         "saga_id": str(r.saga_id) if r.saga_id else None, "attempts": r.attempts,
         "last_error": r.last_error, "size_bytes": r.size_bytes,
         "created_at": r.created_at.isoformat(), "set_aside_at": r.set_aside_at.isoformat()}
        for r in rows
    ]


async def retry_set_aside(conn: AsyncConnection, ids: Sequence[int]) -> list[int]:
    """Give set-aside outbox rows back to the relay (an operator fixed the cause: created the
    topic, raised a limit); returns the ids it changed. Only rows set aside and still
    unpublished are touched, so a second call, or a wrong id, does nothing."""
    return list((await conn.execute(text(
        "UPDATE outbox SET set_aside_at = NULL, attempts = 0, next_attempt_at = NULL"
        " WHERE id = ANY(:ids) AND set_aside_at IS NOT NULL AND published_at IS NULL"
        " RETURNING id"), {"ids": list(ids)})).scalars())


async def upsert_projection(conn: AsyncConnection, states: Sequence[SagaState],
                            now: datetime) -> None:
    await conn.execute(
        text(
            "INSERT INTO sagas (saga_id, saga_type, business_key, definition_version, status,"
            " current_step, direction, attempt, version, deadline_at, due_at, requested_at,"
            " created_at, updated_at, state) VALUES (:saga_id, :saga_type, :business_key,"
            " :definition_version, :status, :step, :direction, :attempt, :version,"
            " :deadline_at, :due_at, :requested_at, :now, :now, CAST(:state AS jsonb))"
            " ON CONFLICT (saga_id) DO UPDATE SET status = EXCLUDED.status,"
            " current_step = EXCLUDED.current_step, direction = EXCLUDED.direction,"
            " attempt = EXCLUDED.attempt, version = EXCLUDED.version,"
            " deadline_at = EXCLUDED.deadline_at, due_at = EXCLUDED.due_at,"
            " updated_at = EXCLUDED.updated_at, state = EXCLUDED.state"
        ),
        [
            {"saga_id": s.saga_id, "saga_type": s.saga_type, "business_key": s.business_key,
             "definition_version": s.definition_version, "status": s.status.value, "step": s.step,
             "direction": s.direction.value if s.direction else None, "attempt": s.attempt,
             "version": s.version, "deadline_at": s.deadline_at, "due_at": s.due_at,
             "requested_at": s.requested_at, "now": now, "state": json.dumps(s.to_json())}
            for s in states
        ],
    )


async def insert_dead_letters(conn: AsyncConnection, rows: Sequence[DeadLetterRow]) -> None:
    await conn.execute(
        text(
            "INSERT INTO dead_letters (dead_letter_id, stage, reason_code, reason, error_class,"
            " original_topic, original_partition, original_offset, original_key, payload, headers,"
            " attempts, first_failed_at, last_failed_at, saga_id, saga_type, business_key)"
            " VALUES (:id, :stage, :reason_code, :reason, :error_class, :topic, :partition,"
            " :offset, :key, :payload, CAST(:headers AS jsonb), :attempts, :first, :at,"
            " :saga_id, :saga_type, :business_key)"
            " ON CONFLICT (dead_letter_id) DO NOTHING"
        ),
        [
            {"id": d.dead_letter_id, "stage": d.stage, "reason_code": d.reason_code,
             "reason": d.reason, "error_class": d.error_class, "topic": d.original_topic,
             "partition": d.original_partition, "offset": d.original_offset,
             "key": d.original_key, "payload": d.payload, "headers": json.dumps(d.headers),
             "attempts": d.attempts, "first": d.first_failed_at or d.failed_at,
             "at": d.failed_at, "saga_id": d.saga_id, "saga_type": d.saga_type,
             "business_key": d.business_key}
            for d in rows
        ],
    )


def parse_event(payload: Any) -> SagaEvent:
    return SAGA_EVENT_ADAPTER.validate_python(json_value(payload))


async def rebuild_projection(conn: AsyncConnection) -> int:
    """Rebuild the `sagas` projection from the event log alone, in the caller's transaction.

    Returns the number of sagas rebuilt. Timestamps come from the events (first and last
    `recorded_at`), everything else from `fold`.
    """
    from orchestrator.core.saga import fold

    await conn.execute(text("DELETE FROM sagas"))
    result = await conn.stream(text(
        "SELECT saga_id, payload, recorded_at, trace_id FROM saga_events"
        " ORDER BY saga_id, seq"))
    rebuilt = 0
    current: Any = None
    events: list[SagaEvent] = []
    first_at: datetime | None = None
    last_at: datetime | None = None
    trace_id: str | None = None

    async def flush() -> None:
        state = fold(events)
        assert state is not None and first_at is not None and last_at is not None
        await upsert_projection(conn, [state], last_at)
        # The trace context from the events' trace id (an upstream's tracestate is not in the
        # events: a rebuilt row passes on none).
        await conn.execute(text(
            "UPDATE sagas SET created_at = :at, traceparent = :traceparent"
            " WHERE saga_id = :id"),
            {"at": first_at, "id": state.saga_id,
             "traceparent": (f"00-{trace_id}-{saga_span_id(state.saga_id)}-01"
                             if trace_id else None)})

    async for row in result:
        if row.saga_id != current:
            if current is not None:
                await flush()
                rebuilt += 1
            current, events, first_at, trace_id = row.saga_id, [], row.recorded_at, None
        events.append(parse_event(row.payload))
        trace_id = trace_id or row.trace_id
        last_at = row.recorded_at
    if current is not None:
        await flush()
        rebuilt += 1
    return rebuilt


async def in_flight_definitions(conn: AsyncConnection) -> dict[tuple[str, int], int]:
    """How many sagas in flight run on each (saga type, definition version): the definitions a
    deployment must still have (read through the in-flight partial index's statuses)."""
    rows = (await conn.execute(text(
        "SELECT saga_type, definition_version, count(*) AS n FROM sagas"
        " WHERE status IN ('RUNNING', 'COMPENSATING')"
        " GROUP BY saga_type, definition_version"))).all()
    return {(row.saga_type, row.definition_version): row.n for row in rows}
