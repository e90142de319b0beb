"""What a viewer sees of account ids: their last four characters.

The engine is generic: it does not know which fields of a saga's start message, a step's
result or a dead letter's payload name accounts. The deployment says it, as a regular expression
on field names (`SAGA_CONSOLE_MASKED_FIELDS`; by default `account`, `*_account`, `account_id`,
`*_account_id`, `card_id`). Masking a JSON value takes two passes: the values of the named
fields are masked and remembered, then every other string of the same value (a timeline's
detail line such as `10.00 EUR acc-1 -> acc-2`, a dead letter's reason) has those remembered
values masked where they occur. A payload that is not JSON (a malformed request in a dead
letter) is masked by the same rule on its `"field": "value"` pairs, read as text.
"""

from __future__ import annotations

import json
import re
from typing import Any

_SHOWN = 4
# `"name": "value"` in JSON-ish text, with escaped quotes inside the value.
_PAIR = re.compile(r'"((?:[^"\\]|\\.){1,200})"(\s*:\s*)"((?:[^"\\]|\\.)*)"')


def mask_value(value: str) -> str:
    """`****1234`: the last four characters, the rest hidden (all of it when four or fewer)."""
    return "****" + (value[-_SHOWN:] if len(value) > _SHOWN else "")


class AccountMask:
    def __init__(self, field_pattern: str) -> None:
        try:
            self._field = re.compile(field_pattern)
        except re.error as error:
            raise ValueError(f"SAGA_CONSOLE_MASKED_FIELDS is not a regular expression: {error}"
                             ) from error

    def is_masked_field(self, name: str) -> bool:
        return self._field.search(name) is not None

    def json(self, data: Any, also: set[str] | None = None) -> Any:
        """A copy of `data` (JSON-like) with the named fields masked, and their values masked
        wherever else they occur in its strings. `also`: values known to be account ids from
        elsewhere (a dead letter's payload, for its reason and headers)."""
        seen = set(also or ())
        self._collect(data, seen)
        return self._apply(data, _Replacer(seen))

    def values_in_text(self, text: str) -> set[str]:
        """The values of the named fields in a payload's text, parsed as JSON or not."""
        seen: set[str] = set()
        try:
            document = json.loads(text)
        except ValueError:
            document = None
        if isinstance(document, dict | list):
            self._collect(document, seen)
        else:
            seen.update(match.group(3) for match in _PAIR.finditer(text)
                        if self.is_masked_field(match.group(1)) and match.group(3))
        return seen

    def text(self, text: str, also: set[str] | None = None) -> str:
        """A payload's text: as JSON if it parses (re-serialized), else by its `"field":
        "value"` pairs. `also`: values known to be account ids from elsewhere."""
        try:
            document = json.loads(text)
        except ValueError:
            document = None
        if isinstance(document, dict | list):
            seen = set(also or ())
            self._collect(document, seen)
            return json.dumps(self._apply(document, _Replacer(seen)), ensure_ascii=False)
        seen = set(also or ())
        for match in _PAIR.finditer(text):
            if self.is_masked_field(match.group(1)) and match.group(3):
                seen.add(match.group(3))
        return _Replacer(seen).replace(text)

    def _collect(self, data: Any, seen: set[str]) -> None:
        if isinstance(data, dict):
            for name, value in data.items():
                if isinstance(value, str) and value and self.is_masked_field(str(name)):
                    seen.add(value)
                else:
                    self._collect(value, seen)
        elif isinstance(data, list | tuple):
            for item in data:
                self._collect(item, seen)

    def _apply(self, data: Any, replacer: _Replacer) -> Any:
        if isinstance(data, dict):
            return {name: (mask_value(value) if isinstance(value, str)
                           and self.is_masked_field(str(name))
                           else self._apply(value, replacer))
                    for name, value in data.items()}
        if isinstance(data, list | tuple):
            return [self._apply(item, replacer) for item in data]
        if isinstance(data, str):
            return replacer.replace(data)
        return data


class _Replacer:
    """Masks every occurrence of known account ids in a string, longest first (so an id that
    contains another is masked whole)."""

    def __init__(self, values: set[str]) -> None:
        ordered = sorted((v for v in values if v), key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in ordered)) if ordered else None

    def replace(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: mask_value(match.group(0)), text)
