"""The servers under the workers restart: the broker and PostgreSQL.

The embedded broker is killed (a crash): tansu loses every topic, record and committed offset,
noida everything since its last snapshot. The event store is the source of truth: the recovery
worker re-creates the topics and, seeing the broker lost, re-sends every in-flight saga's
outstanding command at once (ADR 0007); consumers read their partitions again from what the
broker now holds, and producers that lost every broker start afresh (a new producer id, which
the new broker knows). Bound asserted after the broker is back: 60 s, for the restarted
participant (up to 15 s to start on a busy 2-core machine), a step deadline its commands may
still pass while it is down, and the remaining steps. tests/chaos/test_broker_crash.py holds the
crash under steady traffic with every worker up.

PostgreSQL restarts with a fast shutdown (every session ended) on the same port and data
directory: nothing committed is lost, batches in flight fail and are redelivered, leases
reconnect. Bound asserted after it is back: 60 s; no deadline needs to pass, the slack is for
reconnect back-off and a busy machine.
"""
from __future__ import annotations

import asyncio
import random
import time

import pytest
from confluent_kafka.admin import AdminClient
from sqlalchemy import text

from orchestrator.dev.embedded import EmbeddedStack
from orchestrator.kafka.consumer import all_topics
from tests.chaos.conftest import NewWorld
from tests.chaos.harness import World, plan, transfer_ids

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

BROKER_BOUND_S = 60.0
POSTGRES_BOUND_S = 60.0


async def _in_flight(world: World) -> dict[str, int]:
    async with world.engine.connect() as conn:
        rows = await conn.execute(text(
            "SELECT status || ':' || coalesce(current_step, '-') AS at, count(*) AS n FROM sagas"
            " WHERE status IN ('RUNNING', 'COMPENSATING') GROUP BY 1 ORDER BY 1"))
        return {row.at: row.n for row in rows}


def _partition_counts(world: World) -> dict[str, int]:
    assert world.settings.kafka_bootstrap
    admin = AdminClient({"bootstrap.servers": world.settings.kafka_bootstrap})
    topics = admin.list_topics(timeout=10).topics
    return {name: len(topics[name].partitions) for name in all_topics(world.settings)
            if name in topics}


async def _resends(world: World) -> int:
    async with world.engine.connect() as conn:
        return int((await conn.execute(text(
            "SELECT count(*) FROM saga_events WHERE type = 'StepTimedOut'"))).scalar_one())


async def test_broker_restart_brings_every_in_flight_saga_home(stack: EmbeddedStack,
                                                               new_world: NewWorld) -> None:
    seed = random.randrange(2**32)
    # Not the broker's default partition count (4): a topic re-created after the restart by
    # anything but `ensure_topics` (a consumer's auto-creation) would have too few partitions.
    world = await new_world("broker", topic_partitions=6)
    await world.start()
    await world.seed("br-")
    plans = plan("br-", random.Random(seed), {"ok": 80, "over_limit": 20,
                                              "closed_destination": 10, "insufficient": 10})
    # The screening participant is down (a deploy), so every saga's first command waits in the
    # broker, which may lose them in the crash below (tansu does for sure). (A running consumer
    # would have prefetched them into its own memory, and they would survive.)
    world.workers.terminate("participant:risk")
    await world.publish(plans)
    # Every request taken first: a request the broker loses before the orchestrator took it
    # was never accepted (the upstream producer re-sends it), and is not what this tests.
    await world.wait_accepted(transfer_ids(plans), 30)
    # And every first command published (not still in the outbox, where the relay would send
    # it again after the restart): the broker holds them all when it dies.
    assert await world.wait_outbox_published()
    caught = await _in_flight(world)
    stack.broker.restart(kill=True)  # a crash: nothing served after this line
    back_at = time.monotonic()
    await world.restart("participant:risk", wait=False)

    async def details() -> str:
        return (f"; in flight at the restart: {sum(caught.values())} {caught}, commands"
                f" re-sent after their deadline: {await _resends(world)}, broker"
                f" {stack.broker.kind}; seed {seed}")

    await world.verdict("broker restart", plans, back_at, BROKER_BOUND_S, details=details)
    assert sum(caught.values()) == len(plans), f"not every saga was in flight: {caught}"
    # Every topic came back as `ensure_topics` makes it, not as a client's auto-creation would.
    assert await asyncio.to_thread(_partition_counts, world) == {
        name: world.settings.topic_partitions for name in all_topics(world.settings)}


async def test_postgres_restart_under_load(stack: EmbeddedStack, new_world: NewWorld) -> None:
    seed = random.randrange(2**32)
    # A screening provider answering in 300 ms keeps more sagas in flight at any moment.
    world = await new_world("postgres", risk_latency_ms=300)
    await world.start()
    await world.seed("pg-")
    plans = plan("pg-", random.Random(seed), {"ok": 110, "over_limit": 20,
                                              "closed_destination": 10, "insufficient": 10})
    # Traffic before, during and after the outage: publishing needs only the broker. On a
    # thread, as the restart blocks this event loop (see `EmbeddedPostgres.restart`).
    publisher = world.publish_paced(plans, duration_s=4.0)
    caught = await _in_flight(world)
    deadline = time.monotonic() + 30
    while sum(caught.values()) < 10:  # the outage must catch sagas in flight
        assert time.monotonic() < deadline, f"too few sagas in flight to test anything: {caught}"
        await asyncio.sleep(0.1)
        caught = await _in_flight(world)
    stack.postgres.restart(down_s=1.0)
    back_at = time.monotonic()
    await asyncio.to_thread(publisher.join)
    await world.engine.dispose()  # the test's own pooled sessions died with the server

    async def details() -> str:
        return f"; in flight at the shutdown: {sum(caught.values())} {caught}; seed {seed}"

    await world.verdict("postgres restart", plans, back_at, POSTGRES_BOUND_S, details=details)
