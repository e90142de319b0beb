"""Export the JSON Schema of every message on the wire, for services written in other languages.

    python -m schemas.export [--check] [DIR]      # DIR defaults to docs/schemas

The files are generated from the pydantic models, never edited by hand; a unit test fails when
they are stale. With `--check` nothing is written and the exit status is 1 if any file differs.

Which pydantic mode each schema uses (the two can differ: a field with a default is optional
for a sender but always present in what pydantic emits, and a custom serializer can change a
field's JSON type):
- validation mode for the messages the orchestrator *consumes* from other services and validates
  on arrival: `TransferRequested` (upstream producers) and `StepReply` (participants). The schema
  then describes what a sender may send, which is what its authors need;
- serialization mode for what the orchestrator *produces*: `StepCommand`, `DeadLetter`, the
  saga events and the outcome events upstream services read (`saga_outcome.v1.json`). The
  schema then describes what a reader will receive.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas.events import SAGA_EVENT_ADAPTER
from schemas.messages import DeadLetter, StepCommand, StepReply, TransferRequested
from schemas.outcomes import SAGA_OUTCOME_ADAPTER

DEFAULT_DIRECTORY = Path("docs/schemas")
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def build_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema. File names carry the wire version (`.v1`): never rename one."""
    schemas: dict[str, dict[str, Any]] = {
        "transfer_requested.v1.json": TransferRequested.model_json_schema(mode="validation"),
        "step_reply.v1.json": StepReply.model_json_schema(mode="validation"),
        "step_command.v1.json": StepCommand.model_json_schema(mode="serialization"),
        "dead_letter.v1.json": DeadLetter.model_json_schema(mode="serialization"),
        "saga_event.v1.json": {
            "title": "SagaEvent",
            **SAGA_EVENT_ADAPTER.json_schema(mode="serialization"),
        },
        "saga_outcome.v1.json": {
            "title": "SagaOutcome",
            **SAGA_OUTCOME_ADAPTER.json_schema(mode="serialization"),
        },
    }
    return {name: {"$schema": _DIALECT, **schema} for name, schema in schemas.items()}


def render(schema: dict[str, Any]) -> str:
    """The exact text of a schema file: stable across runs, so staleness is a text comparison."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def stale_files(directory: Path) -> list[Path]:
    """The schema files under `directory` that are missing or differ from the models."""
    return [
        directory / name
        for name, schema in sorted(build_schemas().items())
        if not (directory / name).is_file()
        or (directory / name).read_text(encoding="utf-8") != render(schema)
    ]


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema under `directory` (created if needed); return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in sorted(build_schemas().items()):
        path = directory / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m schemas.export", description="Write the wire messages' JSON Schemas."
    )
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if any schema file is missing or stale")
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIRECTORY,
                        help=f"where the files go (default: {DEFAULT_DIRECTORY})")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.directory)
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        if stale:
            print("run `python -m schemas.export` to regenerate them", file=sys.stderr)
            return 1
        return 0
    for path in write_schemas(args.directory):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
