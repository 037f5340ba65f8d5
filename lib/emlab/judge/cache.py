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
import time
from pathlib import Path
from typing import Any

from ..config.experiment import JudgeSpec
from ..config.rubrics import Rubric
from ..store.paths import judge_cache_file
from ..store.records import Judgment
from ..store.sqlite import CountingStore

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


class JudgeCache(CountingStore):
    """Thread-safe handle on one cache file (`emlab.store.sqlite`); use as a context manager or
    call `close()`."""

    COUNTERS = _COUNTERS

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA, _COUNTERS, "judgments")

    def get(self, key: str) -> Judgment | None:
        """The stored judgment for `key`, or None."""
        row = self.fetch_one("SELECT judgment FROM judgments WHERE key = ?", (key,))
        return Judgment.from_dict(json.loads(row[0])) if row else None

    def put(self, key: str, judgment: Judgment, judge: JudgeSpec, cost_usd: float) -> None:
        """Store a fresh judgment (not api_error) and count the call as a paid miss."""
        if judgment.status == "api_error":
            raise ValueError("api_error judgments are not cached: a rerun must retry them")
        blob = json.dumps(judgment.to_dict(), ensure_ascii=False)
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, judge.model, judgment.rubric, blob, judgment.prompt_tokens, judgment.completion_tokens,
                 time.time()),
            )
            self.add_counts({
                "misses": 1,
                "prompt_tokens": judgment.prompt_tokens,
                "completion_tokens": judgment.completion_tokens,
                "spend_usd": cost_usd,
            })


def cache_stats(path: Path | None = None) -> dict[str, Any]:
    """Counters of a cache file: entries, hits, misses (calls paid), prompt_tokens,
    completion_tokens, spend_usd (estimated from the judges' prices). Default path:
    `default_cache_path()`. A missing file reads as all zeros."""
    return JudgeCache.stats_of(Path(path) if path is not None else default_cache_path())
