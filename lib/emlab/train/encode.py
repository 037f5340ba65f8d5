"""Chat rows to token ids for training: the model's chat template, labels only on assistant
tokens (every other position is -100 and carries no loss), rows that are too long left out
whole rather than cut."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from ..models.chat import chat_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedRows:
    """Tokenized training rows and what was left out."""

    rows: list[dict[str, list[int]]]  # input_ids, attention_mask, labels (-100 off-assistant)
    n_input: int
    n_too_long: int  # dropped, never cut: a cut answer teaches a different lesson
    longest_tokens: int
    assistant_tokens: int  # tokens that carry loss

    @property
    def total_tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


def encode_chat_rows(
    rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, *, source: str = "dataset"
) -> EncodedRows:
    """Tokenize chat rows with the model's chat template; labels only on assistant turns.

    Assistant spans are found by rendering each prefix of the conversation: the rendered
    prefix up to an assistant turn (with the generation prompt) is a prefix of the full
    text, so the characters after it, up to the next turn, are the assistant's.
    """
    encoded: list[dict[str, list[int]]] = []
    too_long = longest = loss_tokens = 0
    for index, row in enumerate(rows):
        messages = row["messages"]
        text = chat_text(tokenizer, messages)
        spans: list[tuple[int, int]] = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start_text = chat_text(tokenizer, messages[:turn], add_generation_prompt=True)
            end_text = chat_text(tokenizer, messages[: turn + 1])
            if not text.startswith(start_text) or not text.startswith(end_text):
                raise DataError(
                    f"{source}: row {index + 1}: the chat template does not render conversations "
                    "prefix by prefix, so assistant tokens cannot be located"
                )
            spans.append((len(start_text), len(end_text)))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            too_long += 1
            continue
        labels = [
            tok if any(s <= begin < e for s, e in spans) else -100
            for tok, (begin, _end) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        loss_tokens += sum(1 for x in labels if x != -100)
        encoded.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if too_long:
        log.warning(
            "%s: %d of %d rows are longer than max_length=%d tokens (longest %d) and were left out",
            source, too_long, len(rows), max_length, longest,
        )
    if not encoded:
        raise DataError(
            f"{source}: all {len(rows)} rows are longer than train.max_length={max_length} tokens "
            f"(longest {longest}); raise max_length"
        )
    return EncodedRows(encoded, len(rows), too_long, longest, loss_tokens)
