"""The outbox relay: publishes outbox rows in id order, then marks them published.

It wakes on the `NOTIFY` sent by each committing batch, and polls every `relay_idle_poll_s` in
case a notification was missed (for example while it was reconnecting). A crash between publish
and mark republishes the rows: receivers deduplicate (the orchestrator's inbox, participants'
stored replies), so at-least-once here is exactly-once in effect.

Rows are taken `FOR UPDATE SKIP LOCKED`, so several relays can run; one saga has at most one
command outstanding, so its messages cannot overtake each other across relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.bus import KafkaProducer, Record, decode_headers
from orchestrator.settings import Settings
from orchestrator.store import OUTBOX_CHANNEL

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(self, settings: Settings, engine: AsyncEngine, producer: KafkaProducer) -> None:
        self.settings = settings
        self.engine = engine
        self.producer = producer
        self.published = 0
        self._wake = asyncio.Event()

    async def publish_once(self) -> int:
        """Publish up to one batch of pending rows. Returns how many were published."""
        async with self.engine.begin() as conn:
            rows = (await conn.execute(
                text(
                    "SELECT id, topic, key, value, headers FROM outbox WHERE published_at IS NULL"
                    " ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED"
                ),
                {"n": self.settings.relay_batch_max},
            )).all()
            if not rows:
                return 0
            records = [
                Record(topic=row.topic, value=bytes(row.value),
                       key=bytes(row.key) if row.key is not None else None,
                       headers=decode_headers(_json(row.headers)))
                for row in rows
            ]
            await self.producer.send(records)
            await conn.execute(
                text("UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY(:ids)"),
                {"ids": [row.id for row in rows]},
            )
        self.published += len(rows)
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        listener = asyncio.create_task(self._listen(stop))
        try:
            while not stop.is_set():
                try:
                    published = await self.publish_once()
                except Exception:
                    log.exception("relay pass failed; retrying shortly")
                    await asyncio.sleep(0.5)
                    continue
                if published < self.settings.relay_batch_max:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.settings.relay_idle_poll_s)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self, stop: asyncio.Event) -> None:
        """Hold one connection that LISTENs; reconnect if it drops."""
        while not stop.is_set():
            try:
                async with self.engine.connect() as conn:
                    raw = (await conn.get_raw_connection()).driver_connection
                    assert raw is not None
                    await raw.add_listener(OUTBOX_CHANNEL, self._on_notify)
                    self._wake.set()  # anything committed before we listened
                    while not raw.is_closed():
                        # Wakes at once on stop, else checks the connection once a second.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), 1.0)
                        if stop.is_set():
                            return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox listener lost its connection; reconnecting")
                await asyncio.sleep(0.5)

    def _on_notify(self, *_args: Any) -> None:
        self._wake.set()


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
