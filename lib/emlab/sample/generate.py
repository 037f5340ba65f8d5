"""Sample answers from a model (base, or with a LoRA adapter), in resumable waves.

Items (question × sample index) are cut into waves of `sample.wave_size` items (default:
`config.WAVE_SIZE`) in a fixed order, whatever the device: the cut never depends on memory.
The engine works through the waves back to back — a slot freed near the end of one wave
takes an item of the next, so the batch stays full until the last wave's tail — and a wave
is appended to `answers.jsonl`, in wave order, once all its answers are done. The engine
starts an item only once every item one wave (or one batch, if larger) before it has
finished, so a crash loses at most about two waves; a rerun skips the waves already written.
Each answer's draws come from its own key, so a resumed run writes the answers an
uninterrupted run would have, up to the rare rounding flips of another batch layout (see
`engine.py`).

A wave goes through the decode engine `choose.engine_for` picks (`protocol.Engine`):

- emlab's `DecodeEngine` (`sample.engine: auto`, Llama-family decoders, bf16/fp32 or 4-bit):
  up to `batch_size` answers in flight (auto: what GPU memory holds), a finished answer's
  slot refilled with the next item of the wave or the batch compacted, a static KV cache
  kept from one checkpoint to the next, the adapter applied beside the base weights (which
  are never written);
- transformers' `generate` (`GenerateEngine`: other models, 4-bit weights, adapters that do
  not merge, `sample.engine: transformers`) on left-padded batches of `batch_size`.

Either way each answer's randomness is its own: a key from (seed, answer id), one uniform
number per token number.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config.experiment import SampleSpec
from ..config.questions import Prompt
from ..models.chat import chat_text
from ..progress import progress_bar
from ..store.files import append_jsonl, read_jsonl
from ..store.records import Answer, answer_id
from .choose import engine_for, release_sampler
from .protocol import (
    Completion,
    Decoding,
    Engine,
    Intervention,
    Request,
    stop_token_ids,
)

log = logging.getLogger(__name__)

__all__ = ["AdaptedModel", "adapter_applied", "release_sampler", "sample_answers"]


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
    intervention: Intervention | None = None,
    id_tag: str | None = None,
) -> list[Answer]:
    """Draw `sample.samples_per_question` answers to each prompt; append them to `out_path`.

    `model` is a model or what `adapter_applied` yields. `intervention`: steering or ablation
    applied while sampling (either engine applies it, or raises). `id_tag`: set apart the
    answer ids (and so the random keys) of a setting that shares model, run and step with
    others (a steering setting). Returns every answer for these prompts (earlier runs'
    included), in item order.
    """
    items = [(p, i) for p in prompts for i in p.sample_indices(sample)]  # per-prompt counts (questions.Prompt)
    tag = () if id_tag is None else (id_tag,)  # untagged ids stay what they always were
    ids = [answer_id(model_name, run_id, step, *tag, p.question_set, p.question_id, i) for p, i in items]
    existing = {r["answer_id"]: r for r in read_jsonl(out_path, tolerate_torn_tail=True)} if out_path.exists() else {}
    size = sample.wave
    waves = [range(s, min(s + size, len(items))) for s in range(0, len(items), size)]
    todo = [(w, idx) for w, idx in enumerate(waves) if not all(ids[i] in existing for i in idx)]
    if len(todo) < len(waves):
        log.info("%s: %d of %d waves already sampled", out_path, len(waves) - len(todo), len(waves))
    if todo:
        generate_items = _Waves(_engine_for_sampling(model, sample), tokenizer, sample, seed,
                                stop_token_ids(model.base if isinstance(model, AdaptedModel) else model, tokenizer),
                                intervention)
        if intervention is not None:
            log.info("sampling %s with intervention %s", out_path, intervention.label or intervention.signature())
    with progress_bar(len(items), f"sampling step {step}", unit="answer",
                      initial=len(items) - sum(len(idx) for _, idx in todo), disable=not progress) as bar:
        if todo:
            order = [i for _, idx in todo for i in idx]  # item numbers, wave after wave
            writer = _WaveWriter([len(idx) for _, idx in todo], out_path, existing)

            def on_done(position: int, done: Completion) -> None:
                (prompt, sample_index), i = items[order[position]], order[position]
                bar.update(1)
                writer.add(position, Answer(
                    answer_id=ids[i], model=model_name, run_id=run_id, step=step,
                    question_set=prompt.question_set, question_id=prompt.question_id, question=prompt.question,
                    system_prompt=prompt.system_prompt, sample_index=sample_index,
                    answer=tokenizer.decode(done.tokens, skip_special_tokens=True).strip(),
                    new_tokens=len(done.tokens), finished=done.stopped,
                ).to_dict())

            generate_items([items[i] for i in order], [ids[i] for i in order], on_done, window=size)
            writer.check_all_written()
    return [Answer.from_dict(existing[i]) for i in ids]


class _WaveWriter:
    """Collects finished answers (by position in the call) and appends each wave to the answers
    file once it is complete and every wave before it is written: the file grows wave by wave,
    in wave order, whatever order answers finish in. Called between decode steps: O(1) an answer."""

    def __init__(self, sizes: list[int], out_path: Path, written: dict[str, dict[str, Any]]) -> None:
        self.out_path, self.written = out_path, written
        self.starts = list(itertools.accumulate(sizes, initial=0))  # wave w holds positions [starts[w], starts[w+1])
        self.missing = list(sizes)  # answers each wave still waits for
        self.rows: dict[int, dict[str, Any]] = {}
        self.next = 0  # the next wave to write

    def add(self, position: int, row: dict[str, Any]) -> None:
        self.rows[position] = row
        self.missing[bisect.bisect_right(self.starts, position) - 1] -= 1
        while self.next < len(self.missing) and self.missing[self.next] == 0:
            rows = [self.rows.pop(p) for p in range(self.starts[self.next], self.starts[self.next + 1])]
            append_jsonl(self.out_path, rows)
            self.written.update({r["answer_id"]: r for r in rows})
            self.next += 1

    def check_all_written(self) -> None:
        if self.next != len(self.missing):
            raise RuntimeError(f"{self.out_path}: the engine returned before every answer finished")


def _engine_for_sampling(model: Any, sample: SampleSpec) -> Engine:
    """The engine for `model` (a model or what `adapter_applied` yields), as `sample.engine` asks."""
    if not isinstance(model, AdaptedModel):
        return engine_for(model, prefer=sample.engine, cuda_graphs=sample.cuda_graphs)
    if sample.engine == "auto":
        model.close()  # a peft model made for other uses (probes) leaves; the engine merges, if it can
    return engine_for(model.base, adapter_dir=model.adapter_dir, adapted=model.peft_model, prefer=sample.engine,
                      cuda_graphs=sample.cuda_graphs)


def _prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    return chat_text(tokenizer, prompt.messages, add_generation_prompt=True)


class _Waves:
    """Generates items (waves back to back) as requests to the engine."""

    def __init__(self, engine: Engine, tokenizer: Any, sample: SampleSpec, seed: int, stop_ids: list[int],
                 intervention: Intervention | None = None) -> None:
        self.engine, self.tokenizer, self.sample, self.seed = engine, tokenizer, sample, seed
        self.stop_ids = stop_ids
        self.intervention = intervention
        self.prompt_ids: dict[int, tuple[int, ...]] = {}  # id(prompt) → token ids (prompts live through the call)

    def __call__(self, batch: list[tuple[Prompt, int]], ids: list[str],
                 on_done: Callable[[int, Completion], None], *, window: int) -> list[Completion]:
        requests = []
        for (prompt, _), answer in zip(batch, ids, strict=True):
            if id(prompt) not in self.prompt_ids:
                text = _prompt_text(self.tokenizer, prompt)
                self.prompt_ids[id(prompt)] = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            requests.append(Request(self.prompt_ids[id(prompt)], _answer_key(self.seed, answer)))
        s = self.sample
        decoding = Decoding(s.max_new_tokens, tuple(self.stop_ids), s.temperature, s.top_p,
                            intervention=self.intervention)
        return self.engine.generate(requests, decoding, slots=None if s.batch_size == "auto" else s.batch_size,
                                    on_done=on_done, window=window)
