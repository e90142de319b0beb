"""How the `saga` command logs: one JSON object per line when stderr is not a terminal (a
worker's log file, a container's output), plain text when a person watches it.

Every JSON line has `time` (UTC, ISO 8601), `level`, `logger`, `message`, `worker` (the worker's
name, as in the `actor` of its events) and, when they are known, `saga_type`, `saga_id`, `step`
and `trace_id` (the current OpenTelemetry span's, else the saga's trace as the line names it:
32 hex digits), plus `exc` with a traceback.

The saga fields come from the record itself (`log.info(..., extra=saga_fields(...))`) or, for
every line logged inside it, from `saga_context(...)`, which workers set around the work on one
saga. Only ids go there: account ids, references and names never do (`orchestrator.redact`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from opentelemetry import trace

from orchestrator.redact import redact_text

SAGA_FIELDS = ("saga_type", "saga_id", "step")
_context: ContextVar[dict[str, str] | None] = ContextVar("saga_log_context", default=None)
_worker = ""


def saga_fields(saga_type: str | None = None, saga_id: UUID | str | None = None,
                step: str | None = None, trace_id: str | None = None) -> dict[str, str]:
    """The saga fields of one log line, for `extra=`: those that are known. `trace_id` is the
    saga's trace (ADR 0015), which the line carries even when no span is current (tracing
    off)."""
    fields = {"saga_type": saga_type, "saga_id": str(saga_id) if saga_id else None,
              "step": step, "trace_id": trace_id}
    return {name: value for name, value in fields.items() if value}


@contextlib.contextmanager
def saga_context(saga_type: str | None = None, saga_id: UUID | str | None = None,
                 step: str | None = None) -> Iterator[None]:
    """Every line logged inside carries these saga fields (unless the line names its own)."""
    token = _context.set(saga_fields(saga_type, saga_id, step))
    try:
        yield
    finally:
        _context.reset(token)


def _fields(record: logging.LogRecord) -> dict[str, str]:
    fields = dict(_context.get() or {})
    for name in SAGA_FIELDS:
        value = getattr(record, name, None)
        if value:
            fields[name] = str(value)
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        fields["trace_id"] = format(span.trace_id, "032x")
    elif trace_id := getattr(record, "trace_id", None):
        fields["trace_id"] = str(trace_id)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "worker": _worker or None,
            "message": redact_text(record.getMessage()),
            **_fields(record),
        }
        if record.exc_info:
            line["exc"] = redact_text(self.formatException(record.exc_info))
        elif record.stack_info:
            line["exc"] = record.stack_info
        return json.dumps({k: v for k, v in line.items() if v is not None}, default=str)


class TextFormatter(logging.Formatter):
    """The plain text a person reads in a terminal, with the saga fields at the end."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = redact_text(super().format(record))
        fields = _fields(record)
        if not fields:
            return text
        first, newline, rest = text.partition("\n")
        described = " ".join(f"{name}={value}" for name, value in fields.items())
        return f"{first} [{described}]{newline}{rest}"


def configure_logging(level: int, json_lines: bool | None = None) -> None:
    """Send the process's log to stderr, as JSON lines unless stderr is a terminal (or as
    `json_lines` says)."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)


def set_worker(name: str) -> None:
    """The worker name every line of this process carries."""
    global _worker
    _worker = name
