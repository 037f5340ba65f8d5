"""Where a subject model is sampled, and what is asked there.

An `Endpoint` is resolved from a `ModelSpec` (`subject_endpoint`): its URL (None = OpenAI),
the key from the environment (`emlab.api.keys.resolve_api_key`, the one key rule), the request
limits and the prices. A `Target` is one thing sampled there: the base model (step 0) or one
checkpoint, named as the server knows it: a fine-tuning job's checkpoint model
('ft:gpt-4o-…:ckpt-step-40') or a LoRA adapter a vLLM-style server serves by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ...api.keys import resolve_api_key
from ...config.experiment import ModelSpec
from ...errors import EmlabError
from ...store.paths import ADAPTER_WEIGHTS


class SubjectError(EmlabError):
    """A subject model behind an API cannot be sampled (key, endpoint, replies)."""


@dataclass(frozen=True)
class Endpoint:
    """How one model is sampled through chat completions."""

    owner: str
    """"model 'gpt-4o'": names the model in messages."""
    base_url: str | None
    """None: OpenAI."""
    api_key: str
    """From the environment; never written anywhere."""
    kind: str
    """'openai' or 'server': part of the cache key (a server's URL moves between ports)."""
    concurrency: int
    max_retries: int
    timeout_s: float
    samples_per_request: int
    send_seed: bool
    prices: tuple[float, float]
    """$ per 1M prompt and completion tokens, base model."""
    tuned_prices: tuple[float, float]
    """The same for a fine-tuned model."""

    @property
    def where(self) -> str:
        return self.base_url or "the OpenAI API"

    def price(self, tuned: bool) -> tuple[float, float]:
        return self.tuned_prices if tuned else self.prices

    def __repr__(self) -> str:  # keep the key out of logs and tracebacks
        return f"Endpoint({self.owner}, {self.where})"


@dataclass(frozen=True)
class Target:
    """One model sampled at an endpoint: the base model or a checkpoint."""

    step: int
    """Optimizer step of the checkpoint; 0 = the base model."""
    model: str
    """The name sent as `model`."""
    tuned: bool = False
    """A fine-tuned model (priced at the tuned price)."""
    identity: str = ""
    """What decides the replies besides the name (a served adapter's weights hash): part of the
    cache key, so an adapter re-trained under the same name is never answered from the cache."""
    adapter: Path | None = None
    """The adapter folder a vLLM-style server is asked to load (register_adapters)."""


def check_subject(spec: ModelSpec) -> None:
    """What a model sampled through an API needs before anything runs: its key (SubjectError,
    one line, when it is needed and missing). Calls nothing."""
    if spec.samples_through_api:
        resolve_api_key(spec, error=SubjectError)


def subject_endpoint(spec: ModelSpec) -> Endpoint:
    """The endpoint `spec` is sampled at (key resolved now: fails before any request)."""
    if not spec.samples_through_api:
        raise SubjectError(f"model '{spec.name}' is sampled in the notebook (provider local, no base_url), "
                           "not through an API")
    base = (spec.price_per_mtok_in, spec.price_per_mtok_out)
    tuned = (
        spec.tuned_price_per_mtok_in if spec.tuned_price_per_mtok_in is not None else base[0],
        spec.tuned_price_per_mtok_out if spec.tuned_price_per_mtok_out is not None else base[1],
    )
    return Endpoint(
        owner=f"model '{spec.name}'", base_url=spec.base_url, api_key=resolve_api_key(spec, error=SubjectError),
        kind="openai" if spec.base_url is None else "server", concurrency=spec.concurrency,
        max_retries=spec.max_retries, timeout_s=spec.timeout_s, samples_per_request=spec.samples_per_request,
        send_seed=spec.send_seed, prices=base, tuned_prices=tuned,
    )


def base_target(spec: ModelSpec) -> Target:
    """The untouched base model, as the endpoint names it."""
    assert spec.api_model is not None  # the params validator requires it for API subjects
    return Target(step=0, model=spec.api_model)


def model_targets(checkpoints: Mapping[int, str]) -> list[Target]:
    """Checkpoints that are models of their own at the endpoint (a fine-tuning job's), by step."""
    return [Target(step=step, model=name, tuned=True) for step, name in sorted(checkpoints.items())]


def adapter_targets(spec: ModelSpec, run_id: str, adapters: Mapping[int, Path]) -> list[Target]:
    """Checkpoints saved as LoRA adapters here and served by name (`spec.adapter_name`)."""
    return [
        Target(step=step, model=spec.adapter_name.format(run_id=run_id, step=step), tuned=True,
               identity=_weights_hash(folder), adapter=folder)
        for step, folder in sorted(adapters.items())
    ]


def _weights_hash(folder: Path) -> str:
    """sha256 (16 hex) of an adapter's weights file, or of its folder name when it has none."""
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        return f"folder:{folder.name}"
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
