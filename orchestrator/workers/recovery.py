"""The recovery worker: brings home sagas that nothing else would move.

Nothing in a consumer waits: a retry's backoff and a command's deadline are the saga's `due_at`
in PostgreSQL. This worker scans the in-flight sagas that are due (through the partial index
`sagas_due`), asks the pure core what to do (`decide_due`: start the scheduled retry, re-send an
unanswered command under the same command id, or give up and compensate / fail), and records
the result like the orchestrator does: events, projection and outbox in one transaction, then
publishes the commands at once.

Several recovery workers may run side by side: rows are taken `FOR UPDATE SKIP LOCKED`, so each
due saga is leased to exactly one of them for the length of its transaction, and the event
store's `(saga_id, seq)` key fences everything else: a write decided on a state that another
writer (an orchestrator folding a reply, a zombie) has moved on from is refused.

It also runs the outbox relay's sweep, so an outbox row left unpublished is recovered even when
no relay runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid5

from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient
from opentelemetry.trace import Span
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator import metrics, tracing
from orchestrator.consuming.handling import fit_dead_letter
from orchestrator.core.saga import (
    SagaState,
    decide_due,
    evolve,
    outstanding_commands,
)
from orchestrator.core.saga_type import SagaType, SagaTypes
from orchestrator.crash import crash_point, step_tags
from orchestrator.errors import SagaError
from orchestrator.kafka.consumer import (
    PARTICIPANTS,
    all_topics,
    encode_headers,
    ensure_topics,
    listed_topics,
    trim_committed,
)
from orchestrator.kafka.producer import KafkaProducer, Record
from orchestrator.logs import saga_fields
from orchestrator.metrics import DEAD_LETTERS, RECOVERY_ACTIONS, SAGAS_FAILED
from orchestrator.postgres import store
from orchestrator.settings import Settings
from orchestrator.throttle import LogThrottle
from orchestrator.tracing import TraceContext
from orchestrator.workers.relay import OutboxRelay, PublishedMarker, publish_committed
from orchestrator.workers.saga_worker import observe_ended, outcome_row, traced_command_rows
from schemas import (
    TOPIC_DEAD_LETTERS,
    DeadLetter,
    RejectionCode,
    StepStarted,
    StepTimedOut,
    step_topic,
)

log = logging.getLogger(__name__)

_RECOVERY_DEAD_LETTER = UUID("4d2b8f0e-7c1a-4e9b-8f3d-2a6c5e0b9d71")
# The `original_topic` of a FAILED saga's dead letter: no Kafka record caused it, so there is
# nothing to redrive; an operator resolves the saga (see docs/operations/runbook.md).
RECOVERY_SOURCE = "saga.recovery"
RECOVERY_STAGE = "recovery"


@dataclass
class RecoveryPass:
    """What one pass did, for logs and tests."""

    scanned: int = 0
    unreadable: int = 0
    retried: int = 0
    resent: int = 0
    gave_up: int = 0
    failed: list[UUID] = field(default_factory=list)

    @property
    def acted(self) -> int:
        return self.retried + self.resent + self.gave_up


class RecoveryWorker:
    def __init__(self, settings: Settings, engine: AsyncEngine, producer: KafkaProducer,
                 sagas: Sequence[SagaType[Any]] | SagaTypes) -> None:
        self.settings = settings
        self.engine = engine
        self.producer = producer
        # Each saga is decided on the definition it started on: its type's, of its version.
        self.sagas = sagas if isinstance(sagas, SagaTypes) else SagaTypes(sagas)
        self.actor = settings.worker_name or "recovery"
        self.marker = PublishedMarker(engine)
        self._throttle = LogThrottle()  # for a publish failure that repeats every pass
        self.relay = OutboxRelay(settings, engine, producer)
        # Kept by `keep_topics`; recovery pauses while the broker does not answer.
        self.broker_reachable = True

    async def recover_once(self, now: datetime | None = None) -> RecoveryPass:
        """One pass over the sagas due at `now` (default: the clock), at most
        `recovery_batch_max` of them."""
        now = now or datetime.now(UTC)
        done = RecoveryPass()
        events: list[store.NewEvent] = []
        states: list[SagaState] = []
        outbox: list[store.OutboxRow] = []
        dead_letters: list[store.DeadLetterRow] = []
        touched: list[SagaState] = []
        # Each saga's trace context, as stored (or first given, for a saga from before 0010).
        traces: dict[UUID, store.StoredTrace] = {}
        contexts: dict[UUID, TraceContext] = {}
        spans: list[Span] = []  # with tracing on: this pass's spans, ended once committed
        async with self.engine.begin() as conn:
            rows = (await conn.execute(
                text(
                    "SELECT saga_id, saga_type, state, traceparent, tracestate FROM sagas"
                    " WHERE status IN ('RUNNING', 'COMPENSATING')"
                    " AND due_at <= :now ORDER BY due_at LIMIT :n FOR UPDATE SKIP LOCKED"
                ),
                {"now": now, "n": self.settings.recovery_batch_max},
            )).all()
            done.scanned = len(rows)
            for row in rows:
                try:
                    state = SagaState.from_json(store.json_value(row.state))
                    definition = self.sagas.definition_of(state)
                    decision = decide_due(definition, state, now)
                except Exception:
                    # One saga this worker cannot read (a saga type or definition version from
                    # a newer deployment, a state it cannot parse) must not stop recovery of
                    # the rest.
                    done.unreadable += 1
                    # Its id only: the state holds the saga's input (accounts, reference).
                    log.exception("cannot decide on a due saga (row skipped)",
                                  extra=saga_fields(row.saga_type, row.saga_id))
                    continue
                if decision is None:
                    continue  # not due after all: the row's due_at was older than its state
                self._tally(decision.events, done)
                touched.append(state)
                trace = tracing.stored_context(state.saga_id, row.traceparent, row.tracestate)
                contexts[state.saga_id] = trace
                traces[state.saga_id] = store.StoredTrace(trace.traceparent, trace.state)
                if tracing.ENABLED:
                    spans.append(tracing.start_span(
                        "saga recovery", trace, attributes={
                            **tracing.saga_attributes(state.saga_type, state.saga_id,
                                                      state.business_key, state.step,
                                                      state.attempt, state.direction
                                                      and state.direction.value),
                            "saga.recovery.events": ",".join(e.type for e in decision.events)},
                        start=now))
                cause = f"recovery:{now.isoformat()}"
                for event in decision.events:
                    state = evolve(state, event)
                    events.append(store.NewEvent(state.saga_id, state.version, event,
                                                 self.actor, cause, trace.trace_id))
                states.append(state)
                touched.append(state)
                outbox += traced_command_rows(self.settings, definition, decision.commands,
                                              trace, spans)
                # The saga's outcome event, if it ended: in this transaction, with its end.
                outbox += [outcome_row(self.settings, self.sagas, outcome, trace)
                           for outcome in decision.outcomes]
                if decision.saga_failed:
                    done.failed.append(state.saga_id)
                    record, row_ = self._dead_letter(state, now, trace)
                    dead_letters.append(row_)
                    outbox.append(store.OutboxRow(
                        topic=record.topic, key=record.key, value=record.value,
                        headers=encode_headers(record.headers), saga_id=state.saga_id))
            if not events:
                return done
            # The step filter of a crash plan sees each saga's steps as found and as left (every
            # member of a parallel group that is out).
            tags = step_tags({(s.step, s.direction.value) for s in touched
                              if s.step is not None and s.direction is not None}
                             | {(run.step, run.direction.value) for s in touched
                                for run in s.runs})
            crash_point("recovery.before_commit", tags)
            write = tracing.deferred_database_span(spans[0] if spans else None, "INSERT",
                                                   "saga_events")
            with write:
                ids = await store.write_batch(conn, "recovery", [], events, states, outbox,
                                              dead_letters, now, traces)
        crash_point("recovery.after_commit", tags)
        if spans:
            tracing.emit(write)
            tracing.end_all(spans)
            ended = datetime.now(UTC)
            for state in states:
                if state.terminal:
                    tracing.emit_saga_span(state.saga_id, state.saga_type, state.business_key,
                                           state.status.value, contexts[state.saga_id],
                                           state.requested_at or now, ended, state.failure)
        # Counted only now: a pass that rolls back (a crash, a cancelled or refused write)
        # did nothing, and an exported retry must already be visible in the event store.
        for action, count in (("retry", done.retried), ("resend", done.resent),
                              ("gave_up", done.gave_up)):
            if count:
                RECOVERY_ACTIONS.add(count, {"action": action})
        for dead in dead_letters:
            DEAD_LETTERS.add(1, {"stage": dead.stage, "reason": dead.reason_code})
        if metrics.RECORDING:
            observe_ended(states, now)
        for saga_id in done.failed:
            SAGAS_FAILED.add(1, {"stage": "recovery"})
            log.error("saga %s FAILED in recovery and was dead-lettered", saga_id,
                      extra={"saga_id": str(saga_id), "trace_id": contexts[saga_id].trace_id})
        await publish_committed(self.producer, self.marker, self._throttle, outbox, ids,
                                "recovery")
        return done

    @staticmethod
    def _tally(events: Sequence[object], done: RecoveryPass) -> None:
        """Count what a decision did: several actions when members of a parallel group were
        due together. A step started after a give-up (a compensation, attempt 1) is the
        consequence of giving up, not a retry."""
        for event in events:
            if isinstance(event, StepStarted) and event.attempt > 1:
                done.retried += 1
            elif isinstance(event, StepTimedOut):
                if event.gave_up:
                    done.gave_up += 1
                else:
                    done.resent += 1

    def _dead_letter(self, state: SagaState, now: datetime, trace: TraceContext
                     ) -> tuple[Record, store.DeadLetterRow]:
        """A FAILED saga has no consumed message to set aside: its dead letter carries the
        saga's state, so the operator has the saga's input and where it stopped in one
        record."""
        assert state.step is not None
        topic = RECOVERY_SOURCE
        payload = json.dumps(state.to_json()).encode()
        letter = DeadLetter(
            dead_letter_id=uuid5(_RECOVERY_DEAD_LETTER, f"{state.saga_id}:{state.version}"),
            reason_code=RejectionCode.STEP_TIMED_OUT,
            reason=state.failure or "timed out",
            error_class=f"recovery.{RejectionCode.STEP_TIMED_OUT.value}",
            original_topic=topic, original_partition=None, original_offset=None,
            original_key=str(state.saga_id),
            attempts=state.attempt + state.resends,
            first_failed_at=state.requested_at or now, last_failed_at=now,
            saga_id=state.saga_id, saga_type=state.saga_type, business_key=state.business_key,
        )
        row = store.DeadLetterRow(
            dead_letter_id=letter.dead_letter_id, stage=RECOVERY_STAGE,
            reason_code=letter.reason_code.value, reason=letter.reason,
            error_class=letter.error_class, original_topic=topic, original_partition=None,
            original_offset=None, original_key=letter.original_key, payload=payload,
            headers=encode_headers([("type", b"SagaState")]), failed_at=now,
            saga_id=state.saga_id, saga_type=state.saga_type, business_key=state.business_key,
            attempts=letter.attempts, first_failed_at=letter.first_failed_at,
        )
        record = fit_dead_letter(self.settings.topic(TOPIC_DEAD_LETTERS), payload,
                                 str(state.saga_id).encode(),
                                 [("type", b"SagaState"), *trace.headers()], letter)
        return record, row

    async def restore_after_broker_loss(self, last_answer_at: datetime) -> int:
        """Give the broker back what only it held, after it was lost (a crash, a restart): it
        may have lost its logs, or their last seconds, and records it lost were never read.

        - every in-flight saga's outstanding commands (one per member of a parallel group that
          is out) are sent again at once, as they were (same command ids;
          `outstanding_commands`), rather than after their step deadlines: a command, or the
          participant's reply to it, may be gone;
        - every other outbox row published since `broker_loss_republish_s` before the broker's
          last answer is published again (dead-letter copies).

        Receivers deduplicate both. The commands go through the outbox, so the relay publishes
        any this pass cannot. Returns how many commands it re-sent."""
        since = last_answer_at - timedelta(seconds=self.settings.broker_loss_republish_s)
        step_topics = [self.settings.topic(step_topic(name)) for name in PARTICIPANTS]
        outbox: list[store.OutboxRow] = []
        async with self.engine.begin() as conn:
            republished = (await conn.execute(text(
                "UPDATE outbox SET published_at = NULL WHERE published_at >= :since"
                " AND set_aside_at IS NULL AND NOT topic = ANY(:step_topics)"),
                {"since": since, "step_topics": step_topics})).rowcount
            rows = (await conn.execute(text(
                "SELECT saga_id, saga_type, state, traceparent, tracestate FROM sagas"
                " WHERE status IN ('RUNNING', 'COMPENSATING')"))).all()
            spans: list[Span] = []
            for row in rows:
                try:
                    state = SagaState.from_json(store.json_value(row.state))
                    definition = self.sagas.definition_of(state)
                    commands = outstanding_commands(definition, state)
                except Exception:
                    log.exception("cannot read an in-flight saga (skipped)",
                                  extra=saga_fields(row.saga_type, row.saga_id))
                    continue
                # Re-sent in the saga's trace (from spans of their own, with tracing on).
                outbox += traced_command_rows(
                    self.settings, definition, commands,
                    tracing.stored_context(state.saga_id, row.traceparent, row.tracestate),
                    spans)
            ids = (await store.write_batch(conn, "recovery", [], [], [], outbox, [],
                                           datetime.now(UTC)) if outbox else [])
        tracing.end_all(spans)
        await publish_committed(self.producer, self.marker, self._throttle, outbox, ids,
                                "broker-restore")
        RECOVERY_ACTIONS.add(len(outbox), {"action": "broker_restore"})
        log.warning("the broker was lost: re-sent the %d commands in-flight sagas wait on and "
                    "queued %d outbox rows published since %s to be published again",
                    len(outbox), republished, since.isoformat())
        return len(outbox)

    async def keep_topics(self, stop: asyncio.Event, every_s: float = 1.0) -> None:
        """Re-create missing topics, tell whether the broker answers at all, and restore what
        a lost broker held (`restore_after_broker_loss`).

        A broker that keeps nothing (tansu) comes back from a restart empty, and noida may come
        back without its last seconds; producers do not auto-create topics (they would pick
        the broker's partition count), so this is what lets every worker resume. While the
        broker does not answer, recovery pauses: an outage of the transport must not spend
        the sagas' attempts. The broker counts as lost when it did not answer, when every
        connection to it dropped (its client's error callback: a restart faster than a check
        is still seen), or when topics are missing."""
        lost = threading.Event()

        def on_error(error: KafkaError) -> None:
            if error.code() == KafkaError._ALL_BROKERS_DOWN:
                lost.set()

        assert self.settings.kafka_bootstrap
        config: dict[str, Any] = {"bootstrap.servers": self.settings.kafka_bootstrap,
                                  "error_cb": on_error}
        admin = AdminClient(config)
        last_answer_at: datetime | None = None
        while not stop.is_set():
            try:
                present = await asyncio.to_thread(listed_topics, admin, 2.0)
                start_topics = [name for t in self.sagas.values()
                                for name in (t.start_topic, t.events_topic)]
                wanted = {*all_topics(self.settings),
                          *(self.settings.topic(name) for name in start_topics)}
                missing = sorted(name for name in wanted if name not in present)
                if missing:
                    log.warning("topics missing on the broker (restarted?): %s; creating them",
                                ", ".join(missing))
                    # every saga type's start and events topic, not only those the engine lists
                    await asyncio.to_thread(ensure_topics, self.settings, start_topics)
                    lost.set()
                await asyncio.to_thread(admin.poll, 0)  # serves the error callback
                if not self.broker_reachable:
                    log.warning("the broker answers again: recovery resumes")
                    lost.set()
                self.broker_reachable = True
                if lost.is_set() and last_answer_at is not None:
                    lost.clear()
                    await self.restore_after_broker_loss(last_answer_at)
                lost.clear()
                last_answer_at = datetime.now(UTC)
            except Exception as error:
                if self.broker_reachable:
                    log.warning("cannot reach the broker (%s): recovery pauses", error)
                self.broker_reachable = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    async def keep_logs_trimmed(self, stop: asyncio.Event, every_s: float = 30.0) -> None:
        """With `kafka_trim_committed` (the embedded noida), delete what every consumer group
        committed every `every_s`, so a long-running stack's logs and snapshots stay bounded
        (`orchestrator.kafka.consumer.trim_committed`)."""
        while self.settings.kafka_trim_committed and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
            if stop.is_set() or not self.broker_reachable:
                continue
            try:
                deleted = await asyncio.to_thread(trim_committed, self.settings)
                if deleted:
                    log.info("trimmed %d records every consumer group had committed", deleted)
            except Exception as error:
                if (left_out := self._throttle.admit("trim")) is not None:
                    log.warning("could not trim the broker's logs (%s); %d such lines left out",
                                error, left_out)

    async def sample_gauges(self) -> None:
        """Read what the database gauges show (`orchestrator.metrics.store_gauges`): sagas in
        flight by type and status (through the partial index of the in-flight statuses),
        the outbox backlog and its oldest row's age (through `outbox_pending`), and the dead
        letters not redriven yet by reason. One read-only transaction of three statements."""
        async with self.engine.connect() as conn:
            # Every type's in-flight statuses, 0 when none: a dashboard sees them drain.
            in_flight = {(name, status): 0 for name in self.sagas
                         for status in ("RUNNING", "COMPENSATING")}
            in_flight |= {(row.saga_type, row.status): row.n for row in await conn.execute(text(
                "SELECT saga_type, status, count(*) AS n FROM sagas"
                " WHERE status IN ('RUNNING', 'COMPENSATING') GROUP BY 1, 2"))}
            backlog = (await conn.execute(text(
                "SELECT count(*) AS n, COALESCE(EXTRACT(EPOCH FROM clock_timestamp()"
                " - min(created_at)), 0) AS age_s FROM outbox"
                " WHERE published_at IS NULL AND set_aside_at IS NULL"))).one()
            pending = {row.reason_code: row.n for row in await conn.execute(text(
                "SELECT reason_code, count(*) AS n FROM dead_letters WHERE redriven_at IS NULL"
                " GROUP BY 1"))}
        metrics.store_gauges(in_flight, int(backlog.n), float(backlog.age_s), pending)

    async def keep_gauges_sampled(self, stop: asyncio.Event) -> None:
        """Sample the database gauges every `metrics_sample_s` while metrics are exported;
        an export serves the last sample, so no export and no message waits for this query."""
        while metrics.RECORDING and not stop.is_set():
            try:
                await self.sample_gauges()
            except Exception as error:
                if (left_out := self._throttle.admit("gauges")) is not None:
                    log.warning("could not sample the database gauges (%s); %d such lines "
                                "left out", type(error).__name__, left_out)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.metrics_sample_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Scan for due sagas every `recovery_poll_s` (at once again after a full batch), and
        sweep the outbox, keep the topics, trim the logs and sample the database's gauges
        beside it, until `stop` is set."""
        relay = asyncio.create_task(self.relay.run(stop), name="recovery-outbox-sweep")
        topics = asyncio.create_task(self.keep_topics(stop), name="recovery-topics")
        trim = asyncio.create_task(self.keep_logs_trimmed(stop), name="recovery-trim")
        gauges = asyncio.create_task(self.keep_gauges_sampled(stop), name="recovery-gauges")
        try:
            while not stop.is_set():
                if not self.broker_reachable:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.settings.recovery_poll_s)
                    continue
                try:
                    done = await self.recover_once()
                except SagaError as error:
                    log.warning("recovery pass failed (%s); retrying shortly", error)
                    done = RecoveryPass()
                except Exception:
                    log.exception("recovery pass failed; retrying shortly")
                    done = RecoveryPass()
                if done.acted:
                    log.info("recovery: %d retried, %d re-sent, %d gave up, %d failed",
                             done.retried, done.resent, done.gave_up, len(done.failed))
                if done.scanned < self.settings.recovery_batch_max:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.settings.recovery_poll_s)
        finally:
            await relay
            await topics
            await trim
            await gauges
            await self.marker.close()
