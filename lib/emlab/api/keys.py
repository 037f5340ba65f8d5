"""The key rule: an API key comes from the environment variable a spec names, never a fallback.

`resolve_api_key(spec)` is the one function every caller uses (the judge's live calls, batch
mode and pre-run check; subjects sampled through an API; fine-tuning jobs): it decides whether
the spec needs a key at all and reads it through `key_from_env`, which words every error the
same way, one line naming the owner and the variable.
"""

from __future__ import annotations

import os

from ..config.experiment import JudgeSpec, ModelSpec
from ..errors import EmlabError, JudgeError

LOCAL_API_KEY = "sk-local-no-key"  # local servers ignore the key; the openai client insists on one


def key_from_env(owner: str, api_key_env: str | None, *, required_because: str | None = None,
                 error: type[EmlabError] = EmlabError) -> str:
    """The key in os.environ[api_key_env] for `owner` ("judge 'x'", "model 'y'"), never a fallback.

    api_key_env None: no key is needed (a self-hosted server without authentication; the client
    gets a dummy) unless `required_because` says why one is (then `error`, one line). An unset
    or empty variable raises `error`, naming the variable.
    """
    if api_key_env is None:
        if required_because:
            raise error(
                f"{owner} {required_because}, which needs a key, but api_key_env is null; set api_key_env "
                "to the environment variable that holds the key (e.g. api_key_env: OPENAI_API_KEY)"
            )
        return LOCAL_API_KEY
    key = os.environ.get(api_key_env)
    if not key:
        raise error(f"{owner} needs the environment variable {api_key_env}; "
                    f"export {api_key_env}=... (keys are never read from params)")
    return key


def resolve_api_key(spec: JudgeSpec | ModelSpec, *, error: type[EmlabError] | None = None) -> str:
    """The key for a judge or a model behind an API: os.environ[spec.api_key_env], never a fallback.

    No key is needed for a llama.cpp server emlab starts (a judge with base_url 'local') or a
    self-hosted server without authentication (a base_url and api_key_env null): those get a
    dummy the client insists on. OpenAI (base_url null) and the Batch API always need one.
    Raises `error` (default JudgeError for a judge, EmlabError for a model; one line) when the
    key is needed and api_key_env is null or its variable unset.
    """
    if isinstance(spec, JudgeSpec):
        if spec.is_local:
            return LOCAL_API_KEY
        why = None
        if spec.batch:
            why = "uses the Batch API (batch: true)"
        elif spec.base_url is None:
            why = "calls the OpenAI API (no base_url)"
        return key_from_env(f"judge '{spec.name}'", spec.api_key_env, required_because=why, error=error or JudgeError)
    why = "is sampled through the OpenAI API (provider openai, no base_url)" if spec.base_url is None else None
    return key_from_env(f"model '{spec.name}'", spec.api_key_env, required_because=why, error=error or EmlabError)
