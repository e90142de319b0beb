"""The workers' log lines (orchestrator/logs.py) and what may appear in them
(orchestrator/redact.py); the gauges' samples (orchestrator/metrics.py)."""

from __future__ import annotations

import json
import logging
import sys
import uuid

import pytest
from opentelemetry.sdk.trace import TracerProvider

from orchestrator import logs, metrics
from orchestrator.redact import describe_error, mask_account, redact_text


def record(message: str, *args: object, exc: BaseException | None = None,
           **extra: str) -> logging.LogRecord:
    made = logging.LogRecord("orchestrator.test", logging.WARNING, __file__, 1, message, args,
                             (type(exc), exc, exc.__traceback__) if exc else None)
    for name, value in extra.items():
        setattr(made, name, value)
    return made


def test_an_account_id_shows_its_last_four_characters_only() -> None:
    assert mask_account("acct-secret-1234") == "****1234"
    assert mask_account("abcd") == "****"
    assert mask_account("") == "****"


def test_error_texts_lose_the_values_they_quote() -> None:
    text = ('duplicate key value violates unique constraint "k"\n'
            "DETAIL:  Key (account_id)=(acct-secret) already exists.\n"
            "[SQL: INSERT ...]\n[parameters: ('acct-secret', 5)]")
    redacted = redact_text(text)
    assert "acct-secret" not in redacted
    assert "duplicate key value" in redacted and "[SQL: INSERT ...]" in redacted

    from pydantic import BaseModel, ValidationError

    class Model(BaseModel):
        number: int

    with pytest.raises(ValidationError) as caught:
        Model.model_validate({"number": "acct-secret"})
    described = describe_error(caught.value)
    assert described.startswith("ValidationError: 1 validation error for Model")
    assert "acct-secret" not in described and "int_parsing" in described


def test_a_json_line_has_the_worker_the_saga_fields_and_the_trace_id() -> None:
    saga_id = uuid.uuid4()
    logs.set_worker("orchestrator#1")
    tracer = TracerProvider().get_tracer("test")
    try:
        with tracer.start_as_current_span("hop") as span, logs.saga_context("transfer", saga_id):
            line = json.loads(logs.JsonFormatter().format(record("dead-lettered %s", "x",
                                                                  step="credit")))
        trace_id = format(span.get_span_context().trace_id, "032x")
    finally:
        logs.set_worker("")
    assert line["worker"] == "orchestrator#1"
    assert (line["saga_type"], line["saga_id"], line["step"]) == ("transfer", str(saga_id),
                                                                    "credit")
    assert line["trace_id"] == trace_id
    assert line["level"] == "WARNING" and line["message"] == "dead-lettered x"
    assert line["time"].endswith("+00:00")


def test_a_line_that_names_its_saga_trace_carries_it_when_no_span_is_current() -> None:
    """With tracing off there is no span, but a line about a saga names the saga's trace (the
    same id `saga timeline` prints); a current span's trace wins."""
    fields = logs.saga_fields("transfer", uuid.uuid4(), "credit", "ab" * 16)

    line = json.loads(logs.JsonFormatter().format(record("dead-lettered", **fields)))

    assert line["trace_id"] == "ab" * 16
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("hop") as span:
        line = json.loads(logs.JsonFormatter().format(record("dead-lettered", **fields)))
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")


def test_a_line_outside_a_saga_and_a_span_names_neither() -> None:
    line = json.loads(logs.JsonFormatter().format(record("started")))
    assert not {"saga_id", "saga_type", "step", "trace_id", "worker"} & line.keys()


def test_tracebacks_and_messages_are_redacted_in_both_formats() -> None:
    # Built apart, so that the traceback's source line does not quote it.
    message = "refused\nDETAIL:  Failing row contains ({}, 5).".format("acct-secret")
    try:
        raise RuntimeError(message)
    except RuntimeError as error:
        made = record("batch failed: %s", error, exc=error, saga_id="s-1")
    as_json = logs.JsonFormatter().format(made)
    as_text = logs.TextFormatter().format(made)
    for rendered in (as_json, as_text):
        assert "acct-secret" not in rendered
        assert "DETAIL: (hidden)" in rendered.replace("\\n", "\n")
    assert "[saga_id=s-1]" in as_text.splitlines()[0]


def test_json_unless_stderr_is_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    try:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
        logs.configure_logging(logging.INFO)
        assert isinstance(root.handlers[-1].formatter, logs.JsonFormatter)
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
        logs.configure_logging(logging.INFO)
        assert isinstance(root.handlers[-1].formatter, logs.TextFormatter)
        assert len(root.handlers) == 1
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])


def test_consumer_lag_sums_the_assigned_partitions_of_each_topic() -> None:
    stats = {"topics": {
        "t.replies": {"partitions": {
            "0": {"desired": True, "consumer_lag": 3},
            "1": {"desired": True, "consumer_lag": 4},
            "2": {"desired": False, "consumer_lag": 100},  # another worker's
            "3": {"desired": True, "consumer_lag": -1},  # not known yet
            "-1": {"desired": False, "consumer_lag": -1}}},
        "t.unknown": {"partitions": {"0": {"desired": True, "consumer_lag": -1}}}}}
    metrics.SAMPLES.consumer_lag = {("other-group", "x"): 9, ("g", "t.gone"): 5}
    metrics.consumer_lag("g", json.dumps(stats))
    assert metrics.SAMPLES.consumer_lag == {("other-group", "x"): 9, ("g", "t.replies"): 7}


def test_a_series_that_empties_reports_zero() -> None:
    metrics.SAMPLES.in_flight = {}
    metrics.SAMPLES.dead_letters_pending = {}
    metrics.store_gauges({("transfer", "RUNNING"): 2}, 1, 0.5, {"SAME_ACCOUNT": 1})
    metrics.store_gauges({}, 0, 0.0, {})
    assert metrics.SAMPLES.in_flight == {("transfer", "RUNNING"): 0}
    assert metrics.SAMPLES.dead_letters_pending == {"SAME_ACCOUNT": 0}
    assert (metrics.SAMPLES.outbox_backlog, metrics.SAMPLES.outbox_oldest_age_s) == (0, 0.0)
