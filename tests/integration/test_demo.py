"""`saga demo` as a newcomer runs it: no configuration, so it starts its own embedded stack and
worker processes, and must end clean."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from steps.demo import plan_transfers, sagas_in_flight
from tests.integration.conftest import Isolated
from tests.integration.test_cli import _start_saga_at

pytestmark = pytest.mark.integration

TRANSFERS = 60
# A seed whose mix of 60 has every kind: completions, each compensation, intake refusals (one of
# them unparseable, so it has no saga). Seed 7, for one, plans no refusal at all at this size.
SEED = 0
OUTCOME_OF_KIND = {"ok": "completed", "insufficient": "compensated",
                   "closed_destination": "compensated", "over_limit": "compensated",
                   "sanctioned": "compensated"}


def expected_outcomes() -> Counter[str]:
    kinds = [p.kind for p in plan_transfers(TRANSFERS, "any-", random.Random(SEED))]
    assert "invalid:malformed" in kinds and len({k for k in kinds if k in OUTCOME_OF_KIND}) == 5
    return Counter(OUTCOME_OF_KIND.get(kind, "rejected") for kind in kinds)


@pytest.mark.timeout(300)
async def test_demo_on_its_own_embedded_stack_ends_clean() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SAGA_DATABASE_URL", "SAGA_KAFKA_BOOTSTRAP")}

    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "orchestrator.cli", "demo", "-n", str(TRANSFERS), "--json",
         "--seed", str(SEED), "--timeout", "120"],
        env=env, capture_output=True, text=True, timeout=280, check=False)

    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-3000:])
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["transfers"] == TRANSFERS
    assert summary["stuck"] == 0
    assert summary["money_conserved"] is True
    assert summary["duplicate_effects"] == 0
    assert summary["invariants_ok"] is True, summary["violations"]
    assert summary["violations"] == []
    assert summary["completed"] > 0
    assert summary["compensated"] > 0
    assert summary["rejected"] > 0
    assert (summary["completed"] + summary["compensated"] + summary["rejected"]
            + summary["failed"]) == TRANSFERS
    # Each planned transfer ended the way its kind says it must.
    expected = expected_outcomes()
    assert {k: summary[k] for k in ("completed", "compensated", "rejected", "failed")} == {
        "completed": expected["completed"], "compensated": expected["compensated"],
        "rejected": expected["rejected"], "failed": 0}
    # One outcome event per saga that ended (every planned transfer with a readable transfer
    # id: the malformed one has none) and one per conflicting re-send; exact re-sends publish
    # the same event again, which counts once.
    kinds = [p.kind for p in plan_transfers(TRANSFERS, "any-", random.Random(SEED))]
    ended = TRANSFERS - kinds.count("invalid:malformed")
    assert summary["conflicting_resends"] >= 1 and summary["exact_resends"] >= 1
    assert summary["outcome_events"] == ended + summary["conflicting_resends"]
    assert summary["outcome_events_expected"] == summary["outcome_events"]
    # One trace per saga: every saga (the malformed request has none) wrote its events in one
    # trace of its own.
    assert summary["sagas"] == ended
    assert summary["traces"] == summary["sagas"]
    assert summary["sagas_not_in_one_trace"] == 0
    assert {"p50_ms", "p99_ms", "elapsed_s", "sagas_per_s"} <= set(summary)
    assert 0 <= summary["p50_ms"] <= summary["p99_ms"]
    assert summary["elapsed_s"] > 0 and summary["sagas_per_s"] > 0
    # --json prints the summary without the bulky example timeline.
    assert "example_timeline" not in summary


@pytest.mark.timeout(300)
async def test_chaos_demo_kills_workers_and_still_ends_clean() -> None:
    """`saga demo --chaos`: workers are SIGKILLed and restarted while transfers run; the
    outcome must be exactly the one a calm run gives."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SAGA_DATABASE_URL", "SAGA_KAFKA_BOOTSTRAP")}

    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "orchestrator.cli", "demo", "-n", str(TRANSFERS), "--json",
         "--seed", str(SEED), "--timeout", "120", "--chaos", "--chaos-seconds", "8"],
        env=env, capture_output=True, text=True, timeout=280, check=False)

    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-3000:])
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["chaos_kills"] >= 3, summary
    assert sum(summary["chaos_killed"].values()) == summary["chaos_kills"]
    assert result.stderr.count("chaos: SIGKILLed") == summary["chaos_kills"]
    # Each kill is a fault in the summary, in order, with the sagas in flight at that moment
    # (the same count the kill's line on stderr gave); no broker crash without --chaos-broker.
    faults = summary["chaos_faults"]
    assert summary["chaos_broker_crashes"] == 0
    assert [f["fault"] for f in faults] == ["worker"] * summary["chaos_kills"]
    assert Counter(f["target"] for f in faults) == Counter(summary["chaos_killed"])
    assert [f["at_s"] for f in faults] == sorted(f["at_s"] for f in faults)
    assert all(0 <= f["sagas_in_flight"] <= TRANSFERS for f in faults)
    told = [int(n) for n in re.findall(r"chaos: SIGKILLed \S+ and restarted it \((\d+) sagas "
                                       r"in flight\)", result.stderr)]
    assert told == [f["sagas_in_flight"] for f in faults]
    assert summary["stuck_in_flight"] == 0
    assert (summary["money_conserved"], summary["duplicate_effects"], summary["stuck"]) == (
        True, 0, 0)
    # Killed workers change nothing of the traces: the context is stored and travels with the
    # messages, so a saga is still one trace.
    assert summary["traces"] == summary["sagas"] > 0
    assert summary["sagas_not_in_one_trace"] == 0
    assert summary["invariants_ok"] is True, summary["violations"]
    expected = expected_outcomes()
    assert {k: summary[k] for k in ("completed", "compensated", "rejected", "failed")} == {
        "completed": expected["completed"], "compensated": expected["compensated"],
        "rejected": expected["rejected"], "failed": 0}
    # Killed workers neither lose an outcome event nor publish a second one for a saga.
    kinds = [p.kind for p in plan_transfers(TRANSFERS, "any-", random.Random(SEED))]
    assert summary["outcome_events"] == (TRANSFERS - kinds.count("invalid:malformed")
                                         + summary["conflicting_resends"])


