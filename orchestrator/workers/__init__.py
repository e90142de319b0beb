"""The workers: the orchestrator (intake and replies), the outbox relay, the recovery worker
(deadlines, retries, broker loss), and the runner that starts any of them."""

from orchestrator.workers.recovery import RecoveryWorker
from orchestrator.workers.relay import OutboxRelay
from orchestrator.workers.runner import prepare, run_worker, workers_ready
from orchestrator.workers.saga_worker import OrchestratorWorker

__all__ = ["OrchestratorWorker", "OutboxRelay", "RecoveryWorker", "prepare", "run_worker",
           "workers_ready"]
