"""The operator tools behind `saga`: saga queries and timelines, dead letters and their
redrive, and the invariant checker."""

from orchestrator.ops.checker import Report, check, check_topic
from orchestrator.ops.dlq import list_dead_letters, redrive, show_dead_letter
from orchestrator.ops.queries import list_sagas, render_timeline, stuck_sagas, timeline

__all__ = ["Report", "check", "check_topic", "list_dead_letters", "list_sagas", "redrive",
           "render_timeline", "show_dead_letter", "stuck_sagas", "timeline"]
