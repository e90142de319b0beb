"""Development tooling, apart from the product's layers: the embedded stack (a real PostgreSQL
server and a Kafka-protocol broker from wheels) and worker processes for the demo and tests."""

from orchestrator.dev.embedded import EmbeddedBroker, EmbeddedStack, settings_for
from orchestrator.dev.processes import WorkerProcesses

__all__ = ["EmbeddedBroker", "EmbeddedStack", "WorkerProcesses", "settings_for"]
