"""The checker's table of what each inbox verdict must leave behind covers every verdict the
orchestrator records: a new verdict without a rule would be reported as unaccounted for (I5)
on every healthy database, and a rule for a verdict nobody gives would hide nothing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID

from orchestrator.core.saga import Verdict
from orchestrator.ops import checker

# Not a member of the core's enum: the worker's poison path records it when it sets a record
# aside (`OrchestratorWorker._set_aside`).
POISON_VERDICT = "dead_lettered"


def test_every_verdict_the_orchestrator_records_has_exactly_one_rule() -> None:
    rules = [*checker._CAUSED_EVENTS, *checker._NAMED_SAGA, *checker._DEAD_LETTERED]

    assert sorted(rules) == sorted({*(v.value for v in Verdict), POISON_VERDICT})


def test_a_violations_sample_reads_times_in_iso_8601_not_python_reprs() -> None:
    """`saga check` printed `datetime.datetime(2026, 12, 5, ...)` and `UUID('...')` in its
    details: the rows' values are written as a person (or a script) reads them."""
    saga_id = UUID("5b0c1a8e-6f3e-4f3a-9a57-2b8f2c7b9c11")
    at = datetime(2026, 12, 5, 10, 15, 30, 250000, tzinfo=timezone(timedelta(hours=1)))
    rows = [(saga_id, "RUNNING", None, at, Decimal("12.30"))] * 7

    detail = checker._sample(rows)

    assert detail == "; ".join(
        ["(5b0c1a8e-6f3e-4f3a-9a57-2b8f2c7b9c11, RUNNING, NULL, 2026-12-05T09:15:30.250000+00:00,"
         " 12.30)"] * 5) + " (+2 more)"
    assert "datetime" not in detail and "UUID(" not in detail and "Decimal(" not in detail
