"""A zombie orchestrator: two orchestrator instances share the partitions; one freezes (SIGSTOP)
inside its transaction, holding a decided but uncommitted batch, for longer than
`lease_timeout_s`. The other takes its partitions over and redoes that batch. When the zombie
wakes (SIGCONT), its late commit must be refused, and nothing may be applied twice.

The zombie is frozen deterministically by its own crash plan (`orchestrator.before_commit` with
`SAGA_CRASH_SIGNAL=STOP`): it stops right before committing its first batch. PostgreSQL ends its
lease session after `lease_timeout_s` (5 s; its partitions are then free) and its transaction's
session after `db_idle_in_transaction_timeout_s` (10 s; its row locks are then released and its
writes rolled back). Only then is it woken, so its commit meets a closed session.

Bound asserted after the zombie wakes: 60 s (its own rebalance, and slack for a busy machine).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest
from sqlalchemy import text

from tests.chaos.conftest import NewWorld
from tests.chaos.harness import World, plan, transfer_ids

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

BOUND_S = 60.0
ZOMBIE = "orchestrator#2"


def _frozen(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


async def test_a_frozen_orchestrator_is_fenced_when_it_wakes(new_world: NewWorld) -> None:
    seed = random.randrange(2**32)
    world = await new_world("zombie")
    settings = world.settings
    await world.start()
    await world.start(
        {ZOMBIE: {"SAGA_CRASH_AT": "orchestrator.before_commit", "SAGA_CRASH_SIGNAL": "STOP"}},
        labels=[ZOMBIE])
    zombie_name = world.workers.names[ZOMBIE]
    await world.seed("zb-")
    plans = plan("zb-", random.Random(seed), {"ok": 70, "over_limit": 15,
                                              "closed_destination": 8, "insufficient": 7})
    # Traffic throughout: the zombie freezes on the first batch from its share of partitions.
    publisher = world.publish_paced(plans, duration_s=8.0)
    pid = world.workers.processes[ZOMBIE].pid
    deadline = time.monotonic() + 60
    while not _frozen(pid):
        assert world.workers.alive(ZOMBIE), world.log_since_mark(ZOMBIE)[-3000:]
        assert time.monotonic() < deadline, "the second orchestrator never got a batch"
        await asyncio.sleep(0.05)
    frozen_at = time.monotonic()
    assert "crash point orchestrator.before_commit" in world.log_since_mark(ZOMBIE)
    world.mark_log("orchestrator")

    # The survivor takes every partition once the zombie's lease session is ended...
    everything = 2 * settings.topic_partitions  # the orchestrator's two topics
    took_all = f"owns {everything} of {everything} partitions (1 members)"
    while took_all not in world.log_since_mark("orchestrator"):
        assert time.monotonic() - frozen_at < 60, "the zombie's partitions were never taken over"
        await asyncio.sleep(0.1)
    took_over_s = time.monotonic() - frozen_at
    assert took_over_s >= settings.lease_timeout_s - 1.0, "taken over before the lease expired"
    # ...and PostgreSQL ends the zombie's open transaction, which held the batch it decided.
    while await _open_transactions(world, older_than_s=2.0):
        assert time.monotonic() - frozen_at < 60, "the zombie's transaction was never ended"
        await asyncio.sleep(0.1)
    ended_s = time.monotonic() - frozen_at
    async with world.engine.connect() as conn:
        recorded_by_zombie = (await conn.execute(text(
            "SELECT count(*) FROM saga_events WHERE actor = :a"), {"a": zombie_name})).scalar_one()
    assert recorded_by_zombie == 0, "the zombie's frozen batch was committed"

    world.mark_log(ZOMBIE)
    world.workers.signal(ZOMBIE, signal.SIGCONT)
    woke_at = time.monotonic()
    await asyncio.to_thread(publisher.join)
    await world.wait_terminal(transfer_ids(plans), BOUND_S)
    # The zombie's late commit was refused (its session is gone), the batch was nacked, and its
    # leases were found lost: it dropped its partitions before going on.
    awake = world.log_since_mark(ZOMBIE)
    assert "failed; it will be redelivered" in awake, awake[-3000:]
    assert "lost the partition leases" in awake, awake[-3000:]
    refusal = next((line for line in awake.splitlines()
                    if line.startswith(("sqlalchemy.exc.", "orchestrator.errors."))), "?")

    async def details() -> str:
        async with world.engine.connect() as conn:
            after = (await conn.execute(text(
                "SELECT count(*) FROM saga_events WHERE actor = :a"),
                {"a": zombie_name})).scalar_one()
        return (f"; zombie frozen in its transaction, partitions taken over after"
                f" {took_over_s:.1f}s, its transaction ended after {ended_s:.1f}s, woken at"
                f" {woke_at - frozen_at:.1f}s: late commit refused ({refusal[:160]}), 0 of its"
                f" frozen writes"
                f" applied ({after} events recorded by it after it rejoined); seed {seed}")

    await world.verdict("zombie orchestrator", plans, woke_at, BOUND_S, details=details)


async def _open_transactions(world: World, older_than_s: float) -> int:
    """Sessions of this world's database sitting in a transaction for `older_than_s` or more."""
    async with world.engine.connect() as conn:
        return int((await conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state LIKE 'idle in transaction%'"
            " AND xact_start < now() - make_interval(secs => :s)"), {"s": older_than_s}
        )).scalar_one())
