"""SELECTs prepared once: the statements (nearly) every page runs.

Twice over. In Python, peewee builds a statement's SQL text from its expression tree on each
execution, 0.11-0.17 ms per statement (docs/performance.md): a ``Prepared`` statement is built
once, with stand-in values, and its text kept. In PostgreSQL, a statement sent as text is
parsed and planned on every execution, which for these short lookups costs more than running
them (a record page's nine statements: 0.77 ms as text, 0.31 ms prepared): the kept text is
sent once per pooled connection as ``PREPARE``, and each call is an ``EXECUTE`` with the
values. SQLAlchemy calls the first idea a baked query; psycopg 3 does the second by itself.

Only for statements whose shape never depends on the values: each value is a parameter and
nothing else (no ``if value`` in the builder, no ``None`` that would become ``IS NULL``).
Values are ints and strings, the types of ids and entity names; a call with another type, or
with a type other than the first call's, is refused rather than run with the wrong text.
PostgreSQL plans such a statement for its values the first five times and then settles on a
plan for any values when that is not dearer: fine for lookups by id, owner and team, not for
a search word whose matches may be few or many (those stay unprepared).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Callable, NamedTuple

from psycopg2.extensions import AsIs

#: stand-ins: no id is negative, and PostgreSQL refuses NUL in text, so no real value equals one
_INT_BASE = -7_346_219_000_000
_KINDS = (int, str)
_NAMES = itertools.count(1)

#: Every statement prepared in this process, by name: ``as_select`` reads what each one runs.
_by_name: dict[str, "Prepared"] = {}

#: The statements each pooled connection has prepared, by connection: a new connection (the
#: pool replaces stale ones) starts with none. Nothing here deallocates them; a prepared
#: statement lives as long as its connection, also through a rolled-back transaction.
_prepared_on: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Kept(NamedTuple):
    query: object  # the query built with stand-ins: its model and how it turns rows into objects
    kinds: tuple  # the values' types
    prepare: tuple  # (sql, params) of the PREPARE
    execute: str  # the EXECUTE, with a placeholder per value
    select: tuple  # (sql, params) of the SELECT, stand-ins in place
    slots: list  # (position in the SELECT's params, index of the value) of each stand-in


def _stand_in(kind: type, index: int):
    return _INT_BASE - index if kind is int else f"\x00stand-in {index}\x00"


class Prepared:
    """``Prepared(lambda uid: User.select().where(User.id == uid))``, then ``.rows(uid)``."""

    def __init__(self, build: Callable):
        self._build = build
        self._name = f"crm_prepared_{next(_NAMES)}"
        self._kept: _Kept | None = None
        self._lock = threading.Lock()
        _by_name[self._name] = self

    def rows(self, *values) -> list:
        """The rows (model instances, as the built query gives them) for these values."""
        kinds = tuple(type(v) for v in values)
        kept = self._kept or self._prepare(kinds)
        if kinds != kept.kinds:
            raise TypeError(f"prepared for {kept.kinds}, called with {kinds}")
        database = kept.query.model._meta.database
        connection = database.connection()
        names = _prepared_on.get(connection)
        if names is None:
            names = _prepared_on.setdefault(connection, set())
        if self._name not in names:
            database.execute_sql(*kept.prepare)
            names.add(self._name)
        cursor = database.execute_sql(kept.execute, values)
        return list(kept.query._get_cursor_wrapper(cursor))

    def first(self, *values):
        found = self.rows(*values)
        return found[0] if found else None

    def _prepare(self, kinds: tuple) -> _Kept:
        if any(kind not in _KINDS for kind in kinds):
            raise TypeError(f"only ints and strings can be prepared values, not {kinds}")
        with self._lock:
            if self._kept is None:
                stand_ins = [_stand_in(kind, i) for i, kind in enumerate(kinds)]
                query = self._build(*stand_ins)
                sql, params = query.sql()
                # Each stand-in becomes the parameter $n of the value it stands for; every other
                # parameter (a constant of the builder: an entity's name, LIMIT 1) goes into the
                # text as a literal, quoted by the driver.
                slots = [(position, stand_ins.index(p)) for position, p in enumerate(params)
                         if type(p) in _KINDS and p in stand_ins]
                prepare_params = list(params)
                for position, index in slots:
                    prepare_params[position] = AsIs(f"${index + 1}")
                missing = set(range(len(stand_ins))) - {index for _, index in slots}
                if missing:  # a value the builder dropped or turned into something else
                    raise ValueError(f"values {sorted(missing)} are not parameters of the statement")
                arguments = f"({', '.join(['%s'] * len(kinds))})" if kinds else ""
                self._kept = _Kept(query, kinds, (f"PREPARE {self._name} AS {sql}", prepare_params),
                                   f"EXECUTE {self._name}{arguments}", (sql, params), slots)
        return self._kept

    def select(self, values) -> tuple[str, list]:
        """The SELECT this statement runs for ``values``, as text and parameters."""
        sql, params = self._kept.select
        params = list(params)
        for position, index in self._kept.slots:
            params[position] = values[index]
        return sql, params


def as_select(sql: str, params) -> tuple[str, list]:
    """For query logs and ``EXPLAIN``: what an ``EXECUTE`` of a statement prepared here runs,
    as a SELECT with its values; any other statement as it is."""
    if sql.startswith("EXECUTE crm_prepared_"):
        return _by_name[sql[len("EXECUTE "):].split("(", 1)[0]].select(params)
    return sql, params


def shaped(cache: dict, key, build: Callable) -> Prepared:
    """The prepared statement for ``key`` in ``cache``, made on first use: one per shape of a
    statement whose text depends on more than its values (a seat's gate, a model)."""
    statement = cache.get(key)
    if statement is None:
        statement = cache.setdefault(key, Prepared(build))
    return statement
