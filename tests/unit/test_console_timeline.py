"""The timeline chart's layout, given a saga's events as the API answers them: rows in the
order things started, attempts and retries as bars, parallel members marked, positions on one
axis. Pure: the clock is passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator.console.timeline import MIN_WIDTH_PCT, format_ms, layout
from steps.saga import TRANSFER

T0 = datetime(2026, 12, 5, 10, 0, 0, tzinfo=UTC)


def event(ms: float, kind: str, step: str | None = None, n: int | None = None,
          actor: str | None = None, **payload: Any) -> dict[str, Any]:
    """An event `ms` after the start; `n` is the event's attempt column."""
    return {"recorded_at": (T0 + timedelta(milliseconds=ms)).isoformat(), "type": kind,
            "step": step, "attempt": n, "payload": payload, "detail": "", "actor": actor}


def started(ms: float, step: str, direction: str = "forward", attempt: int = 1
            ) -> dict[str, Any]:
    return event(ms, "StepStarted", step, attempt, direction=direction,
                 action=f"x.{step}", attempt=attempt)


COMPENSATED = [
    event(0, "SagaStarted"),
    started(0, "screen"), started(0, "reserve"),
    event(20, "StepFailed", "screen", 1, code="PROVIDER_UNAVAILABLE", reason="down",
          retryable=True),
    event(20, "StepRetryScheduled", "screen", 2, direction="forward", attempt=2),
    event(25, "StepSucceeded", "reserve", 1, result={"held": "250.00"}),
    started(120, "screen", attempt=2),
    event(140, "StepSucceeded", "screen", 2, result={"screened": True}),
    started(140, "credit"), event(160, "StepSucceeded", "credit", 1),
    started(160, "settle"),
    event(180, "StepFailed", "settle", 1, code="DAILY_LIMIT_EXCEEDED", reason="over",
          retryable=False),
    started(180, "credit", "compensate"), event(190, "StepCompensated", "credit", 1),
    started(190, "reserve", "compensate"), event(200, "StepCompensated", "reserve", 1),
    event(200, "SagaCompensated", failed_step="settle", reason="over"),
]


def test_rows_read_in_the_order_things_started_with_compensations_last() -> None:
    chart = layout(COMPENSATED, "COMPENSATED", T0 + timedelta(hours=1), TRANSFER)

    assert [(r.step, r.direction, r.outcome) for r in chart.rows] == [
        ("screen", "forward", "succeeded"), ("reserve", "forward", "succeeded"),
        ("credit", "forward", "succeeded"), ("settle", "forward", "failed"),
        ("credit", "compensate", "compensated"), ("reserve", "compensate", "compensated")]
    assert [r.parallel for r in chart.rows] == [True, True, False, False, False, False]
    assert chart.rows[3].failure == "DAILY_LIMIT_EXCEEDED: over"
    assert chart.rows[3].status_words == "failed for good"
    assert chart.rows[1].result == {"held": "250.00"}
    # a terminal saga's axis ends at its last event, not at `now`
    assert (chart.live, chart.span_ms) == (False, 200.0)
    assert [m.label for m in chart.markers] == ["started", "compensated"]


def test_a_retry_is_two_attempts_with_the_backoff_between() -> None:
    chart = layout(COMPENSATED, "COMPENSATED", T0, TRANSFER)

    screen = chart.rows[0]
    assert [(b.kind, b.attempt, b.outcome) for b in screen.bars] == [
        ("attempt", 1, "retryable"), ("wait", 2, None), ("attempt", 2, "succeeded")]
    assert [(b.left_pct, b.width_pct) for b in screen.bars] == [
        (0.0, 10.0), (10.0, 50.0), (60.0, 10.0)]
    assert screen.status_words == "succeeded (attempt 2)"
    assert screen.duration_ms == 140.0


def test_a_running_saga_reaches_now_and_a_tiny_step_stays_visible() -> None:
    events = [event(0, "SagaStarted"), started(0, "screen"), started(0, "reserve"),
              event(1, "StepSucceeded", "reserve", 1),
              event(400, "StepTimedOut", "screen", 1, direction="forward", attempt=1,
                    resend=1)]
    chart = layout(events, "RUNNING", T0 + timedelta(seconds=1), TRANSFER)

    reserve, screen = sorted(chart.rows, key=lambda r: r.step)
    assert chart.live and chart.span_ms == 1000.0
    assert (screen.outcome, screen.bars[0].width_pct, screen.bars[0].resend_pcts) == (
        "awaiting", 100.0, [40.0])
    assert reserve.bars[0].width_pct == MIN_WIDTH_PCT
    assert [t.label for t in chart.ticks] == ["0", "200 ms", "400 ms", "600 ms", "800 ms",
                                              "1 s"]


def test_an_operator_event_is_a_marker_with_its_actor_and_unknown_types_still_lay_out(
) -> None:
    events = [event(0, "SagaStarted", actor="orchestrator#1"), started(0, "ship"),
              event(50, "SagaResolved", actor="olivia")]
    chart = layout(events, "RESOLVED", T0, definition=None)

    assert [(r.step, r.parallel, r.outcome) for r in chart.rows] == [
        ("ship", False, "no reply")]
    assert [(m.label, m.actor, m.by_person, m.left_pct) for m in chart.markers] == [
        ("started", "orchestrator#1", False, 0.0), ("SagaResolved", "olivia", True, 100.0)]


def test_durations_read_as_people_say_them() -> None:
    assert [format_ms(v) for v in (0.25, 12.4, 999, 1500, 2000, 90_000)] == [
        "0.25 ms", "12 ms", "999 ms", "1.5 s", "2 s", "1.5 min"]
