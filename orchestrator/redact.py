"""What personal and account data may look like outside the database: masked.

Logs, span attributes, metric labels, dead-letter reasons and refusal reasons (which end up in
dead letters and in the logs) never carry an account id, a reference or a name in the clear.
The database keeps the real values; an operator reads them there (`saga timeline`).
Pure: any layer, and the applications, may use it.
"""

from __future__ import annotations

import re

_SHOWN = 4


def mask_account(account_id: object) -> str:
    """An account id as logs may show it: its last four characters, e.g. `****1234` (enough to
    tell two accounts of one transfer apart, not to name one). Ids of four characters or fewer
    are masked whole."""
    text = str(account_id)
    if len(text) <= _SHOWN:
        return "****"
    return "****" + text[-_SHOWN:]


# What an error's text may carry of the data it failed on, and what replaces it:
# - PostgreSQL's DETAIL line (asyncpg puts it in the message): "Key (account_id)=(...)",
#   "Failing row contains (...)";
# - pydantic's `input_value=...` in a ValidationError's text (up to `, input_type=`);
# - SQLAlchemy's parameters, should an engine without `hide_parameters` ever be used.
_HIDDEN = (
    (re.compile(r"^([ \t]*DETAIL:).*$", re.MULTILINE), r"\1 (hidden)"),
    (re.compile(r"input_value=.*?(, input_type=)"), r"input_value=(hidden)\1"),
    (re.compile(r"\[parameters: .*?\]$", re.MULTILINE | re.DOTALL), "[parameters hidden]"),
)


def redact_text(text: str) -> str:
    """`text` (an error's message, a traceback) without the values it may quote from the data
    it failed on. Applied to every log line the workers write and to dead-letter reasons made
    from an exception."""
    if "DETAIL" not in text and "input_value=" not in text and "[parameters: " not in text:
        return text
    for pattern, replacement in _HIDDEN:
        text = pattern.sub(replacement, text)
    return text


def describe_error(error: BaseException) -> str:
    """`ErrorClass: message`, as a dead-letter reason may say it (see `redact_text`)."""
    return redact_text(f"{type(error).__name__}: {error}")
