"""The operator tools behind `saga`: saga queries and timelines, dead letters and their
redrive, and the invariant checker."""

from orchestrator.ops.checker import Report, check, check_topic
from orchestrator.ops.dlq import list_dead_letters, redrive, show_dead_letter
from orchestrator.ops.queries import (
    SagaFilter,
    list_sagas,
    render_timeline,
    search_sagas,
    stuck_sagas,
    timeline,
)

__all__ = ["Report", "SagaFilter", "check", "check_topic", "list_dead_letters", "list_sagas",
           "redrive", "render_timeline", "search_sagas", "show_dead_letter", "stuck_sagas",
           "timeline"]
