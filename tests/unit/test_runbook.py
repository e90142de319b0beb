"""The on-call runbook agrees with the code it tells people to run.

An engineer at 3 a.m. copies commands from docs/operations/runbook.md: every `saga ...` line in
its code blocks must parse with the real CLI parser, every command quoted inline must name real
subcommands and flags, every saga status, event type and dead-letter reason code must be
explained, the settings table must quote the real defaults, and its SQL must only read (plus the
one guarded outbox insert) from tables that exist.
"""

from __future__ import annotations

import argparse
import re
import shlex
import typing
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from orchestrator.cli import build_parser
from orchestrator.core.saga import SagaStatus
from orchestrator.settings import Settings
from schemas import RejectionCode
from schemas.events import SagaEvent

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "operations" / "runbook.md"
MIGRATIONS = (ROOT / "orchestrator" / "postgres" / "migrations", ROOT / "steps" / "migrations")
TEXT = RUNBOOK.read_text()

# Words a reader replaces with a real id; a dummy uuid stands in for them when parsing.
PLACEHOLDERS = {"ID", "SAGA_ID", "TRANSFER_ID", "DEAD_LETTER_ID"}
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def code_blocks(language: set[str]) -> list[str]:
    return [body for lang, body in _FENCE.findall(TEXT) if lang in language]


def prose() -> str:
    """The page without its fenced code blocks."""
    return _FENCE.sub("", TEXT)


def saga_argv(line: str) -> list[str] | None:
    """The arguments after `saga` in one shell line (`saga ...`, `VAR=x saga ...` or
    `docker compose ... exec SERVICE saga ...`), or None when the line runs no saga command."""
    tokens = shlex.split(line, comments=True)
    while tokens and _ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "saga":
        start = 1
    elif tokens[0] == "docker" and "exec" in tokens and "saga" in tokens:
        start = tokens.index("saga", tokens.index("exec")) + 1
    else:
        return None
    argv: list[str] = []
    for token in tokens[start:]:
        if token in {"|", "&&", ";", ">", "2>&1"}:
            break
        argv.append(token)
    return argv


def block_commands() -> list[list[str]]:
    commands = []
    for body in code_blocks(SHELL_LANGUAGES):
        for line in body.splitlines():
            argv = saga_argv(line)
            if argv is not None:
                commands.append(argv)
    return commands


def inline_commands() -> list[list[str]]:
    """Inline code spans that start with a saga subcommand (log lines such as
    `saga <id> FAILED ...` are not commands and are left out)."""
    spans = re.findall(r"`(saga [^`]+)`", prose())
    return [shlex.split(span)[1:] for span in spans if re.match(r"saga [a-z]", span)]


