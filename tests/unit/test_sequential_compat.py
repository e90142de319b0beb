"""Sequential sagas behave exactly as before parallel groups, and what older code persisted
still folds and loads the same.

`data/sequential_histories.json` was recorded by the code before parallel groups (commit
09cd005; `data/record_sequential_histories.py` says how): sequential transfer sagas driven
through the pure core by a seeded participant that succeeds, refuses, asks for a retry, stays
silent past the deadline, or answers twice or late. Recorded again with today's code, every
input must give the same decision, and every state cached then (the `sagas` row's JSON, written
without `runs`) must load as the state today's fold of the same events gives.

The recording predates generic saga types too: its events are read as today's code reads such
rows (upcast: `transfer_id` becomes the business key), and its cached states as migration 0009
rewrote them, before they are compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.saga import SagaState, fold
from schemas import SAGA_EVENT_ADAPTER, StepCommand, StepReply
from tests.unit.data.record_sequential_histories import record

RECORDED = json.loads((Path(__file__).parent / "data" / "sequential_histories.json").read_text())


def test_the_recording_covers_every_ending_and_the_stale_replies() -> None:
    endings = {saga["steps"][-1]["state"]["status"] for saga in RECORDED["sagas"]}
    verdicts = {step["decision"]["verdict"] for saga in RECORDED["sagas"]
                for step in saga["steps"] if step["decision"]}
    assert endings == {"COMPLETED", "COMPENSATED", "FAILED"}
    assert verdicts == {"started", "applied", "stale"}


def as_read_today(decision: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recorded decision with its events and commands as today's code reads them back."""
    if decision is None:
        return None
    return {**decision,
            "events": [SAGA_EVENT_ADAPTER.validate_python(e).model_dump(mode="json")
                       for e in decision["events"]],
            "commands": [StepCommand.model_validate({"payload": {}, **c}).model_dump(
                mode="json", exclude=None if "payload" in c else {"payload"})
                for c in decision["commands"]]}


def input_as_read_today(message: dict[str, Any]) -> dict[str, Any]:
    """A recorded input as today's code reads it: a reply recorded before replies named their
    participant instance (`applied_by`) reads as naming none."""
    if "reply" not in message:
        return message
    return {"reply": StepReply.model_validate(message["reply"]).model_dump(mode="json")}


def as_migrated(cached: dict[str, Any]) -> dict[str, Any]:
    """A cached state as migration 0009 rewrote it: the transfer id as the business key, and
    version 1 for a saga that ran."""
    if "transfer_id" not in cached:
        return cached
    state = {k: v for k, v in cached.items() if k != "transfer_id"}
    state["business_key"] = cached["transfer_id"]
    state["definition_version"] = 1 if cached["status"] != "REJECTED" else None
    return state


@pytest.fixture(scope="module")
def recorded_today() -> list[dict[str, Any]]:
    return record()


@pytest.mark.parametrize("n", range(len(RECORDED["sagas"])))
def test_the_same_inputs_give_the_same_decisions(recorded_today: list[dict[str, Any]],
                                                 n: int) -> None:
    before, today = RECORDED["sagas"][n]["steps"], recorded_today[n]["steps"]

    assert ([input_as_read_today(step["input"]) for step in today]
            == [input_as_read_today(step["input"]) for step in before])
    assert ([as_read_today(step["decision"]) for step in today]
            == [as_read_today(step["decision"]) for step in before])


@pytest.mark.parametrize("n", range(len(RECORDED["sagas"])))
def test_states_cached_by_older_code_load_as_todays_fold(n: int) -> None:
    steps = RECORDED["sagas"][n]["steps"]
    saga_input = steps[0]["state"]["input"]
    events = []
    for step in steps:
        if step["decision"]:
            events += [SAGA_EVENT_ADAPTER.validate_python(e) for e in step["decision"]["events"]]
        cached = as_migrated({**step["state"], "input": saga_input})
        assert "runs" not in cached  # as the older code wrote it
        folded = fold(events)
        assert folded is not None

        assert SagaState.from_json(cached) == folded
        # and today's row says everything the older one did, the same way, plus the runs and
        # how it ended (its outcome event's details)
        assert {k: v for k, v in folded.to_json().items()
                if k not in ("runs", "conclusion")} == cached
