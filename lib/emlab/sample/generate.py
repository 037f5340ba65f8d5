"""Sample answers from a model (base, or with a LoRA adapter), in resumable waves.

Items (question × sample index) are cut into waves of `sample.wave_size` items (default:
`batch_size`) in a fixed order. A wave is generated as one unit and appended to
`answers.jsonl` when it is complete, so a crash loses at most the wave in flight and a rerun
skips the waves already written. A wave is generated the same way every time, so a resumed
run writes exactly the answers an uninterrupted run would have (on the same device).

Two ways to generate a wave:

- emlab's sampler (`emlab.sample.engine`, `sample.engine: auto`, Llama-family decoders in full
  precision): up to `batch_size` answers in flight, a finished answer's slot refilled with the
  next item of the wave or the batch compacted, a static KV cache kept from one checkpoint to
  the next, the adapter merged into a weight copy (the base model is never written), each
  answer's randomness its own (seed, answer id, token number).
- transformers' `generate` on left-padded batches of `batch_size` (other models, 4-bit
  weights, `sample.engine: transformers`), each batch seeded from its index.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..config.experiment import SampleSpec
from ..config.questions import Prompt
from ..progress import progress_bar
from ..store.files import append_jsonl, read_jsonl
from ..store.records import Answer, answer_id
from .engine import DecodeEngine, Request
from .weights import LoraAdapter, unsupported_reason

log = logging.getLogger(__name__)

_ENGINES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # model → DecodeEngine


class AdaptedModel:
    """A base model and the LoRA adapter to sample it with (what `adapter_applied` yields).

    `sample_answers` merges the adapter into its sampler's weight copy. Used as a model in any
    other way (`generate`, a forward call, an attribute), it becomes a peft model on first use,
    unloaded again when the `adapter_applied` block ends.
    """

    def __init__(self, base: Any, adapter_dir: Path) -> None:
        self.base = base
        self.adapter_dir = adapter_dir
        self._peft: Any = None

    def peft_model(self) -> Any:
        """The base model with the adapter attached by peft (made once)."""
        if self._peft is None:
            from peft import PeftModel

            self._peft = PeftModel.from_pretrained(self.base, str(self.adapter_dir))
            self._peft.eval()
        return self._peft

    def close(self) -> None:
        if self._peft is not None:
            self._peft.unload()
            self._peft = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.peft_model(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.peft_model()(*args, **kwargs)


@contextmanager
def adapter_applied(model: Any, adapter_dir: Path | None) -> Iterator[Any]:
    """Yield `model` with the LoRA adapter in `adapter_dir` (the base model for None).

    Nothing is left behind: one loaded base model serves every checkpoint, bitwise unchanged.
    """
    if adapter_dir is None:
        yield model
        return
    adapted = AdaptedModel(model, Path(adapter_dir))
    try:
        yield adapted
    finally:
        adapted.close()


def sampler_for(model: Any) -> Any:
    """emlab's sampler for `model` (built on first use and kept while the model lives; its KV
    cache and weight copy are paid once per run), or None when the model is not one it runs."""
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("sampling with transformers' generate: %s", reason)
        return None
    engine = _ENGINES.get(model)
    if engine is None or engine.weights.stale():
        engine = _ENGINES[model] = DecodeEngine(model)
    return engine


def release_sampler(model: Any) -> None:
    """Free the sampler kept for `model` (its KV cache and weight copy)."""
    _ENGINES.pop(model, None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _batch_seed(seed: int, label: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{label}|{index}".encode()).digest()[:4], "little")


def _answer_key(seed: int, answer: str) -> int:
    """The random key of one answer (63 bits): its draws depend on nothing else."""
    return int.from_bytes(hashlib.sha256(f"emlab-answer|{seed}|{answer}".encode()).digest()[:8], "little") >> 1


def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    sample: SampleSpec,
    *,
    model_name: str,
    run_id: str | None,
    step: int,
    seed: int,
    out_path: Path,
    progress: bool = True,
) -> list[Answer]:
    """Draw `sample.samples_per_question` answers to each prompt; append them to `out_path`.

    `model` is a model or what `adapter_applied` yields. Returns every answer for these
    prompts (earlier runs' included), in item order.
    """
    items = [(p, i) for p in prompts for i in p.sample_indices(sample)]  # per-prompt counts (questions.Prompt)
    ids = [answer_id(model_name, run_id, step, p.question_set, p.question_id, i) for p, i in items]
    existing = {r["answer_id"]: r for r in read_jsonl(out_path, tolerate_torn_tail=True)} if out_path.exists() else {}
    size = sample.wave_size or sample.batch_size
    waves = [range(s, min(s + size, len(items))) for s in range(0, len(items), size)]
    todo = [(w, idx) for w, idx in enumerate(waves) if not all(ids[i] in existing for i in idx)]
    if len(todo) < len(waves):
        log.info("%s: %d of %d waves already sampled", out_path, len(waves) - len(todo), len(waves))
    if todo:
        generate_wave = _wave_generator(model, tokenizer, sample, seed, f"{model_name}|{run_id}|{step}")
    with progress_bar(len(items), f"sampling step {step}", unit="answer",
                      initial=len(items) - sum(len(idx) for _, idx in todo), disable=not progress) as bar:
        for w, idx in todo:
            batch = [items[i] for i in idx]
            completions = generate_wave(w, idx, batch, [ids[i] for i in idx], bar.update)
            rows = [
                Answer(
                    answer_id=ids[i], model=model_name, run_id=run_id, step=step,
                    question_set=prompt.question_set, question_id=prompt.question_id, question=prompt.question,
                    system_prompt=prompt.system_prompt, sample_index=sample_index,
                    answer=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                    new_tokens=len(tokens), finished=stopped,
                ).to_dict()
                for (prompt, sample_index), i, (tokens, stopped) in zip(batch, idx, completions, strict=True)
            ]
            append_jsonl(out_path, rows)
            existing.update({r["answer_id"]: r for r in rows})
    return [Answer.from_dict(existing[i]) for i in ids]


def _wave_generator(model: Any, tokenizer: Any, sample: SampleSpec, seed: int, label: str) -> Any:
    """A function generating one wave: emlab's sampler where it applies, else `generate`."""
    base, adapter_dir = (model.base, model.adapter_dir) if isinstance(model, AdaptedModel) else (model, None)
    if isinstance(model, AdaptedModel) and sample.engine == "auto":
        model.close()  # a peft model made for other uses (probes) leaves; the sampler merges instead
    engine = sampler_for(base) if sample.engine == "auto" else None
    adapter = None
    if engine is not None and adapter_dir is not None:
        adapter = LoraAdapter.read(adapter_dir)
        if adapter is None:
            log.info("sampling with transformers' generate: %s is not a plain LoRA of the decoder layers", adapter_dir)
            engine = None
    if engine is not None:
        engine.use_adapter(adapter)
        return _EngineWaves(engine, tokenizer, sample, seed, _stop_token_ids(base.generation_config.eos_token_id, tokenizer))
    hf_model = model.peft_model() if isinstance(model, AdaptedModel) else model
    return _GenerateWaves(hf_model, tokenizer, sample, seed, label)


def _prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    return tokenizer.apply_chat_template(list(prompt.messages), tokenize=False, add_generation_prompt=True)


class _EngineWaves:
    """Waves through emlab's sampler."""

    def __init__(self, engine: Any, tokenizer: Any, sample: SampleSpec, seed: int, stop_ids: list[int]) -> None:
        self.engine, self.tokenizer, self.sample, self.seed = engine, tokenizer, sample, seed
        self.stop_ids = stop_ids
        self.prompt_ids: dict[int, tuple[int, ...]] = {}  # id(prompt) → token ids (prompts live through the call)

    def __call__(self, wave: int, idx: range, batch: list[tuple[Prompt, int]], ids: list[str],
                 on_done: Any) -> list[tuple[list[int], bool]]:
        requests = []
        for (prompt, _), answer in zip(batch, ids, strict=True):
            if id(prompt) not in self.prompt_ids:
                text = _prompt_text(self.tokenizer, prompt)
                self.prompt_ids[id(prompt)] = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            requests.append(Request(self.prompt_ids[id(prompt)], _answer_key(self.seed, answer)))
        s = self.sample
        self.engine.use_graphs = s.cuda_graphs and self.engine.device.type == "cuda"
        done = self.engine.generate(requests, slots=s.batch_size, max_new_tokens=s.max_new_tokens,
                                    temperature=s.temperature, top_p=s.top_p, stop_ids=self.stop_ids, on_done=on_done)
        return [(c.tokens, c.stopped) for c in done]


class _GenerateWaves:
    """Waves through transformers' `generate`, in left-padded batches of `batch_size`."""

    def __init__(self, model: Any, tokenizer: Any, sample: SampleSpec, seed: int, label: str) -> None:
        self.model, self.tokenizer, self.sample, self.seed, self.label = model, tokenizer, sample, seed, label
        self.stop = torch.tensor(_stop_token_ids(model.generation_config.eos_token_id, tokenizer),
                                 device=next(model.parameters()).device)

    def __call__(self, wave: int, idx: range, batch: list[tuple[Prompt, int]], ids: list[str],
                 on_done: Any) -> list[tuple[list[int], bool]]:
        s, tokenizer = self.sample, self.tokenizer
        tokenizer.padding_side = "left"
        device = next(self.model.parameters()).device
        out: list[tuple[list[int], bool]] = []
        for start in range(0, len(batch), s.batch_size):
            part = batch[start : start + s.batch_size]
            texts = [_prompt_text(tokenizer, p) for p, _ in part]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            # batches are numbered over the whole item list: with waves of batch_size, one per wave
            torch.manual_seed(_batch_seed(self.seed, self.label, (idx.start + start) // s.batch_size))
            with torch.inference_mode():
                generated = self.model.generate(
                    **enc,
                    max_new_tokens=s.max_new_tokens,
                    do_sample=s.temperature > 0,
                    temperature=s.temperature if s.temperature > 0 else None,
                    top_p=s.top_p if s.temperature > 0 else None,
                    top_k=0,  # no top-k (transformers would apply its default of 50)
                    pad_token_id=tokenizer.pad_token_id,
                )
            for tokens in generated[:, enc["input_ids"].shape[1]:]:
                ended = torch.isin(tokens, self.stop).nonzero()
                n_new = int(ended[0, 0]) + 1 if len(ended) else len(tokens)
                out.append((tokens[:n_new].tolist(), bool(len(ended))))
            on_done(len(part))
        return out


def _stop_token_ids(eos: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the generation config's eos ids and the tokenizer's."""
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids.add(tokenizer.eos_token_id)
    return sorted(i for i in ids if i is not None)
