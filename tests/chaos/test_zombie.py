"""A zombie orchestrator: two orchestrator instances share the partitions; one freezes (SIGSTOP)
with a decided but unwritten batch for longer than `lease_timeout_s`. The other takes its
partitions over and redoes that batch. When the zombie wakes (SIGCONT), its late write must be
refused, and nothing may be applied twice.

The zombie is frozen deterministically by its own crash plan (`orchestrator.before_commit` with
`SAGA_CRASH_SIGNAL=STOP`): it stops right before writing its first batch. PostgreSQL ends its
lease session after `lease_timeout_s` (its partitions are then free). Where the zombie froze
depends on the path its batch took (ADR 0005):

- the careful path: inside its transaction, before COMMIT. PostgreSQL ends that session after
  `db_idle_in_transaction_timeout_s` (its row locks are released, its writes rolled back), and
  its late COMMIT meets a closed session: a fencing check;
- the known-state path: before sending its one autocommitted statement. Its late statement
  collides with what the survivor recorded on the event key `(saga_id, seq)` and the inbox key:
  a version check; it then decides the batch again from the database, which already holds it.

Either way the zombie is woken only once PostgreSQL has ended any transaction it held and the
survivor has committed its offsets past every record that existed when it froze (so its own
record of the zombie's batch is in the database). This world shortens both timeouts (3 s and
6 s instead of the defaults 5 s and 10 s): the sequence is the same, and a frozen worker is all
they are waited on for here. 3 s is still six lease heartbeats (0.5 s), so a live worker on a
busy machine does not lose its leases.

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
LEASE_TIMEOUT_S = 3.0
IDLE_IN_TRANSACTION_S = 6.0


def _frozen(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "T"


async def test_a_frozen_orchestrator_is_fenced_when_it_wakes(new_world: NewWorld) -> None:
    seed = random.randrange(2**32)
    world = await new_world("zombie", lease_timeout_s=LEASE_TIMEOUT_S,
                            db_idle_in_transaction_timeout_s=IDLE_IN_TRANSACTION_S)
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
    publisher = world.publish_paced(plans, duration_s=6.0)
    pid = world.workers.processes[ZOMBIE].pid
    deadline = time.monotonic() + 60
    while not _frozen(pid):
        assert world.workers.alive(ZOMBIE), world.log_since_mark(ZOMBIE)[-3000:]
        assert time.monotonic() < deadline, "the second orchestrator never got a batch"
        await asyncio.sleep(0.05)
    frozen_at = time.monotonic()
    assert "crash point orchestrator.before_commit" in world.log_since_mark(ZOMBIE)
    # Everything the zombie can have consumed is below these offsets.
    held = {tp: high for tp, (_, high) in
            (await asyncio.to_thread(world.positions, "orchestrator")).items()}
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
    # ...and the survivor redid the zombie's batch: its group committed past all of it.
    await world.wait_committed("orchestrator", timeout_s=60, upto=held)
    redone_s = time.monotonic() - frozen_at
    async with world.engine.connect() as conn:
        recorded_by_zombie = (await conn.execute(text(
            "SELECT count(*) FROM saga_events WHERE actor = :a"), {"a": zombie_name})).scalar_one()
    assert recorded_by_zombie == 0, "the zombie's frozen batch was committed"

    world.mark_log(ZOMBIE)
    world.workers.signal(ZOMBIE, signal.SIGCONT)
    woke_at = time.monotonic()
    await asyncio.to_thread(publisher.join)
    await world.wait_terminal(transfer_ids(plans), BOUND_S)
    # The zombie's late write was refused, by its closed session (careful path: the batch was
    # nacked) or on the event and inbox keys (known-state path: the batch was decided again from
    # the database), and its leases were found lost: it dropped its partitions before going on.
    awake = world.log_since_mark(ZOMBIE)
    session_closed = "failed; it will be redelivered" in awake
    key_refused = "the known-state path lost a race" in awake
    assert session_closed or key_refused, f"no refusal of the late write:\n{awake[-3000:]}"
    assert "lost the partition leases" in awake, awake[-3000:]
    if session_closed:
        refusal = next((line for line in awake.splitlines()
                        if line.startswith(("sqlalchemy.exc.", "orchestrator.errors."))), "?")
    else:
        refusal = "statement refused on the event and inbox keys, batch decided again"

    async def details() -> str:
        async with world.engine.connect() as conn:
            after = (await conn.execute(text(
                "SELECT count(*) FROM saga_events WHERE actor = :a"),
                {"a": zombie_name})).scalar_one()
        return (f"; zombie frozen before writing, partitions taken over after"
                f" {took_over_s:.1f}s, any transaction of its ended after {ended_s:.1f}s, its"
                f" batch redone after {redone_s:.1f}s, woken at {woke_at - frozen_at:.1f}s:"
                f" late write refused ({refusal[:160]}), 0 of its frozen writes applied"
                f" ({after} events recorded by it after it rejoined); seed {seed}")

    await world.verdict("zombie orchestrator", plans, woke_at, BOUND_S, details=details)


async def _open_transactions(world: World, older_than_s: float) -> int:
    """Sessions of this world's database sitting in a transaction for `older_than_s` or more."""
    async with world.engine.connect() as conn:
        return int((await conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state LIKE 'idle in transaction%'"
            " AND xact_start < now() - make_interval(secs => :s)"), {"s": older_than_s}
        )).scalar_one())
