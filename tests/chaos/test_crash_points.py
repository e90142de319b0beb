"""Every crash point in `orchestrator.crash.POINTS`, on the forward path and on the compensation
path: a worker SIGKILLs itself there, is restarted without the crash plan, and every saga must
still end as it should, with the checker clean.

One world (database, topics, the six workers) serves the whole module: each case restarts only
the workers it needs with a crash plan, and opens its own accounts. The checker therefore judges
every case's data together with the cases before it.

How each case gets its crash point reached:
- orchestrator and participant points: the step filter of `SAGA_CRASH_AT` picks a batch that
  holds that step in that direction (`credit@compensate`: the reversal of a credit, which only
  transfers refused at `settle` by the daily outflow limit reach);
- `relay.after_publish`: the orchestrator's fast path publishes its own rows, so the relay gets
  work only from a writer that committed rows and died before publishing them. The orchestrator
  is made that writer (`orchestrator.after_commit` on a forward or a compensation step); the relay
  is started with its crash plan only then, and the recovery worker (whose outbox sweep would
  race the relay for those rows) stays stopped until the relay has crashed;
- `recovery.*` forward: the screening provider fails half of the time (retryable), so sagas wait
  out a backoff and the recovery worker starts their next attempt;
- `recovery.*` compensate: the ledger dies on the first reversal of a credit and stays down, so
  the compensation goes unanswered past its 10 s deadline and the recovery worker re-sends it.

A consumer is given its crash plan only once its group has committed its offset past every
record on its topics (`World.wait_committed`). Offsets are committed asynchronously after each
batch; when the worker that handled the previous case's last batch is killed before that commit
lands, its successor gets the batch again, and the previous case's traffic ends with the same
steps (the compensations) that later cases filter on: the plan would fire on an old record.

Bound asserted after the last restart: 60 s. No case needs a step deadline to pass (every
command is still in the broker, or in the outbox for the relay), but the restarted workers must
start (1.5 s on an idle 2-core machine, up to 15 s when it is shared with other test runs), and
a command that did get lost would be re-sent after its 10 s deadline: 60 s covers both twice.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sqlalchemy import text

from orchestrator.crash import POINTS
from orchestrator.dev.embedded import EmbeddedStack
from steps.demo import Planned
from tests.chaos.harness import EXPECTED, SMALL_MIX, World, plan, unique

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

BOUND_S = 60.0
# How long a planted crash may take to be reached (workers may take 15 s to start on a busy
# machine); only a liveness limit, never a speed figure.
REACH_S = 60.0
RECOVERY_SEND_DEADLINE_S = 10.0  # the transfer saga's step timeout (steps/saga.py)
# The `recovery.*` forward cases need a screening that fails (at random, half of the time) and is
# retried: with 20 transfers, the odds that none fails are one in a million.
RETRY_MIX = {"ok": 8, "over_limit": 6, "closed_destination": 3, "insufficient": 3}


@dataclass(frozen=True)
class Case:
    point: str
    step: str  # the step filter, `<step>@<direction>`
    worker: str  # the label of the worker that carries the crash plan

    @property
    def path(self) -> str:
        return self.step.split("@", 1)[1]

    @property
    def plan(self) -> dict[str, str]:
        if self.worker == "relay":  # see CASES
            return {"SAGA_CRASH_AT": self.point}
        return {"SAGA_CRASH_AT": f"{self.point}:{self.step}"}

    @property
    def id(self) -> str:
        return f"{self.point}-{self.path}"


CASES = [
    Case("orchestrator.after_consume", "intake@forward", "orchestrator"),
    Case("orchestrator.after_consume", "credit@compensate", "orchestrator"),
    Case("orchestrator.before_commit", "reserve@forward", "orchestrator"),
    Case("orchestrator.before_commit", "reserve@compensate", "orchestrator"),
    Case("orchestrator.after_commit", "credit@forward", "orchestrator"),
    Case("orchestrator.after_commit", "credit@compensate", "orchestrator"),
    Case("orchestrator.after_produce", "settle@forward", "orchestrator"),
    Case("orchestrator.after_produce", "reserve@compensate", "orchestrator"),
    Case("participant.after_consume", "screen@forward", "participant:risk"),
    Case("participant.after_consume", "credit@compensate", "participant:ledger"),
    Case("participant.before_commit", "credit@forward", "participant:ledger"),
    Case("participant.before_commit", "reserve@compensate", "participant:ledger"),
    Case("participant.after_effect", "settle@forward", "participant:ledger"),
    Case("participant.after_effect", "credit@compensate", "participant:ledger"),
    Case("participant.after_produce", "notify@forward", "participant:notify"),
    Case("participant.after_produce", "reserve@compensate", "participant:ledger"),
    # The relay's point has no step filter (it publishes rows, not steps): the path is that of
    # the rows the orchestrator left it, given here as the orchestrator's own filter. Every
    # accepted request's batch holds its `screen` and `reserve` commands (the two run in
    # parallel; a screen's reply starts nothing while reserve is out), and every reversed
    # credit gets a `release`.
    Case("relay.after_publish", "intake@forward", "relay"),
    Case("relay.after_publish", "credit@compensate", "relay"),
    Case("recovery.before_commit", "screen@forward", "recovery"),
    Case("recovery.before_commit", "credit@compensate", "recovery"),
    Case("recovery.after_commit", "screen@forward", "recovery"),
    Case("recovery.after_commit", "credit@compensate", "recovery"),
]


def test_every_crash_point_has_a_forward_and_a_compensation_case() -> None:
    assert {(c.point, c.path) for c in CASES} == {
        (point, path) for point in POINTS for path in ("forward", "compensate")}


@dataclass
class Module:
    world: World
    failed_before: int  # the session's failures when the module started
    cases_run: int = 0


@pytest.fixture(scope="module")
async def module(stack: EmbeddedStack, request: pytest.FixtureRequest
                 ) -> AsyncIterator[Module]:
    # The 22 cases share these topics, so their logs grow all along; with the default 1 ms fetch
    # wait, the embedded broker's fetch limit (ADR 0003) then starves each freshly restarted
    # consumer of the later cases until its watchdog has widened the wait (up to ~20 s on a
    # busy machine). That is a property of the test broker, not what these cases test; 5 ms
    # holds four times longer (and costs the broker less idle CPU).
    world = await World.create(stack, unique("crash"), kafka_fetch_wait_ms=5)
    await world.start()
    module = Module(world, request.session.testsfailed)
    yield module
    await world.close(keep_logs=request.session.testsfailed > module.failed_before)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_crash_point(module: Module, case: Case, request: pytest.FixtureRequest
                           ) -> None:
    world = module.world
    healed = await world.heal()
    # After a failed case, its workers may be left down: start them, do not fail again here.
    # Otherwise a worker that died between cases died of a bug.
    assert not healed or request.session.testsfailed > module.failed_before, (
        f"{healed} died between cases; logs in {world.workers.log_dir}")
    module.cases_run += 1
    prefix = f"cp{module.cases_run}-"
    seed = random.randrange(2**32)
    await world.seed(prefix)
    retries = case.worker == "recovery" and case.path == "forward"
    plans = plan(prefix, random.Random(seed), RETRY_MIX if retries else SMALL_MIX)
    expected = dict(EXPECTED)
    detail = ""
    behind: list[str] = []
    if case.worker == "relay":
        detail, behind = await _relay_crash(world, case, plans)
    elif retries:
        expected["ok"] = frozenset({"COMPLETED", "COMPENSATED"})  # screening ran out of tries
        await world.restart("participant:risk", {"SAGA_RISK_FAILURE_RATE": "0.5"}, wait=False)
        await world.restart("recovery", case.plan, wait=False)
        await world.publish(plans)
        await world.expect_crash("recovery", case.point, REACH_S)
        await world.restart("recovery", wait=False)
        await world.restart("participant:risk", wait=False)
    elif case.worker == "recovery":
        ledger_plan = {"SAGA_CRASH_AT": f"participant.after_consume:{case.step}"}
        behind = await world.wait_committed("participant:ledger")
        await world.restart("participant:ledger", ledger_plan, wait=False)
        await world.restart("recovery", case.plan, wait=False)
        await world.publish(plans)
        await world.expect_crash("participant:ledger", "participant.after_consume", REACH_S)
        await world.expect_crash("recovery", case.point, RECOVERY_SEND_DEADLINE_S + REACH_S)
        await world.restart("recovery", wait=False)
        await world.restart("participant:ledger", wait=False)
    else:
        behind = await world.wait_committed(case.worker)
        await world.restart(case.worker, case.plan, wait=False)
        await world.publish(plans)
        await world.expect_crash(case.worker, case.point, REACH_S)
        await world.restart(case.worker, wait=False)
    faults_stopped_at = time.monotonic()

    if behind:
        detail += f", planned after its group committed {len(behind)} lagging partitions"

    async def details() -> str:
        return f"; {case.worker} killed at {case.point}:{case.step}{detail}; seed {seed}"

    await world.verdict(f"crash {case.id}", plans, faults_stopped_at, BOUND_S, expected,
                        details=details)


async def _relay_crash(world: World, case: Case, plans: list[Planned]
                       ) -> tuple[str, list[str]]:
    """The orchestrator commits a batch for `case.step` and dies before publishing it; then the
    relay publishes those rows and dies before marking them. Returns what the relay held, and
    the orchestrator's partitions that were behind before it got its plan."""
    world.workers.terminate("recovery")  # its outbox sweep would race the relay for the rows
    world.workers.terminate("relay")
    behind = await world.wait_committed("orchestrator")
    await world.restart("orchestrator", {"SAGA_CRASH_AT": f"orchestrator.after_commit:"
                                                         f"{case.step}"}, wait=False)
    await world.publish(plans)
    await world.expect_crash("orchestrator", "orchestrator.after_commit", REACH_S)
    await world.restart("orchestrator", wait=False)
    await world.restart("relay", case.plan, wait=False)
    await world.expect_crash("relay", case.point, REACH_S)
    # The relay's transaction died with it: what it published is still unmarked, and must
    # include the orchestrator's commands for the path under test.
    async with world.engine.connect() as conn:
        held = [json.loads(bytes(value)) for value in (await conn.execute(text(
            "SELECT value FROM outbox WHERE published_at IS NULL"
            " AND created_at < clock_timestamp() - interval '0.5 seconds'"))).scalars()]
    step, direction = case.step.split("@")
    next_step = {"intake@forward": "reserve", "credit@compensate": "reserve"}[case.step]
    assert any(c.get("step") == next_step and c.get("direction") == direction for c in held), (
        f"the relay did not hold the {next_step}@{direction} commands: {held[:3]}")
    await world.restart("relay", wait=False)
    await world.restart("recovery", wait=False)
    return (f", relay published and died holding {len(held)} rows (after {step}@{direction})",
            behind)
