"""The OpenAI-compatible client layer: what the judge, subjects sampled through an API and
fine-tuning jobs share to talk to OpenAI, vLLM, Ollama or a llama.cpp server.

    keys.py    the key rule: `resolve_api_key(spec)` for a judge or a model, `key_from_env`
               beneath it (a variable named in params, never a fallback; one-line errors)
    client.py  `async_client` / `sync_client` for a base URL and key, `run_sync` (async work
               from synchronous code, also inside a notebook kernel), `api_error_text`
    retry.py   `complete_with_retries` (backoff with full jitter, Retry-After), `complete_all`
               (concurrent calls behind a `Breaker`), `RetryPolicy`, `CallOutcome`
    cost.py    prices: `token_cost`, `usage_cost` (Batch API discount), `estimate_cost`,
               `chat_tokens` (the characters-per-token guess)

Import from the modules; this `__init__` imports nothing, so a caller that only needs prices
or keys does not load the openai client.
"""
