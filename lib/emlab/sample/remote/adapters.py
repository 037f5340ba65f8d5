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
import openai

from ...api.client import api_error_text, sync_client
from .endpoint import Endpoint, SubjectError

log = logging.getLogger(__name__)


def register_adapter(endpoint: Endpoint, name: str, folder: Path) -> None:
    """Ask the server at `endpoint` to serve the adapter in `folder` as `name`.

    An adapter already loaded under that name counts as registered (vLLM answers 400 with
    'already been loaded'). Sent through `emlab.api.client.sync_client` (the endpoint's key,
    timeout and retries). Raises SubjectError (one line) on any other refusal.
    """
    if endpoint.base_url is None:
        raise SubjectError(f"{endpoint.owner}: register_adapters needs a base_url (a vLLM-style server), not OpenAI")
    url = f"{endpoint.base_url.rstrip('/')}/load_lora_adapter"
    client = sync_client(endpoint.base_url, endpoint.api_key, timeout_s=endpoint.timeout_s,
                         max_retries=endpoint.max_retries)
    try:
        with client:
            # not an OpenAI route, so a raw POST; the reply is plain text on vLLM, JSON on emlab.sample.serve
            client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": str(Path(folder).resolve())},
                        cast_to=httpx.Response)
    except openai.APIStatusError as exc:
        if "already" in exc.response.text.lower():
            log.info("%s: adapter %r already served", endpoint.owner, name)
            return
        hint = ("; start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora, or register the "
                "adapters at launch (--lora-modules) and set register_adapters: false")
        # the reply as sent: vLLM and FastAPI word refusals in shapes other than OpenAI's {"error": ...}
        raise SubjectError(f"{endpoint.owner}: the server refused adapter {name!r} ({folder}) with HTTP "
                           f"{exc.status_code}: {exc.response.text[:200]!r}"
                           f"{hint if exc.status_code in (404, 405) else ''}") from None
    except openai.APIError as exc:
        raise SubjectError(f"{endpoint.owner}: registering adapter {name!r} at {url} failed "
                           f"({api_error_text(exc)}); is the server running?") from None
    log.info("%s: adapter %s served as %r", endpoint.owner, folder, name)
