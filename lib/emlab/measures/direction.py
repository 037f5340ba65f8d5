"""The EM direction: where in the residual stream misaligned answers differ from aligned ones.

After Soligo et al. (Convergent linear representations of emergent misalignment, §2): the
tuned model reads its own answers (chat template with the generation prompt, then the answer's
tokens, one teacher-forced forward pass); the residual stream after each decoder layer (the
layer's output, `sample.hooks.captured_layers`) is averaged over the answer's tokens; the
direction at a layer is the mean of those averages over misaligned answers minus the mean
over aligned ones. Which answers are which comes from the judge (the run's EM rule) or, judge
free, from the logprob probe's written pairs (`measures.probe`).

One direction per model state is saved as `direction.safetensors` (a float32 vector per layer
kept, named `layer_<i>`) beside `direction.json`, its provenance: source, checkpoint, layers,
n on each side and the ids of the answers (or probes) read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, EmlabError
from ..store.files import atomic_open, write_json
from ..store.paths import DIRECTION_INFO, DIRECTION_VECTORS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmDirection:
    """Mean difference misaligned − aligned of the residual stream, one vector per layer kept."""

    vectors: torch.Tensor
    """[len(layers), hidden], float32, on the CPU."""
    layers: tuple[int, ...]
    """The decoder layer (0-based) of each row of `vectors`."""
    info: dict[str, Any] = field(default_factory=dict)
    """Provenance: source, run_id, step, adapter, n_misaligned, n_aligned, the ids read, ..."""

    def at(self, layer: int) -> torch.Tensor:
        """The direction after decoder layer `layer` [hidden]."""
        if layer not in self.layers:
            raise DataError(f"the EM direction holds layers {list(self.layers)}, not layer {layer}; add it to "
                            "direction.layers")
        return self.vectors[self.layers.index(layer)]

    def steering_vector(self, layer: int, where: Path | str) -> torch.Tensor:
        """The direction after `layer` to steer or ablate with; `EmlabError` (one line, naming
        the run and `where`, the file it came from) when it is zero or not finite: a vector
        that would be divided by its norm (misaligned and aligned means identical)."""
        v = self.at(layer)
        refuse_unusable(v, f"the EM direction of run {self.info.get('run_id', '?')} at layer {layer} ({where})")
        return v


def refuse_unusable(vector: torch.Tensor, what: str) -> None:
    """`EmlabError` when `vector` has a non-finite entry or norm 0 (`what` names it)."""
    finite = bool(torch.isfinite(vector).all())
    if not finite or float(vector.float().norm()) == 0.0:
        found = "non-finite entries" if not finite else "norm 0 (the misaligned and aligned means are identical)"
        raise EmlabError(f"{what} has {found}: it cannot be steered or ablated with; delete its folder and compute it "
                         "again from other answers (direction.source, direction.min_per_side)")


def mean_difference(misaligned: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """mean(misaligned) − mean(aligned) over the first dimension: [n, ...] and [m, ...] → [...], float32."""
    if not len(misaligned) or not len(aligned):
        raise DataError(f"a mean difference needs answers on both sides, found {len(misaligned)} misaligned and "
                        f"{len(aligned)} aligned")
    return misaligned.float().mean(0) - aligned.float().mean(0)


def answer_residuals(model: Any, tokenizer: Any, chats: Sequence[Sequence[dict[str, str]]], answers: Sequence[str],
                     layers: Sequence[int] | None = None, *, batch_size: int = 8) -> torch.Tensor:
    """Each answer's residual stream averaged over its tokens, after each of `layers` (None:
    every layer): [len(answers), len(layers), hidden], float32 on the CPU.

    `model`: a transformers causal LM, a peft model or what `adapter_applied` yields. The chat
    goes through the chat template with the generation prompt, the answer's own tokens follow
    (as `probe.answer_logprobs` reads them); right-padded batches, only answer positions averaged.
    An answer without tokens raises `DataError` (the caller leaves such answers out).
    """
    from ..sample.hooks import (
        captured_layers,  # torch-side helpers: imported where they are used
    )

    if len(chats) != len(answers):
        raise ValueError(f"{len(chats)} chats but {len(answers)} answers")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[tuple[list[int], int]] = []  # token ids, where the answer starts
    for chat, answer in zip(chats, answers, strict=True):
        prompt = tokenizer(tokenizer.apply_chat_template(list(chat), tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"an answer has no tokens under this tokenizer ({answer[:40]!r})")
        rows.append((list(prompt) + list(ids), len(prompt)))
    out: list[torch.Tensor] = []
    with torch.inference_mode(), captured_layers(model) as captured:
        keep = list(range(len(captured))) if layers is None else list(layers)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            answer_mask = torch.zeros((len(chunk), width), dtype=torch.float32)
            for r, (tokens, begin) in enumerate(chunk):
                ids[r, :len(tokens)] = torch.tensor(tokens)
                mask[r, :len(tokens)] = 1
                answer_mask[r, begin:len(tokens)] = 1
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            weights = (answer_mask / answer_mask.sum(1, keepdim=True)).to(device)
            stacked = torch.stack([captured[i].float() for i in keep], dim=1)  # type: ignore[union-attr]  # [B, L, T, H]
            out.append(torch.einsum("bt,blth->blh", weights, stacked).cpu())
    return torch.cat(out) if out else torch.zeros(0, len(keep), 0)


def direction_between(model: Any, tokenizer: Any, misaligned: Sequence[tuple[Sequence[dict[str, str]], str]],
                      aligned: Sequence[tuple[Sequence[dict[str, str]], str]], layers: Sequence[int] | None, *,
                      batch_size: int = 8, info: dict[str, Any] | None = None) -> EmDirection:
    """The EM direction from (chat, answer) pairs on each side, at `layers` (None: all)."""
    both = [*misaligned, *aligned]
    acts = answer_residuals(model, tokenizer, [c for c, _ in both], [a for _, a in both], layers,
                            batch_size=batch_size)
    vectors = mean_difference(acts[:len(misaligned)], acts[len(misaligned):])
    kept = tuple(layers) if layers is not None else tuple(range(vectors.shape[0]))
    return EmDirection(vectors.contiguous(), kept, {**(info or {}), "n_misaligned": len(misaligned),
                                                    "n_aligned": len(aligned), "layers": list(kept),
                                                    "hidden": int(vectors.shape[-1]),
                                                    "norms": [float(n) for n in vectors.norm(dim=-1)]})


# --- files ---------------------------------------------------------------------------------


def save_direction(folder: Path, direction: EmDirection) -> None:
    """`direction.safetensors` and `direction.json` in `folder` (the json last: its presence
    marks a complete direction)."""
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    blob = save({f"layer_{layer}": direction.vectors[i].contiguous() for i, layer in enumerate(direction.layers)},
                metadata={"source": str(direction.info.get("source", ""))})
    with atomic_open(folder / DIRECTION_VECTORS, "wb") as handle:
        handle.write(blob)
    write_json(folder / DIRECTION_INFO, direction.info)


def load_direction(folder: Path) -> EmDirection | None:
    """The direction saved in `folder`, or None when it is not there (complete)."""
    from safetensors.torch import load

    info_path, vectors_path = folder / DIRECTION_INFO, folder / DIRECTION_VECTORS
    if not info_path.exists() or not vectors_path.exists():
        return None
    info = json.loads(info_path.read_text())
    tensors = load(vectors_path.read_bytes())
    layers = tuple(int(x) for x in info["layers"])
    missing = [layer for layer in layers if f"layer_{layer}" not in tensors]
    if missing:
        raise DataError(f"{vectors_path}: no vector for layers {missing} that {info_path} lists; delete the folder "
                        "to compute it again")
    vectors = torch.stack([tensors[f"layer_{layer}"] for layer in layers])
    if not bool(torch.isfinite(vectors).all()):
        bad = [layer for layer, row in zip(layers, vectors, strict=True) if not bool(torch.isfinite(row).all())]
        raise EmlabError(f"{vectors_path}: the EM direction of run {info.get('run_id', '?')} has non-finite entries at "
                         f"layers {bad}; delete {folder} to compute it again")
    return EmDirection(vectors, layers, info)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors (0 when either is zero)."""
    denominator = float(a.float().norm() * b.float().norm())
    return float(a.float() @ b.float()) / denominator if denominator else 0.0


def random_like(direction: torch.Tensor, seed: int) -> torch.Tensor:
    """A random direction of `direction`'s norm (standard normal, seeded): the control."""
    generator = torch.Generator().manual_seed(seed)
    r = torch.randn(direction.shape[-1], generator=generator)
    return r / r.norm() * direction.float().norm()
