"""The checker's table of what each inbox verdict must leave behind covers every verdict the
orchestrator records: a new verdict without a rule would be reported as unaccounted for (I5)
on every healthy database, and a rule for a verdict nobody gives would hide nothing."""

from __future__ import annotations

from orchestrator.core.saga import Verdict
from orchestrator.ops import checker

# Not a member of the core's enum: the worker's poison path records it when it sets a record
# aside (`OrchestratorWorker._set_aside`).
POISON_VERDICT = "dead_lettered"


def test_every_verdict_the_orchestrator_records_has_exactly_one_rule() -> None:
    rules = [*checker._CAUSED_EVENTS, *checker._NAMED_SAGA, *checker._DEAD_LETTERED]

    assert sorted(rules) == sorted({*(v.value for v in Verdict), POISON_VERDICT})
