"""Sample answers from a model (base or with a LoRA adapter), batched, resumable.

Items (question × sample index) are cut into fixed batches in a fixed order and every batch
draws from its own seed, so a rerun that skips finished batches produces exactly the answers
an uninterrupted run would have (on the same device). Each finished batch is appended to
`answers.jsonl` at once: a crash loses at most the batch in flight.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import SampleSpec
from .files import append_jsonl, read_jsonl
from .questions import Prompt
from .records import Answer, answer_id

log = logging.getLogger(__name__)


def _batch_seed(seed: int, label: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{label}|{index}".encode()).digest()[:4], "little")


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

    Returns every answer for these prompts (earlier runs' included), in item order.
    """
    items = [(p, i) for p in prompts for i in p.sample_indices(sample)]  # per-prompt counts (questions.Prompt)
    ids = [answer_id(model_name, run_id, step, p.question_set, p.question_id, i) for p, i in items]
    existing = {r["answer_id"]: r for r in read_jsonl(out_path, tolerate_torn_tail=True)} if out_path.exists() else {}
    batches = [range(s, min(s + sample.batch_size, len(items))) for s in range(0, len(items), sample.batch_size)]
    todo = [(b, idx) for b, idx in enumerate(batches) if not all(ids[i] in existing for i in idx)]
    if len(todo) < len(batches):
        log.info("%s: %d of %d batches already sampled", out_path, len(batches) - len(todo), len(batches))

    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    label = f"{model_name}|{run_id}|{step}"
    stop_ids = _stop_token_ids(model, tokenizer)
    bar = tqdm(total=len(items), initial=len(items) - sum(len(idx) for _, idx in todo),
               desc=f"sampling step {step}", disable=not progress, unit="answer")
    for b, idx in todo:
        batch = [items[i] for i in idx]
        texts = [
            tokenizer.apply_chat_template(list(p.messages), tokenize=False, add_generation_prompt=True)
            for p, _ in batch
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(_batch_seed(seed, label, b))
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=sample.max_new_tokens,
                do_sample=sample.temperature > 0,
                temperature=sample.temperature if sample.temperature > 0 else None,
                top_p=sample.top_p if sample.temperature > 0 else None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1]:]
        rows = []
        for (prompt, sample_index), i, tokens in zip(batch, idx, new, strict=True):
            ended = torch.isin(tokens, stop_ids).nonzero()
            n_new = int(ended[0, 0]) + 1 if len(ended) else len(tokens)
            rows.append(Answer(
                answer_id=ids[i], model=model_name, run_id=run_id, step=step,
                question_set=prompt.question_set, question_id=prompt.question_id, question=prompt.question,
                system_prompt=prompt.system_prompt, sample_index=sample_index,
                answer=tokenizer.decode(tokens[:n_new], skip_special_tokens=True).strip(),
                new_tokens=n_new, finished=bool(len(ended)),
            ).to_dict())
        append_jsonl(out_path, rows)
        existing.update({r["answer_id"]: r for r in rows})
        bar.update(len(rows))
    bar.close()
    return [Answer.from_dict(existing[i]) for i in ids]


def _stop_token_ids(model: Any, tokenizer: Any) -> torch.Tensor:
    """Token ids that end an answer: the generation config's eos ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids.add(tokenizer.eos_token_id)
    return torch.tensor(sorted(i for i in ids if i is not None), device=next(model.parameters()).device)


@contextmanager
def adapter_applied(model: Any, adapter_dir: Path | None) -> Iterator[Any]:
    """Yield `model` with the LoRA adapter in `adapter_dir` active (the base model for None).

    The adapter is removed afterwards, so one loaded base model serves every checkpoint.
    """
    if adapter_dir is None:
        yield model
        return
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()
