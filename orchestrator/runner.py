"""Run one worker (orchestrator, a participant, or the relay) until told to stop.

The CLI runs each in its own process (`saga worker ...`); tests and `saga dev` may run several in
one event loop. Each worker migrates the schema (idempotent, under a lock) and creates its topics
before it starts, so workers can be started in any order.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.bus import ORCHESTRATOR_GROUP, BatchConsumer, ensure_topics
from orchestrator.errors import ConfigurationError
from orchestrator.producer import KafkaProducer
from orchestrator.recovery import RecoveryWorker
from orchestrator.relay import OutboxRelay
from orchestrator.settings import Settings, worker_name
from orchestrator.store import create_engine, migrate
from orchestrator.worker import OrchestratorWorker

if TYPE_CHECKING:
    from steps.runtime import ParticipantWorker

log = logging.getLogger(__name__)

WORKER_KINDS = ("orchestrator", "relay", "recovery", "participant:risk", "participant:ledger",
                "participant:notify")


def make_participant(name: str, settings: Settings) -> Any:
    from steps import LedgerParticipant, NotifyParticipant, RiskParticipant

    factories: dict[str, Callable[[], Any]] = {
        "ledger": LedgerParticipant,
        "risk": lambda: RiskParticipant(settings),
        "notify": NotifyParticipant,
    }
    if name not in factories:
        raise ConfigurationError(f"no participant {name!r}; known: {', '.join(factories)}")
    return factories[name]()


def _require_addresses(settings: Settings) -> None:
    if not settings.database_url or not settings.kafka_bootstrap:
        raise ConfigurationError("SAGA_DATABASE_URL and SAGA_KAFKA_BOOTSTRAP must both be set")


async def prepare(settings: Settings) -> AsyncEngine:
    _require_addresses(settings)
    assert settings.database_url
    engine = create_engine(settings.database_url, settings.db_pool_size,
                           settings.db_idle_in_transaction_timeout_s)
    await migrate(engine)
    await asyncio.to_thread(ensure_topics, settings)
    return engine


async def _mark_ready(engine: AsyncEngine, worker: str, kind: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO workers (worker, kind, pid, ready_at) VALUES (:w, :k, :pid, now())"
                 " ON CONFLICT (worker) DO UPDATE SET pid = EXCLUDED.pid, ready_at = now(),"
                 " stopped_at = NULL"),
            {"w": worker, "k": kind, "pid": os.getpid()},
        )


async def _mark_stopped(engine: AsyncEngine, worker: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE workers SET stopped_at = now() WHERE worker = :w"),
                           {"w": worker})


async def run_worker(kind: str, settings: Settings, stop: asyncio.Event,
                     producer: KafkaProducer | None = None) -> None:
    """Run the worker `kind` (one of WORKER_KINDS) until `stop` is set. It takes over
    `producer` (created early by the CLI, see `orchestrator.producer`) or creates its own."""
    try:
        if kind not in WORKER_KINDS:
            raise ConfigurationError(
                f"unknown worker {kind!r}; known: {', '.join(WORKER_KINDS)}")
        _require_addresses(settings)
        name = worker_name(kind, settings)
        settings = settings.model_copy(update={"worker_name": name})
        # Before `prepare`, so its producer id arrives during the migrations and topic setup.
        producer = producer or KafkaProducer(settings, name)
        engine = await prepare(settings)
    except BaseException:
        if producer is not None:
            producer.close()
        raise

    async def ready() -> None:
        await _mark_ready(engine, name, kind)

    try:
        if kind in ("relay", "recovery"):  # database pollers: no consumer, no partitions
            poller = (OutboxRelay if kind == "relay" else RecoveryWorker)(settings, engine,
                                                                         producer)
            await ready()
            await poller.run(stop)
            return
        worker: OrchestratorWorker | ParticipantWorker
        if kind == "orchestrator":
            worker = OrchestratorWorker(settings, engine, producer)
            consumer = BatchConsumer(settings, worker.topics, ORCHESTRATOR_GROUP,
                                     worker.handle_batch, ready)
        else:
            from steps.runtime import ParticipantWorker

            worker = ParticipantWorker(
                settings, engine, make_participant(kind.split(":", 1)[1], settings), producer)
            consumer = BatchConsumer(settings, [worker.topic], worker.group_id,
                                     worker.handle_batch, ready)
        try:
            await consumer.start()
            log.info("%s started", name)
            await stop.wait()
        finally:
            await consumer.stop()
            await worker.close()
    finally:
        producer.close()
        try:
            await _mark_stopped(engine, name)
        finally:
            await engine.dispose()


async def workers_ready(engine: AsyncEngine, names: set[str]) -> bool:
    """Whether every named worker has its partitions (and has not stopped since)."""
    async with engine.connect() as conn:
        rows = await conn.execute(text(
            "SELECT worker FROM workers WHERE stopped_at IS NULL AND worker = ANY(:names)"),
            {"names": sorted(names)})
        return names <= set(rows.scalars())
