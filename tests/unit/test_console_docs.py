"""docs/operations/console.md agrees with the code: every `saga` line in its examples parses
with the real CLI parser, and its settings table names exactly the console's settings."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from orchestrator.cli import build_parser
from orchestrator.settings import Settings

PAGE = Path(__file__).resolve().parents[2] / "docs" / "operations" / "console.md"
TEXT = PAGE.read_text(encoding="utf-8")


def test_every_saga_command_in_the_examples_parses() -> None:
    lines = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", TEXT,
                                                                re.DOTALL)
             for line in block.splitlines()]
    commands = [shlex.split(line.replace("$(", " ").replace(")", " "))
                for line in lines if "saga " in line and not line.startswith("export")]
    argvs = [tokens[tokens.index("saga") + 1:] for tokens in commands if "saga" in tokens]

    assert len(argvs) >= 4
    for argv in argvs:
        build_parser().parse_args([a for a in argv if a != "&"])


def test_the_settings_table_names_every_console_setting() -> None:
    documented = set(re.findall(r"^\| `SAGA_(CONSOLE_[A-Z_]+)`", TEXT, re.MULTILINE))
    fields = {name.upper() for name in Settings.model_fields if name.startswith("console_")}

    assert documented == fields - {"CONSOLE_COOKIE_SECURE"}
    assert "SAGA_CONSOLE_COOKIE_SECURE" in TEXT
