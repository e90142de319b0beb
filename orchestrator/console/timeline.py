"""A saga's timeline laid out for a chart: one row per step and direction, each a run of bars
on a shared time axis. Pure (no I/O, `now` passed in), so the layout is tested without a page.

A row is one step going forward, or one step being compensated; rows are ordered by when they
first started, so the chart reads top to bottom in the order things happened (a compensated
saga: its steps, then their compensations, most recent first). The members of one parallel
stage (ADR 0012) start together and get a row each, marked as one stage. Inside a row:

- an *attempt* bar from its `StepStarted` to its outcome (succeeded, failed, compensated, gave
  up), or to the end of the chart while its reply is still awaited;
- a *wait* bar from a `StepRetryScheduled` to the next attempt's start (the backoff);
- a *re-send* tick where a `StepTimedOut` re-sent the same attempt.

Saga-level events (started, ended, and any other event without a step, such as an operator's
action) are markers on the axis; the actor is named for those the engine does not record by
itself (the workers record the lifecycle, under their worker names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from orchestrator.core.definition import SagaDefinition

TERMINAL: Final = frozenset({"COMPLETED", "COMPENSATED", "REJECTED", "FAILED", "RESOLVED"})
# A bar never narrower than this share of the axis, so a 2 ms step in a 5 s saga is visible.
MIN_WIDTH_PCT: Final = 0.6
_STEP_EVENTS: Final = frozenset({"StepStarted", "StepSucceeded", "StepFailed",
                                 "StepCompensated", "CompensationFailed",
                                 "StepRetryScheduled", "StepTimedOut", "StepResent"})

Outcome = Literal["succeeded", "failed", "retryable", "compensated", "gave up", "awaiting",
                  "no reply"]
Direction = Literal["forward", "compensate"]


@dataclass
class Bar:
    kind: Literal["attempt", "wait"]
    attempt: int
    start: datetime
    end: datetime | None = None
    outcome: Outcome | None = None
    detail: str = ""
    resends: list[datetime] = field(default_factory=list)
    # filled by `layout`: position on the axis, in percent
    left_pct: float = 0.0
    width_pct: float = 0.0
    resend_pcts: list[float] = field(default_factory=list)

    @property
    def duration_ms(self) -> float | None:
        return None if self.end is None else (self.end - self.start).total_seconds() * 1000

    @property
    def words(self) -> str:
        """What the bar says, in words (the chart's colours only repeat it)."""
        if self.kind == "wait":
            return f"waiting to retry (attempt {self.attempt})"
        return f"attempt {self.attempt}: {self.outcome or 'awaiting'}"


@dataclass
class Row:
    step: str
    direction: Direction
    action: str
    stage: int | None
    bars: list[Bar] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    parallel: bool = False  # a member of a stage of several steps

    @property
    def attempts(self) -> int:
        return max((bar.attempt for bar in self.bars if bar.kind == "attempt"), default=0)

    @property
    def outcome(self) -> Outcome:
        last = next((bar for bar in reversed(self.bars) if bar.kind == "attempt"), None)
        if last is None:
            return "awaiting"
        return last.outcome or "awaiting"

    @property
    def status_words(self) -> str:
        """`succeeded`, `compensated`, `failed for good`, ... with the attempts it took."""
        outcome = self.outcome
        words = {"failed": "failed for good", "retryable": "failed, retry pending",
                 "awaiting": "awaiting its reply"}.get(outcome, outcome)
        if self.attempts > 1:
            words += f" (attempt {self.attempts})"
        return words

    @property
    def start(self) -> datetime:
        return self.bars[0].start

    @property
    def failure(self) -> str:
        last = next((bar for bar in reversed(self.bars) if bar.kind == "attempt"), None)
        return last.detail if last is not None and last.outcome in (
            "failed", "retryable", "gave up") else ""

    @property
    def duration_ms(self) -> float | None:
        ends = [bar.end for bar in self.bars if bar.end is not None]
        return (max(ends) - self.start).total_seconds() * 1000 if ends else None


_LIFECYCLE: Final = {"SagaStarted": "started", "SagaCompleted": "completed",
                     "SagaCompensated": "compensated", "SagaFailed": "failed",
                     "SagaRejected": "rejected"}


@dataclass(frozen=True)
class Marker:
    at: datetime
    label: str
    actor: str | None
    left_pct: float
    by_person: bool = False  # not the engine's own lifecycle event: name who did it


@dataclass(frozen=True)
class Tick:
    left_pct: float
    label: str


@dataclass
class Chart:
    start: datetime
    end: datetime
    live: bool
    rows: list[Row]
    markers: list[Marker]
    ticks: list[Tick]

    @property
    def span_ms(self) -> float:
        return (self.end - self.start).total_seconds() * 1000


def _time(value: str | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def format_ms(ms: float) -> str:
    if ms == 0:
        return "0"
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s".replace(".0 s", " s")
    return f"{ms / 60_000:.1f} min".replace(".0 min", " min")


def _tick_step_ms(span_ms: float, wanted: int = 6) -> float:
    step = 1.0
    while True:
        for factor in (1, 2, 5):
            if span_ms / (step * factor) <= wanted:
                return step * factor
        step *= 10


def layout(events: list[dict[str, Any]], status: str, now: datetime,
           definition: SagaDefinition | None = None) -> Chart:
    """The chart of a timeline (`events` as the API answers them: `recorded_at`, `type`,
    `step`, `attempt`, `payload`, `detail`, `actor`)."""
    rows: dict[tuple[str, str], Row] = {}
    markers: list[tuple[datetime, str, str | None, bool]] = []
    for event in events:
        at = _time(event["recorded_at"])
        kind, step, payload = event["type"], event.get("step"), event.get("payload") or {}
        if kind not in _STEP_EVENTS or not step:
            label = _LIFECYCLE.get(kind, kind)
            if kind == "OperatorActed":  # the action, in words: "cancel", "retry now"
                label = str(payload.get("action", kind)).replace("_", " ")
            markers.append((at, label, event.get("actor"),
                            kind not in _LIFECYCLE and bool(event.get("actor"))))
            continue
        direction: Direction = (
            "compensate" if kind in ("StepCompensated", "CompensationFailed")
            or payload.get("direction") == "compensate" else "forward")
        row = rows.get((step, direction))
        if row is None:
            stage = definition.stage_of(step) if definition and _known(definition, step) else None
            row = rows[(step, direction)] = Row(
                step, direction, str(payload.get("action", "")), stage,
                parallel=(direction == "forward" and definition is not None
                          and stage is not None and len(definition.stages[stage]) > 1))
        attempt = int(event.get("attempt") or payload.get("attempt") or 1)
        _fold(row, kind, at, attempt, payload, event.get("detail", ""))
    ordered = sorted(rows.values(), key=lambda r: (r.start, r.direction != "forward",
                                                   r.stage if r.stage is not None else 0))
    times = [_time(e["recorded_at"]) for e in events]
    start = min(times) if times else now
    live = status not in TERMINAL
    end = max([*times, now]) if live else (max(times) if times else now)
    span_s = max((end - start).total_seconds(), 0.001)

    def pct(at: datetime) -> float:
        return round(min(100.0, max(0.0, (at - start).total_seconds() / span_s * 100)), 3)

    for row in ordered:
        for bar in row.bars:
            bar.left_pct = pct(bar.start)
            right = pct(bar.end) if bar.end is not None else 100.0
            bar.width_pct = round(max(MIN_WIDTH_PCT, right - bar.left_pct), 3)
            bar.left_pct = min(bar.left_pct, round(100 - bar.width_pct, 3))
            bar.resend_pcts = [pct(at) for at in bar.resends]
            if bar.end is None and not live and bar.kind == "attempt":
                bar.outcome = "no reply"
    step_ms = _tick_step_ms(span_s * 1000)
    ticks = [Tick(round(n * step_ms / (span_s * 1000) * 100, 3), format_ms(n * step_ms))
             for n in range(int(span_s * 1000 // step_ms) + 1)]
    return Chart(start, end, live, ordered,
                 [Marker(at, label, actor, pct(at), person)
                  for at, label, actor, person in markers], ticks)


def _known(definition: SagaDefinition, step: str) -> bool:
    return any(s.name == step for s in definition.all_steps)


def _open(row: Row, kind: Literal["attempt", "wait"]) -> Bar | None:
    bar = row.bars[-1] if row.bars else None
    return bar if bar is not None and bar.kind == kind and bar.end is None else None


def _fold(row: Row, kind: str, at: datetime, attempt: int, payload: dict[str, Any],
          detail: str) -> None:
    if kind == "StepStarted":
        if row.action == "":
            row.action = str(payload.get("action", ""))
        waiting = _open(row, "wait")
        if waiting is not None:
            waiting.end = at
        row.bars.append(Bar("attempt", attempt, at))
        return
    if kind == "StepRetryScheduled":
        row.bars.append(Bar("wait", attempt, at))
        return
    bar = _open(row, "attempt")
    if bar is None:  # an outcome without its start (a stale reply): a point at its time
        bar = Bar("attempt", attempt, at)
        row.bars.append(bar)
    if kind == "StepResent":  # an operator's retry now: the same command sent again
        bar.resends.append(at)
        return
    if kind == "StepTimedOut":
        if payload.get("gave_up"):
            bar.end, bar.outcome, bar.detail = at, "gave up", detail
        else:
            bar.resends.append(at)
        return
    bar.end = at
    if kind in ("StepSucceeded", "StepCompensated"):
        bar.outcome = "succeeded" if kind == "StepSucceeded" else "compensated"
        row.result = dict(payload.get("result") or {})
    else:  # StepFailed, CompensationFailed
        bar.outcome = "retryable" if payload.get("retryable") else "failed"
        bar.detail = f"{payload.get('code', '')}: {payload.get('reason', '')}".strip(": ")
