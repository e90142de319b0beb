"""Crash points: a worker kills itself at a named point, for the chaos tests.

Set `SAGA_CRASH_AT=<point>[:<step>][:<nth>]` in a worker's environment, for example
`orchestrator.after_commit`, `participant.after_effect:reserve`, or
`participant.after_effect:credit@compensate:2` (the second time a batch holding the compensation
of `credit` reaches that point). The worker then sends itself SIGKILL there: no cleanup, no
flush, exactly what a power cut or an OOM kill does to the process. `SAGA_CRASH_SIGNAL=STOP`
sends SIGSTOP instead, which freezes the worker as a zombie that a test can later SIGCONT.

Off by default, and costless when off: `crash_point` returns on its first line.

Points (see `POINTS`): for each consuming worker, after consuming and before its transaction,
inside the transaction before commit, after commit and before producing, after producing and
before committing the offset; in the relay between publishing and marking published; in a
participant after its effect committed and before its reply is produced.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from orchestrator.errors import ConfigurationError

POINTS = frozenset({
    "orchestrator.after_consume", "orchestrator.before_commit", "orchestrator.after_commit",
    "orchestrator.after_produce",
    "participant.after_consume", "participant.before_commit", "participant.after_effect",
    "participant.after_produce",
    "relay.after_publish",
    "recovery.before_commit", "recovery.after_commit",
})


@dataclass(frozen=True)
class CrashPlan:
    point: str
    step: str | None = None  # "credit" or "credit@compensate"
    nth: int = 1
    sig: signal.Signals = signal.SIGKILL

    def matches(self, point: str, steps: Iterable[str]) -> bool:
        if point != self.point:
            return False
        if self.step is None:
            return True
        return any(s == self.step or s.split("@", 1)[0] == self.step for s in steps)


def parse(value: str | None, sig: str | None = None) -> CrashPlan | None:
    if not value:
        return None
    parts = value.split(":")
    if parts[0] not in POINTS or len(parts) > 3:
        raise ConfigurationError(
            f"SAGA_CRASH_AT={value!r}: expected <point>[:<step>][:<nth>] with a point among "
            f"{', '.join(sorted(POINTS))}")
    step = parts[1] or None if len(parts) > 1 else None
    try:
        nth = int(parts[2]) if len(parts) > 2 else 1
    except ValueError as error:
        raise ConfigurationError(f"SAGA_CRASH_AT={value!r}: <nth> must be a number") from error
    if nth < 1:
        raise ConfigurationError(f"SAGA_CRASH_AT={value!r}: <nth> counts from 1")
    signal_name = (sig or "KILL").upper()
    if signal_name not in ("KILL", "STOP"):
        raise ConfigurationError(f"SAGA_CRASH_SIGNAL={sig!r}: KILL or STOP")
    return CrashPlan(parts[0], step, nth, signal.Signals[f"SIG{signal_name}"])


_plan = parse(os.environ.get("SAGA_CRASH_AT"), os.environ.get("SAGA_CRASH_SIGNAL"))
_hits = 0


def crash_point(point: str, steps: Iterable[str] = ()) -> None:
    """Die here if this process was told to. `steps` are what the batch at hand touches, as
    `name@direction` (for example `reserve@forward`), for the plan's step filter."""
    if _plan is None:
        return
    global _hits
    if not _plan.matches(point, steps):
        return
    _hits += 1
    if _hits != _plan.nth:
        return
    sys.stderr.write(f"crash point {point} (hit {_hits}): sending myself {_plan.sig.name}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), _plan.sig)


def step_tags(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """`name@direction` tags for `crash_point` from (step, direction) pairs."""
    return [f"{step}@{direction}" for step, direction in pairs]