def substituted(argv: list[str]) -> list[str]:
    dummy = str(uuid4())
    return [dummy if token in PLACEHOLDERS else token for token in argv]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parse(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`saga {shlex.join(argv)}` does not parse (see stderr)")


def test_the_page_has_commands_to_check() -> None:
    commands = block_commands()
    assert len(commands) >= 15, commands
    # The first five minutes, as the on-call engineer is told to run them.
    first = {tuple(argv[:2]) for argv in commands}
    for expected in [("stuck",), ("check", "--json"), ("dlq", "list"), ("list", "--status")]:
        assert any(c[: len(expected)] == expected for c in first), expected
    assert ["list", "--status", "FAILED"] in commands


@pytest.mark.parametrize("argv", block_commands(), ids=shlex.join)
def test_every_command_in_a_code_block_parses(argv: list[str]) -> None:
    args = parse(substituted(argv))

    assert callable(args.run)


@pytest.mark.parametrize("argv", inline_commands(), ids=shlex.join)
def test_every_inline_command_names_real_subcommands_and_flags(argv: list[str]) -> None:
    """Inline spans may leave out arguments (`saga dlq show`), so they are checked for what they
    do name: each subcommand exists, and each flag exists on the command it is given to."""
    parser = build_parser()
    words = list(argv)
    # A flag before any subcommand is the current command's own (`saga dev --json`: `dev` has
    # an optional subcommand, `token`).
    while words and not words[0].startswith("-") and (choices := subparsers(parser)):
        assert words[0] in choices, f"`saga {shlex.join(argv)}`: no command {words[0]!r}"
        parser = choices[words.pop(0)]
    flags = [word.split("=")[0] for word in words if word.startswith("-")]
    unknown = [flag for flag in flags if flag not in parser._option_string_actions]
    assert not unknown, f"`saga {shlex.join(argv)}`: no option {unknown}"


def test_every_saga_status_has_its_own_section() -> None:
    headings = re.findall(r"^### ([A-Z]+)\b", TEXT, re.MULTILINE)
    missing = [status.value for status in SagaStatus if status.value not in headings]
    assert not missing, f"no '### STATUS' section for {missing}"


def event_types() -> list[str]:
    union = typing.get_args(SagaEvent)[0]
    return [model.model_fields["type"].default for model in typing.get_args(union)]


def test_every_event_type_has_a_row_in_the_event_table() -> None:
    types = event_types()
    assert len(types) >= 12, types  # the union was read, not an empty tuple
    missing = [name for name in types if f"| `{name}` |" not in TEXT]
    assert not missing, f"no event-table row for {missing}"


def test_every_rejection_code_has_a_row_in_the_dead_letter_table() -> None:
    missing = [code.value for code in RejectionCode
               if not re.search(rf"^\| `{code.value}` \|", TEXT, re.MULTILINE)]
    assert not missing, f"no dead-letter-table row for {missing}"


def _default(name: str) -> Any:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def _as_documented(value: Any) -> str:
    if value is None:
        return "unset"
    if value == "":
        return '""'
    return str(value)


def test_the_settings_table_quotes_the_real_defaults() -> None:
    rows = re.findall(r"^\| `SAGA_([A-Z0-9_]+)` \| `([^`]*)` \|", TEXT, re.MULTILINE)
    assert len(rows) >= 15, rows
    for name, documented in rows:
        field = name.lower()
        assert field in Settings.model_fields, f"SAGA_{name} is not a setting"
        assert documented == _as_documented(_default(field)), f"SAGA_{name}"


def test_every_setting_named_anywhere_exists() -> None:
    named = set(re.findall(r"\bSAGA_([A-Z0-9_]+)\b", TEXT)) - {"ID"}  # SAGA_ID: a placeholder
    unknown = sorted(name for name in named if name.lower() not in Settings.model_fields)
    assert not unknown, [f"SAGA_{name}" for name in unknown]


def _tables() -> set[str]:
    sql = "\n".join(path.read_text() for folder in MIGRATIONS for path in folder.glob("*.sql"))
    created = set(re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", sql))
    return created | {"pg_stat_activity", "pg_locks"}


def test_the_sql_only_reads() -> None:
    """Every change an operator makes goes through a `saga` command or the console (recorded
    with its actor); the runbook's SQL is for reading."""
    blocks = code_blocks({"sql"})
    assert blocks
    statements = " ".join(re.sub(r"--[^\n]*", "", block) for block in blocks)
    for verb in ("UPDATE", "DELETE", "TRUNCATE", "DROP", "ALTER"):
        assert not re.search(rf"\b{verb}\b", statements, re.IGNORECASE), verb
    assert not re.search(r"\bINSERT\b", statements, re.IGNORECASE)


def test_the_sql_names_only_tables_that_exist() -> None:
    statements = " ".join(re.sub(r"--[^\n]*", "", block) for block in code_blocks({"sql"}))
    ctes = set(re.findall(r"\b(\w+)\s+AS\s*\(", statements, re.IGNORECASE))
    named = set(re.findall(r"\b(?:FROM|JOIN|INTO)\s+([a-z_]+)\b", statements, re.IGNORECASE))
    unknown = named - _tables() - ctes
    assert not unknown, unknown
    assert {"ledger_entries", "accounts", "participant_replies", "workers"} <= named


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_resolves() -> None:
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", prose(), re.MULTILINE)}
    links = re.findall(r"\]\(([^)\s]+)\)", TEXT)
    assert links
    for link in links:
        path, _, anchor = link.partition("#")
        if not path:
            assert anchor in anchors, f"no heading for #{anchor}"
        else:
            assert (RUNBOOK.parent / path).exists(), path
