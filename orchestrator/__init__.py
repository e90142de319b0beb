"""The saga engine, generic over saga types, in one subpackage per layer (arrows point down;
`lint-imports` checks them in CI, see `.importlinter`):

    orchestrator.cli          the `saga` command: the composition root, may use everything
    orchestrator.dev          embedded stack, worker processes (development tooling)
    orchestrator.ops          queries, dead letters, the invariant checker
    orchestrator.workers      orchestrator, relay, recovery, the runner
    orchestrator.application  what an application registers: saga types, participants
    orchestrator.participant  the kit a participant service is written with
    orchestrator.consuming    poison isolation and dead letters, shared by every consumer
    orchestrator.kafka        consumer, producer, topics, headers
    orchestrator.postgres     engine, event store, leases, migrations
    orchestrator.core         state, decisions, derived ids, the definition API: no I/O

Shared leaves that every layer may use: `errors` (the one error hierarchy), `settings`,
`metrics`, `crash` (named crash points for the chaos tests) and `throttle`. The applications
(`steps/`, the transfer) sit above all of it and are never imported by it.
"""

from orchestrator.errors import SagaError

__all__ = ["SagaError"]
