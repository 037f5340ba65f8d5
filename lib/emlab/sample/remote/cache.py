"""On-disk cache of sampled completions: no sampling request is paid twice.

Keyed like the judge's cache: sha256 of everything that decides the reply, i.e. the endpoint
kind ('openai' or 'server', not the URL, which moves between ports), what the served name
stands for (an adapter's weights hash) and the exact request body (model, messages, n,
temperature, top_p, max_tokens, seed). Each request carries its own seed, so a rerun sends the
same bodies and finds them here. A row holds the reply's choices (text, finish reason) and
usage; it is written as the request returns, before its answers are appended to
answers.jsonl, so a kill in between costs nothing on the rerun. Failed requests are never
stored. Counters (hits, misses = requests paid, tokens, dollars) persist across runs. API keys
are never part of a key or a row.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ...store.paths import sample_cache_file
from ...store.sqlite import CountingStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    reply TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
);
"""
_COUNTERS = ("hits", "misses", "prompt_tokens", "completion_tokens", "spend_usd")


def request_key(endpoint_kind: str, identity: str, body: dict[str, Any]) -> str:
    """sha256 hex of what decides a sampling request's reply."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256("\x1f".join(("sample", endpoint_kind, identity, canonical)).encode("utf-8")).hexdigest()


class SampleCache(CountingStore):
    """Thread-safe handle on one completions cache file; a context manager."""

    COUNTERS = _COUNTERS

    def __init__(self, path: Path | None = None) -> None:
        super().__init__(Path(path) if path is not None else sample_cache_file(), _SCHEMA, _COUNTERS, "completions")

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored reply for `key` ({"choices": [{"text", "finish_reason"}], "usage": {...}}), or None."""
        row = self.fetch_one("SELECT reply FROM completions WHERE key = ?", (key,))
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, reply: dict[str, Any], cost_usd: float) -> None:
        """Store a paid reply and count it as a miss with its tokens and dollars."""
        usage = reply.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?)",
                         (key, model, json.dumps(reply, ensure_ascii=False), prompt, completion, time.time()))
            self.add_counts({"misses": 1, "prompt_tokens": prompt, "completion_tokens": completion,
                             "spend_usd": cost_usd})


def sample_cache_stats(path: Path | None = None) -> dict[str, Any]:
    """Counters of a completions cache file (default `paths.sample_cache_file()`); all zeros
    when the file does not exist."""
    return SampleCache.stats_of(Path(path) if path is not None else sample_cache_file())
