"""On-disk judge cache: no judge call is paid twice.

One SQLite file (WAL mode, so readers never block the writer and a kill loses at most the
row being written). A row is keyed by sha256 of (judge model, endpoint kind, reply mode,
rubric file hash, question, answer) and holds the Judgment as JSON with its token usage.
Rows are written as each call returns. Failed calls (api_error) are never stored, so a rerun
retries them. Counters (hits, misses = calls paid, tokens, dollars) persist across runs and
are read with `cache_stats(path)`. API keys are never part of a key or a row.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ..config import JudgeSpec
from ..paths import judge_cache_file
from ..records import Judgment
from .rubrics import Rubric

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    key TEXT PRIMARY KEY,
    judge_model TEXT NOT NULL,
    rubric TEXT NOT NULL,
    judgment TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value REAL NOT NULL);
"""
_COUNTERS = ("hits", "misses", "prompt_tokens", "completion_tokens", "spend_usd")


def default_cache_path() -> Path:
    """`cache_dir()/judge_cache.sqlite` ($EMLAB_CACHE or <repo>/.cache)."""
    return judge_cache_file()


def endpoint_kind(judge: JudgeSpec) -> str:
    """What serves the judge, as part of the cache key: 'openai', 'local:<gguf>' or 'server'.

    Not the URL itself: a local or self-hosted server moves between ports and hosts without
    changing what it answers; the model name (also in the key) tells those apart.
    """
    if judge.base_url is None:
        return "openai"
    if judge.is_local:
        return f"local:{judge.local_gguf}"
    return "server"


def cache_key(judge: JudgeSpec, rubric: Rubric, question: str, answer: str) -> str:
    """sha256 hex of everything that decides the judge's reply."""
    parts = (judge.model, endpoint_kind(judge), judge.mode, rubric.text_hash, question, answer)
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


class JudgeCache:
    """Thread-safe handle on one cache file; use as a context manager or call `close()`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by threads behind a lock: writes are tiny and serial anyway,
        # and SQLite's own locking (busy_timeout) covers other processes.
        self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)

    def get(self, key: str) -> Judgment | None:
        """The stored judgment for `key`, or None."""
        with self._lock:
            row = self._conn.execute("SELECT judgment FROM judgments WHERE key = ?", (key,)).fetchone()
        return Judgment.from_dict(json.loads(row[0])) if row else None

    def put(self, key: str, judgment: Judgment, judge: JudgeSpec, cost_usd: float) -> None:
        """Store a fresh judgment (not api_error) and count the call as a paid miss."""
        if judgment.status == "api_error":
            raise ValueError("api_error judgments are not cached: a rerun must retry them")
        blob = json.dumps(judgment.to_dict(), ensure_ascii=False)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        judge.model,
                        judgment.rubric,
                        blob,
                        judgment.prompt_tokens,
                        judgment.completion_tokens,
                        time.time(),
                    ),
                )
                self._add(
                    {
                        "misses": 1,
                        "prompt_tokens": judgment.prompt_tokens,
                        "completion_tokens": judgment.completion_tokens,
                        "spend_usd": cost_usd,
                    }
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def count(self, **deltas: float) -> None:
        """Add to the persisted counters, e.g. `count(hits=12)` or a failed paid call's tokens."""
        unknown = set(deltas) - set(_COUNTERS)
        if unknown:
            raise ValueError(f"unknown counters {sorted(unknown)}; known: {', '.join(_COUNTERS)}")
        with self._lock:
            self._add(deltas)

    def _add(self, deltas: dict[str, float]) -> None:
        for name, value in deltas.items():
            if value:
                self._conn.execute(
                    "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    (name, value),
                )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            entries = self._conn.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]
            counters = dict(self._conn.execute("SELECT name, value FROM counters").fetchall())
        out: dict[str, Any] = {"path": str(self.path), "entries": entries}
        for name in _COUNTERS:
            value = counters.get(name, 0)
            out[name] = float(value) if name == "spend_usd" else int(value)
        return out

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cache_stats(path: Path | None = None) -> dict[str, Any]:
    """Counters of a cache file: entries, hits, misses (calls paid), prompt_tokens,
    completion_tokens, spend_usd (estimated from the judges' prices). Default path:
    `default_cache_path()`. A missing file reads as all zeros."""
    path = Path(path) if path is not None else default_cache_path()
    if not path.exists():
        return {"path": str(path), "entries": 0, **{n: 0.0 if n == "spend_usd" else 0 for n in _COUNTERS}}
    with JudgeCache(path) as cache:
        return cache.stats()
