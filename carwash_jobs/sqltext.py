"""Portable SQL text: statements are written once with `:name` parameters (what sqlite3
accepts) and turned into asyncpg's numbered `$1` form for PostgreSQL."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

#: The condition of the list indexes on status (migration 0008: running jobs are left out).
#: SQLite uses a partial index only for a query whose WHERE contains the index's condition word
#: for word, so its queries that read those indexes state it beside their status filter.
#: PostgreSQL proves it from a literal status, but not from the parameter of a prepared
#: `status = $1` in a generic plan: its lists state it too.
NOT_RUNNING = "status <> 'running'"

# a :name not preceded by another colon (so PostgreSQL casts like `x::jsonb` stay as they are),
# outside of quoted strings
_PARAM = re.compile(r"'(?:[^']|'')*'|(?<!:):([A-Za-z_][A-Za-z0-9_]*)")


@lru_cache(maxsize=512)
def _numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    names: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return match.group(0)  # a quoted string: leave it alone
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAM.sub(replace, sql), tuple(names)


def numbered(sql: str, params: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
    """`SELECT :a, :b, :a` with {a, b} -> (`SELECT $1, $2, $1`, [a, b])."""
    text, names = _numbered(sql)
    values = params or {}
    missing = [n for n in names if n not in values]
    if missing:
        raise KeyError(f"SQL parameter(s) not given: {', '.join(missing)}")
    return text, [values[n] for n in names]
