"""The outbox relay: the guarantee that every outbox row is published.

The orchestrator publishes its own outbox rows right after its transaction commits and marks them
published (the fast path: a step command does not wait for a relay). The relay sweeps up whatever
that left behind: rows of a worker that crashed between commit and publish, rows whose marking was
lost, and rows written by other writers (participants' dead letters). It takes rows older than
`relay_grace_s`, oldest first, publishes them with an idempotent producer keyed as written, and
marks them published after the broker acknowledged them.

A row published twice (the fast path and the relay racing, or a crash between publish and mark)
is harmless: every receiver deduplicates (the orchestrator's inbox, participants' stored replies).
Rows are taken `FOR UPDATE SKIP LOCKED`, so several relays can run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.bus import decode_headers
from orchestrator.crash import crash_point
from orchestrator.producer import KafkaProducer, Record
from orchestrator.settings import Settings
from orchestrator.store import json_value, mark_published

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(self, settings: Settings, engine: AsyncEngine, producer: KafkaProducer) -> None:
        self.settings = settings
        self.engine = engine
        self.producer = producer
        self.published = 0

    async def publish_once(self, grace_s: float | None = None) -> int:
        """Publish up to one batch of rows pending for longer than `grace_s`; returns how many."""
        grace = self.settings.relay_grace_s if grace_s is None else grace_s
        async with self.engine.begin() as conn:
            rows = (await conn.execute(
                text(
                    "SELECT id, topic, key, value, headers FROM outbox WHERE published_at IS NULL"
                    " AND created_at < clock_timestamp() - make_interval(secs => :grace)"
                    " ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED"
                ),
                {"n": self.settings.relay_batch_max, "grace": grace},
            )).all()
            if not rows:
                return 0
            await self.producer.send([
                Record(topic=row.topic, value=bytes(row.value),
                       key=bytes(row.key) if row.key is not None else None,
                       headers=decode_headers(json_value(row.headers)))
                for row in rows
            ])
            crash_point("relay.after_publish")
            await mark_published(conn, [row.id for row in rows])
        self.published += len(rows)
        log.info("relay published %d rows the fast path had left", len(rows))
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                published = await self.publish_once()
            except Exception:
                log.exception("relay pass failed; retrying shortly")
                published = 0
            if published < self.settings.relay_batch_max:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.relay_idle_poll_s)


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
