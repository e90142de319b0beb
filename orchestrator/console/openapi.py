"""The API's OpenAPI document, committed as docs/api/openapi.json so that clients can code
against it and a review shows every change to it. `python -m orchestrator.console.openapi`
writes it; `--check` only says whether the committed one is stale (a unit test runs that)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from orchestrator.console.app import create_app
from orchestrator.console.masking import AccountMask
from orchestrator.console.security import Console
from orchestrator.settings import Settings

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "api" / "openapi.json"


def build_document() -> dict[str, Any]:
    """The document of the app as `saga serve` runs it (no database needed to describe it)."""
    settings = Settings()
    console = Console(settings=settings, engine=None, verifier=None, sagas={},
                      mask=AccountMask(settings.console_masked_fields))
    return create_app(console).openapi()


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report a stale document")
    parser.add_argument("path", nargs="?", type=Path, default=DOCUMENT)
    args = parser.parse_args(argv)
    wanted = render(build_document())
    if args.check:
        current = args.path.read_text(encoding="utf-8") if args.path.is_file() else None
        if current != wanted:
            print(f"{args.path} is stale: run `python -m orchestrator.console.openapi` and"
                  " commit the result", file=sys.stderr)
            return 1
        return 0
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
