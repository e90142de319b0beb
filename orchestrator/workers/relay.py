"""The outbox relay: the guarantee that every outbox row is published.

The orchestrator publishes its own outbox rows right after its transaction commits and marks them
published (the fast path: a step command does not wait for a relay). The relay sweeps up whatever
that left behind: rows of a worker that crashed between commit and publish, rows whose marking was
lost, and rows written by other writers (participants' dead letters). It takes rows older than
`relay_grace_s`, oldest first, publishes them with an idempotent producer keyed as written, and
marks each one published for its own acknowledgement: a row that is not acknowledged never makes
the others go out again.

A row the broker refuses is counted (`attempts`, `last_error`). Refused for what it is (too
large, invalid: `RecordRefused`), the same bytes would be refused again, so it is set aside at
once; refused for its topic (unknown, not authorized: `TopicRefused`), which can heal, it is tried
again with backoff and set aside after `SAGA_OUTBOX_MAX_ATTEMPTS`. A set-aside row is never tried
again by the relay; `saga check` reports it as a finding and `saga stuck` lists it. A transient
failure (a timeout, a lost broker) is not counted: an outage never sets a row aside.

A row published twice (the fast path and the relay racing, or a crash between publish and mark)
is harmless: every receiver deduplicates (the orchestrator's inbox, participants' stored replies).
Rows are taken `FOR UPDATE SKIP LOCKED`, so several relays can run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.crash import crash_point
from orchestrator.errors import RecordRefused, SagaError
from orchestrator.kafka.consumer import decode_headers
from orchestrator.kafka.producer import DELIVERY_TIMEOUT_S, KafkaProducer, Record
from orchestrator.metrics import OUTBOX_SET_ASIDE
from orchestrator.postgres.store import (
    OutboxRow,
    Refusal,
    RefusalRecorded,
    json_value,
    mark_published,
    record_refusals,
)
from orchestrator.settings import Settings
from orchestrator.throttle import LogThrottle

log = logging.getLogger(__name__)

# The wait after a refusal for the topic: 0.5 s, doubling with each one, at most 30 s. With the
# default of 5 attempts a row is set aside some 8 s after its first refusal (plus the producer's
# 10 s wait for an unknown topic to appear), long enough for the recovery worker to re-create
# the topics of a restarted broker.
REFUSAL_BACKOFF_S = 0.5
REFUSAL_BACKOFF_MAX_S = 30.0
# A relay pass's transaction may sit idle this long while the broker answers (see publish_once).
_PASS_MAX_S = DELIVERY_TIMEOUT_S + 15


class OutboxRelay:
    def __init__(self, settings: Settings, engine: AsyncEngine, producer: KafkaProducer) -> None:
        self.settings = settings
        self.engine = engine
        self.producer = producer
        self.published = 0
        self.set_aside = 0
        self._throttle = LogThrottle()

    async def publish_once(self, grace_s: float | None = None) -> int:
        """Publish up to one batch of rows pending for longer than `grace_s`; returns how many
        were acknowledged (and marked published)."""
        grace = self.settings.relay_grace_s if grace_s is None else grace_s
        async with self.engine.begin() as conn:
            # The rows stay locked while the broker answers, which can take up to the
            # producer's delivery timeout (10 s for an unknown topic): the session's shorter
            # idle-in-transaction limit (meant for frozen workers) would end the pass and undo
            # the marks of the rows that were acknowledged, which would then go out again.
            await conn.execute(text(
                f"SET LOCAL idle_in_transaction_session_timeout = '{_PASS_MAX_S}s'"))
            rows = (await conn.execute(
                text(
                    "SELECT id, topic, key, value, headers FROM outbox WHERE published_at IS NULL"
                    " AND set_aside_at IS NULL"
                    " AND created_at < clock_timestamp() - make_interval(secs => :grace)"
                    " AND (next_attempt_at IS NULL OR next_attempt_at <= clock_timestamp())"
                    " ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED"
                ),
                {"n": self.settings.relay_batch_max, "grace": grace},
            )).all()
            if not rows:
                return 0
            results = await self.producer.deliver([
                Record(topic=row.topic, value=bytes(row.value),
                       key=bytes(row.key) if row.key is not None else None,
                       headers=decode_headers(json_value(row.headers)))
                for row in rows
            ])
            crash_point("relay.after_publish")
            published = [row.id for row, error in zip(rows, results, strict=True)
                         if error is None]
            if published:
                await mark_published(conn, published)
            refused = {row.id: error for row, error in zip(rows, results, strict=True)
                       if isinstance(error, RecordRefused)}
            recorded = await record_refusals(
                conn, [Refusal(row_id, str(error), final=not error.retryable)
                       for row_id, error in refused.items()],
                self.settings.outbox_max_attempts, REFUSAL_BACKOFF_S, REFUSAL_BACKOFF_MAX_S)
        # Counted and logged only after the commit: a pass that rolled back changed nothing.
        self.published += len(published)
        if published:
            log.info("relay published %d rows the fast path had left", len(published))
        self._report(refused, recorded)
        transient = [error for error in results
                     if error is not None and not isinstance(error, RecordRefused)]
        if transient:
            self._warn(("transient",), "relay: %d of %d rows not acknowledged (%s); they are "
                       "sent again on a later pass", len(transient), len(rows), transient[0])
        return len(published)

    def _report(self, refused: dict[int, RecordRefused],
                recorded: list[RefusalRecorded]) -> None:
        for row in recorded:
            code = refused[row.outbox_id].code
            if row.set_aside:
                self.set_aside += 1
                OUTBOX_SET_ASIDE.add(1, {"code": code})
                # Once per row: it is never tried again.
                log.error("set aside outbox row %d for %s after %d refusal(s): %s; the relay "
                          "will not publish it (see docs/operations/runbook.md, set-aside "
                          "outbox rows)", row.outbox_id, row.topic, row.attempts, row.error)
            else:
                self._warn(("refused", row.outbox_id, code),
                           "outbox row %d for %s refused (attempt %d of %d): %s; trying it "
                           "again with backoff", row.outbox_id, row.topic, row.attempts,
                           self.settings.outbox_max_attempts, row.error)

    def _warn(self, key: tuple[object, ...], message: str, *args: object) -> None:
        """A warning that may repeat every pass: at most one line per key per 30 s."""
        left_out = self._throttle.admit(key)
        if left_out is None:
            return
        if left_out:
            message += f" ({left_out} more like this since the last such line)"
        log.warning(message, *args)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                published = await self.publish_once()
            except SagaError as error:
                # Known kinds (the database or the broker away): one line, no traceback.
                self._warn(("pass", type(error).__name__), "relay pass failed (%s: %s); "
                           "retrying shortly", type(error).__name__, error)
                published = 0
            except Exception as error:
                if self._throttle.admit(("pass", type(error).__name__)) is not None:
                    log.exception("relay pass failed; retrying shortly")
                published = 0
            if published < self.settings.relay_batch_max:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.relay_idle_poll_s)


async def publish_committed(producer: KafkaProducer, marker: PublishedMarker,
                            throttle: LogThrottle, rows: Sequence[OutboxRow], ids: Sequence[int],
                            who: str) -> int:
    """Publish outbox rows right after the transaction that wrote them committed (`ids` in the
    order of `rows`), and mark the acknowledged ones published. Any other stays unpublished for
    the relay's sweep, which sends it after its grace or counts the broker's refusal of it; a
    failure that repeats is logged once per `throttle` period. Returns how many were
    acknowledged."""
    results = await producer.deliver([
        Record(o.topic, o.value, o.key, decode_headers(o.headers)) for o in rows])
    acknowledged = [row_id for row_id, error in zip(ids, results, strict=True) if error is None]
    marker.add(acknowledged)
    if len(acknowledged) < len(rows):
        error = next(error for error in results if error is not None)
        if (left_out := throttle.admit(type(error).__name__)) is not None:
            log.warning("%s publish failed for %d of %d rows (%s); the relay will publish them"
                        " (%d such lines left out)", who, len(rows) - len(acknowledged),
                        len(rows), error, left_out)
    return len(acknowledged)


class PublishedMarker:
    """Marks fast-path outbox rows published, off the critical path: ids are gathered and
    written in one UPDATE every `interval_s`. Losing a mark only costs a duplicate publish."""

    def __init__(self, engine: AsyncEngine, interval_s: float = 0.2) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self._pending: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, ids: list[int]) -> None:
        self._pending.extend(ids)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.interval_s)
        await self.flush()

    async def flush(self) -> None:
        ids, self._pending = self._pending, []
        if not ids:
            return
        try:
            async with self.engine.begin() as conn:
                await mark_published(conn, ids)
        except Exception:
            log.exception("could not mark %d outbox rows published; the relay will resend them",
                          len(ids))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
