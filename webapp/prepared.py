"""SELECTs whose SQL text is built once per process: the statements (nearly) every page runs.

peewee builds a statement's SQL text from its expression tree on each execution, 0.11-0.17 ms
of Python per statement (docs/performance.md), while the database answers these in 0.03-0.06
ms. A ``Prepared`` statement is built once, with stand-in values, and its text kept; a later
call puts its values where the stand-ins sit in the parameter list and runs the kept text.
SQLAlchemy calls the same idea a baked query.

Only for statements whose shape never depends on the values: each value is a parameter and
nothing else (no ``if value`` in the builder, no ``None`` that would become ``IS NULL``).
Values are ints and strings, the types of ids and entity names; a call with another type, or
with a type other than the first call's, is refused rather than run with the wrong text.
"""

from __future__ import annotations

import threading
from typing import Callable

#: stand-ins: no id is negative, and PostgreSQL refuses NUL in text, so no real value equals one
_INT_BASE = -7_346_219_000_000
_KINDS = (int, str)


def _stand_in(kind: type, index: int):
    return _INT_BASE - index if kind is int else f"\x00stand-in {index}\x00"


class Prepared:
    """``Prepared(lambda uid: User.select().where(User.id == uid))``, then ``.rows(uid)``."""

    def __init__(self, build: Callable):
        self._build = build
        self._kept = None  # (query, sql, params, slots, kinds)
        self._lock = threading.Lock()

    def rows(self, *values) -> list:
        """The rows (model instances, as the built query gives them) for these values."""
        kinds = tuple(type(v) for v in values)
        kept = self._kept or self._prepare(kinds)
        query, sql, params, slots, kept_kinds = kept
        if kinds != kept_kinds:
            raise TypeError(f"prepared for {kept_kinds}, called with {kinds}")
        params = list(params)
        for position, index in slots:
            params[position] = values[index]
        cursor = query.model._meta.database.execute_sql(sql, params)
        return list(query._get_cursor_wrapper(cursor))

    def first(self, *values):
        found = self.rows(*values)
        return found[0] if found else None

    def _prepare(self, kinds: tuple):
        if any(kind not in _KINDS for kind in kinds):
            raise TypeError(f"only ints and strings can be prepared values, not {kinds}")
        with self._lock:
            if self._kept is None:
                stand_ins = [_stand_in(kind, i) for i, kind in enumerate(kinds)]
                query = self._build(*stand_ins)
                sql, params = query.sql()
                slots = [(position, stand_ins.index(p)) for position, p in enumerate(params)
                         if type(p) in _KINDS and p in stand_ins]
                missing = set(range(len(stand_ins))) - {index for _, index in slots}
                if missing:  # a value the builder dropped or turned into something else
                    raise ValueError(f"values {sorted(missing)} are not parameters of the statement")
                self._kept = (query, sql, params, slots, kinds)
        return self._kept


def shaped(cache: dict, key, build: Callable) -> Prepared:
    """The prepared statement for ``key`` in ``cache``, made on first use: one per shape of a
    statement whose text depends on more than its values (a seat's gate, a model)."""
    statement = cache.get(key)
    if statement is None:
        statement = cache.setdefault(key, Prepared(build))
    return statement
