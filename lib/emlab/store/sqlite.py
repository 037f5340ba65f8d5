"""One SQLite file shared by threads, with counters that persist across runs: the plumbing of
emlab's on-disk API caches (the judge cache, the subject sampling cache).

WAL mode, so readers never block the writer and a kill loses at most the row being written;
one connection behind a lock (writes are tiny and serial anyway; SQLite's own busy timeout
covers other processes). Subclasses add their table and typed get/put.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

_COUNTERS_TABLE = "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value REAL NOT NULL);"


class CountingStore:
    """A thread-safe handle on one SQLite file with `schema` and persisted `counters`; use as a
    context manager or call `close()`."""

    def __init__(self, path: Path, schema: str, counters: tuple[str, ...], table: str) -> None:
        self.path = Path(path)
        self.counter_names = counters
        self.table = table  # the main table, whose rows `stats` counts as entries
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(schema + _COUNTERS_TABLE)

    def fetch_one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        """The first row of a read-only query."""
        with self._lock:
            row = self._conn.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT, rolled back on any error) under the
        lock; `add_counts` inside it counts in the same transaction."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def count(self, **deltas: float) -> None:
        """Add to the persisted counters, e.g. `count(hits=12)`."""
        with self._lock:
            self.add_counts(deltas)

    def add_counts(self, deltas: dict[str, float]) -> None:
        """Add to counters; the caller holds the lock (inside `transaction`)."""
        unknown = set(deltas) - set(self.counter_names)
        if unknown:
            raise ValueError(f"unknown counters {sorted(unknown)}; known: {', '.join(self.counter_names)}")
        for name, value in deltas.items():
            if value:
                self._conn.execute(
                    "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    (name, value),
                )

    def counters(self) -> dict[str, float]:
        """Every counter, 0 for those never counted."""
        with self._lock:
            found = dict(self._conn.execute("SELECT name, value FROM counters").fetchall())
        return {name: float(found.get(name, 0)) for name in self.counter_names}

    def stats(self) -> dict[str, Any]:
        """path, entries (rows of the main table) and every counter; `spend_usd` as a float,
        the others as integers."""
        row = self.fetch_one(f"SELECT COUNT(*) FROM {self.table}")
        out: dict[str, Any] = {"path": str(self.path), "entries": row[0] if row else 0}
        for name, value in self.counters().items():
            out[name] = float(value) if name == "spend_usd" else int(value)
        return out

    @classmethod
    def stats_of(cls, path: Path) -> dict[str, Any]:
        """`stats()` of the store at `path` (opened with `cls(path)`); all zeros when the file
        does not exist (nothing is created)."""
        if not Path(path).exists():
            return {"path": str(path), "entries": 0, **{n: 0.0 if n == "spend_usd" else 0 for n in cls.COUNTERS}}
        with cls(path) as store:  # type: ignore[call-arg]  # subclasses take the path alone
            return store.stats()

    COUNTERS: tuple[str, ...] = ()
    """The subclass's counter names (for `stats_of` without opening a file)."""

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