def _demo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("args", "extra_env", "says"), [
    (["--chaos-broker"], {}, "--chaos-broker adds a broker crash to --chaos"),
    (["--chaos", "--chaos-broker"], {"SAGA_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
     "needs the embedded stack"),
])
async def test_chaos_broker_is_refused_before_anything_starts(
        args: list[str], extra_env: dict[str, str], says: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SAGA_DATABASE_URL", "SAGA_KAFKA_BOOTSTRAP")} | extra_env

    result = await asyncio.to_thread(_demo, "-n", "5", "--json", *args, env=env)

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert says in result.stderr
    assert result.stdout == ""
    assert "starting" not in result.stderr and "Traceback" not in result.stderr


async def test_sagas_in_flight_counts_running_sagas_of_the_given_transfers(
        isolated: Isolated) -> None:
    running = await _start_saga_at(isolated, datetime.now(UTC))
    other = await _start_saga_at(isolated, datetime.now(UTC))
    async with isolated.engine.connect() as conn:
        transfers = {row.saga_id: row.business_key for row in await conn.execute(text(
            "SELECT saga_id, business_key FROM sagas WHERE saga_type = 'transfer'"))}
    unknown = str(uuid.uuid4())

    assert await sagas_in_flight(isolated.engine, [transfers[running], unknown]) == 1
    assert await sagas_in_flight(isolated.engine, list(transfers.values())) == 2
    async with isolated.engine.begin() as conn:
        # As if the other one had ended: only the in-flight statuses count.
        await conn.execute(text("UPDATE sagas SET status = 'COMPLETED' WHERE saga_id = :s"),
                           {"s": other})
    assert await sagas_in_flight(isolated.engine, list(transfers.values())) == 1
