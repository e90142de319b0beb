"""The console's front page in numbers, and sagas named by a prefix of their id.

`overview` counts the sagas by status and type, and measures the last hour: how many sagas
ended (reached a terminal status), per minute, and the 50th and 99th percentiles of their
duration from the first event to the last. It reads the `sagas` projection only, through its
`(status, updated_at)` index: a terminal saga's `updated_at` is the time of its terminal event.
"""

from __future__ import annotations

from typing import Any, Final
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.errors import NotFound

TERMINAL_STATUSES: Final = ("COMPLETED", "COMPENSATED", "REJECTED", "FAILED")
WINDOW_S: Final = 3600
# Prefixes shorter than this match too much by accident (as for dead letters).
MIN_PREFIX_HEX_DIGITS: Final = 4
_AMBIGUOUS_SHOWN = 5


async def overview(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        counts = (await conn.execute(text(
            "SELECT saga_type, status, count(*) AS n FROM sagas GROUP BY saga_type, status"
            " ORDER BY saga_type, status"))).all()
        finished = (await conn.execute(text(
            "SELECT saga_type, count(*) AS n,"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at -"
            "  created_at)) AS p50_s,"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at -"
            "  created_at)) AS p99_s"
            " FROM sagas WHERE status = ANY(:terminal)"
            " AND updated_at > clock_timestamp() - make_interval(secs => :window)"
            " GROUP BY ROLLUP (saga_type) ORDER BY saga_type NULLS FIRST"),
            {"terminal": list(TERMINAL_STATUSES), "window": WINDOW_S})).all()
    by_status: dict[str, int] = {}
    by_type: dict[str, dict[str, int]] = {}
    for row in counts:
        by_status[row.status] = by_status.get(row.status, 0) + row.n
        by_type.setdefault(row.saga_type, {})[row.status] = row.n

    def window(row: Any) -> dict[str, Any]:
        return {"finished": row.n, "per_minute": round(row.n / (WINDOW_S / 60), 2),
                "p50_ms": _ms(row.p50_s), "p99_ms": _ms(row.p99_s)}

    total = next((window(r) for r in finished if r.saga_type is None),
                 {"finished": 0, "per_minute": 0.0, "p50_ms": None, "p99_ms": None})
    return {
        "by_status": by_status, "by_type": by_type, "total": sum(by_status.values()),
        "last_hour": {**total, "window_s": WINDOW_S,
                      "by_type": {r.saga_type: window(r) for r in finished
                                  if r.saga_type is not None}},
    }


def _ms(seconds: Any) -> float | None:
    return None if seconds is None else round(float(seconds) * 1000, 1)


def prefix_range(wanted: str) -> tuple[UUID, UUID] | None:
    """The lowest and highest saga id a hex prefix can stand for, or None when `wanted` is not
    a prefix of a saga id (then it may still be a business key). uuids order by their bytes,
    which is the order of their hex spelling, so a prefix is a range on the primary key."""
    digits = wanted.strip().lower().replace("-", "")
    if not MIN_PREFIX_HEX_DIGITS <= len(digits) < 32 or any(
            c not in "0123456789abcdef" for c in digits):
        return None
    return UUID(digits.ljust(32, "0")), UUID(digits.ljust(32, "f"))


async def saga_id_by_prefix(engine: AsyncEngine, wanted: str) -> UUID | None:
    """The one saga whose id starts with `wanted`; None if none does or it is no prefix.
    A prefix several sagas share raises NotFound listing some (as a dead letter's prefix does):
    acting on a guess would be worse than asking for more of the id."""
    bounds = prefix_range(wanted)
    if bounds is None:
        return None
    async with engine.connect() as conn:
        matches = list((await conn.execute(text(
            "SELECT saga_id FROM sagas WHERE saga_id BETWEEN :lo AND :hi ORDER BY saga_id"
            " LIMIT :n"), {"lo": bounds[0], "hi": bounds[1], "n": _AMBIGUOUS_SHOWN + 1}
        )).scalars())
    if len(matches) > 1:
        shown = ", ".join(str(m) for m in matches[:_AMBIGUOUS_SHOWN])
        more = " and more" if len(matches) > _AMBIGUOUS_SHOWN else ""
        raise NotFound(f"saga id prefix {wanted!r} is ambiguous: it matches {shown}{more};"
                              " give more of the id")
    return UUID(str(matches[0])) if matches else None
