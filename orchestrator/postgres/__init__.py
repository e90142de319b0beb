"""The PostgreSQL adapter: the engine, the event store (events, projection, inbox, outbox,
dead letters), partition leases, and the engine's migrations. Driver errors are translated
into `orchestrator.errors` at this boundary."""

from orchestrator.postgres.leases import Partition, PartitionLeases
from orchestrator.postgres.store import (
    MIGRATIONS_DIR,
    DeadLetterRow,
    HeldConnection,
    InboxRow,
    NewEvent,
    OutboxRow,
    create_engine,
    migrate,
    translate,
)

__all__ = [
    "MIGRATIONS_DIR",
    "DeadLetterRow",
    "HeldConnection",
    "InboxRow",
    "NewEvent",
    "OutboxRow",
    "Partition",
    "PartitionLeases",
    "create_engine",
    "migrate",
    "translate",
]
