"""Register a checkpoint's LoRA adapter with a vLLM-style server, by name.

vLLM serves LoRA adapters by name: given at launch (`--lora-modules name=path`) or loaded at
runtime with `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` when the server allows it
(`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). `emlab.sample.serve` takes the same call. With
`register_adapters: true` a model's checkpoints are registered before they are sampled; the
server must be able to read the adapter folder (same machine or shared filesystem).
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

from .endpoint import Endpoint, SubjectError

log = logging.getLogger(__name__)


def register_adapter(endpoint: Endpoint, name: str, folder: Path) -> None:
    """Ask the server at `endpoint` to serve the adapter in `folder` as `name`.

    An adapter already loaded under that name counts as registered (vLLM answers 400 with
    'already been loaded'). Raises SubjectError (one line) on any other refusal.
    """
    if endpoint.base_url is None:
        raise SubjectError(f"{endpoint.owner}: register_adapters needs a base_url (a vLLM-style server), not OpenAI")
    url = f"{endpoint.base_url.rstrip('/')}/load_lora_adapter"
    try:
        reply = httpx.post(url, json={"lora_name": name, "lora_path": str(Path(folder).resolve())},
                           headers={"Authorization": f"Bearer {endpoint.api_key}"}, timeout=endpoint.timeout_s)
    except httpx.HTTPError as exc:
        raise SubjectError(f"{endpoint.owner}: registering adapter {name!r} at {url} failed ({exc}); "
                           "is the server running?") from None
    if reply.status_code == 200 or "already" in reply.text.lower():
        log.info("%s: adapter %s served as %r", endpoint.owner, folder, name)
        return
    hint = ("; start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora, or register the adapters "
            "at launch (--lora-modules) and set register_adapters: false")
    raise SubjectError(f"{endpoint.owner}: the server refused adapter {name!r} ({folder}) with HTTP "
                       f"{reply.status_code}: {reply.text[:200]!r}{hint if reply.status_code in (404, 405) else ''}")
