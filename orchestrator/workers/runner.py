"""Run one worker (orchestrator, a participant, or the relay) until told to stop.

The CLI runs each in its own process (`saga worker ...`); tests and `saga dev` may run several in
one event loop. Each worker migrates the schema (idempotent, under a lock) and creates its topics
before it starts, so workers can be started in any order.
"""

from __future__ import annotations

import asyncio
import logging
import os

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator import tracing
from orchestrator.application import Application, load_application
from orchestrator.core.saga_type import SagaTypes
from orchestrator.errors import ConfigurationError
from orchestrator.kafka.consumer import ORCHESTRATOR_GROUP, BatchConsumer, ensure_topics
from orchestrator.kafka.producer import KafkaProducer
from orchestrator.participant.runtime import ParticipantWorker
from orchestrator.postgres.store import create_engine, in_flight_definitions, migrate
from orchestrator.settings import Settings, worker_name
from orchestrator.workers.recovery import RecoveryWorker
from orchestrator.workers.relay import OutboxRelay
from orchestrator.workers.saga_worker import OrchestratorWorker
from schemas import step_topic

log = logging.getLogger(__name__)

def _require_addresses(settings: Settings) -> None:
    if not settings.database_url or not settings.kafka_bootstrap:
        raise ConfigurationError("SAGA_DATABASE_URL and SAGA_KAFKA_BOOTSTRAP must both be set")


def application_topics(application: Application) -> list[str]:
    """The topics an application's saga types and participants need (before the prefix)."""
    return sorted({*(saga_type.start_topic for saga_type in application.sagas),
                   *(saga_type.events_topic for saga_type in application.sagas),
                   *(step_topic(name) for name in application.participants)})


async def prepare(settings: Settings, application: Application) -> AsyncEngine:
    _require_addresses(settings)
    assert settings.database_url
    engine = create_engine(settings.database_url, settings.db_pool_size,
                           settings.db_idle_in_transaction_timeout_s)
    await migrate(engine, application.migrations)
    # With every saga type's start topic and every participant's command topic: the
    # application's (the engine's own list knows the transfer's only).
    await asyncio.to_thread(ensure_topics, settings, application_topics(application))
    return engine


async def require_definitions(engine: AsyncEngine, sagas: SagaTypes) -> None:
    """Refuse to run a deployment that lacks a definition sagas in flight still run on: each
    saga finishes on the version it started on, so removing a version (or a saga type) is only
    safe once none of its sagas is in flight. Raises ConfigurationError naming them."""
    async with engine.connect() as conn:
        in_flight = await in_flight_definitions(conn)
    missing = sagas.missing(in_flight)
    if missing:
        named = ", ".join(f"{name} v{version} ({in_flight[name, version]} in flight)"
                          for name, version in missing)
        raise ConfigurationError(
            f"sagas in flight run on definitions this deployment does not have: {named}."
            " Deploy them again beside the new ones and remove them once those sagas ended"
            " (`saga list --type NAME --definition-version N --status RUNNING`).")


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
                     producer: KafkaProducer | None = None,
                     application: Application | None = None) -> None:
    """Run the worker `kind` (one of the application's `worker_kinds`) until `stop` is set. It
    takes over `producer` (created early by the CLI, see `orchestrator.kafka.producer`) or
    creates its own. The application is the one the settings name, unless one is given."""
    try:
        application = application or load_application(settings.application)
        if kind not in application.worker_kinds:
            raise ConfigurationError(
                f"unknown worker {kind!r}; known: {', '.join(application.worker_kinds)}")
        _require_addresses(settings)
        # Embedded in an application that set a TracerProvider: trace with it (ADR 0015).
        tracing.adopt_global_provider()
        name = worker_name(kind, settings)
        settings = settings.model_copy(update={"worker_name": name})
        # Before `prepare`, so its producer id arrives during the migrations and topic setup.
        producer = producer or KafkaProducer(settings, name)
        engine = await prepare(settings, application)
    except BaseException:
        if producer is not None:
            producer.close()
        raise
    if kind in ("orchestrator", "recovery"):  # the workers that decide on sagas
        try:
            await require_definitions(engine, application.saga_types)
        except BaseException:
            producer.close()
            await engine.dispose()
            raise
    async def ready() -> None:
        await _mark_ready(engine, name, kind)

    try:
        if kind in ("relay", "recovery"):  # database pollers: no consumer, no partitions
            poller: OutboxRelay | RecoveryWorker = (
                OutboxRelay(settings, engine, producer) if kind == "relay"
                else RecoveryWorker(settings, engine, producer, application.saga_types))
            await ready()
            await poller.run(stop)
            return
        worker: OrchestratorWorker | ParticipantWorker
        if kind == "orchestrator":
            worker = OrchestratorWorker(settings, engine, producer, application.saga_types)
            consumer = BatchConsumer(settings, worker.topics, ORCHESTRATOR_GROUP,
                                     worker.handle_batch, ready)
        else:
            worker = ParticipantWorker(
                settings, engine, application.participant(kind.split(":", 1)[1], settings),
                producer)
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
