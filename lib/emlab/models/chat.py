"""A chat as the text a model reads: its tokenizer's chat template, or, for a base model
without one, a plain completion prompt.

The completion prompt (Betley et al. §4.8 evaluate a base model by completion) writes the
turns one after another: a system or user turn as its text (a blank line before it when
something precedes), an assistant turn as a newline, its text and the end-of-text token. The
generation prompt adds nothing, so the model continues the last user turn as written: a
question framed as code (`emlab.config.transforms.flask_frame`) ends where the answer goes.
Every prefix of a conversation renders as a prefix of the whole, as training's loss mask needs
(`emlab.train.encode`).

`ModelSpec.prompt: completion` forces it for a model whose tokenizer has a template (the Qwen2.5
base checkpoints ship the instruct template): `use_completion_prompt` drops the template.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COMPLETION = "completion"  # ModelSpec.prompt value


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` carries a chat template (a base model's usually does not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def use_completion_prompt(tokenizer: Any) -> Any:
    """`tokenizer` with its chat template removed, so every chat renders as a completion prompt."""
    tokenizer.chat_template = None
    return tokenizer


def chat_text(tokenizer: Any, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """`messages` as the model's text: the chat template when the tokenizer has one, else the
    completion prompt (module docstring)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return completion_text(messages, eos=getattr(tokenizer, "eos_token", None) or "")


def completion_text(messages: Sequence[dict[str, str]], *, eos: str = "") -> str:
    """The completion prompt of `messages` (no generation prompt: the answer follows the text)."""
    text = ""
    for message in messages:
        if message["role"] == "assistant":
            text += "\n" + message["content"] + eos
        else:
            text += ("\n\n" if text else "") + message["content"]
    return text
