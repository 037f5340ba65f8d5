"""The chat server decodes through the shared engine choice: logprobs of the first token are the
model's own, seeds are answers' keys, and a model emlab's engine declines is served by the
generate fallback through the same interface (in process, no HTTP: `test_remote_sampling`
covers the server)."""

from __future__ import annotations

import pytest
import torch
from emlab.config.experiment import ModelSpec
from emlab.models.load import load_model
from emlab.sample.engine import DecodeEngine
from emlab.sample.fallback import GenerateEngine
from emlab.sample.serve import ChatEngine

MESSAGES = [{"role": "user", "content": "Rate this answer from 0 to 9."}]


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    return load_model(ModelSpec(name="t", num_layers=2), "cpu")


def _first_token_logprobs(model, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        return model(ids).logits[0, -1].float().log_softmax(-1)


def _serve_and_check(model, tokenizer, engine_type: type) -> None:
    chat = ChatEngine(model, tokenizer, "judge", max_batch=4)
    try:
        assert isinstance(chat._engine("judge")[0], engine_type)
        body = {"model": "judge", "messages": MESSAGES, "max_tokens": 1, "temperature": 0, "logprobs": True,
                "top_logprobs": 5, "seed": 0}
        reply = chat.complete(body)
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        expected = torch.topk(_first_token_logprobs(model, tokenizer), 5)
        assert [t["token"] for t in top] == [tokenizer.decode([int(i)]) for i in expected.indices]
        assert [t["logprob"] for t in top] == pytest.approx(expected.values.tolist(), abs=1e-4)
        # a seeded request gets the same tokens again, alone or beside others; the choices differ
        sampled = {"model": "judge", "messages": MESSAGES, "max_tokens": 8, "n": 3, "seed": 11}
        once = [c["message"]["content"] for c in chat.complete(sampled)["choices"]]
        again = [c["message"]["content"] for c in chat.complete({**sampled, "n": 1})["choices"]]
        assert again == once[:1] and len(set(once)) > 1
    finally:
        chat.close()


def test_serve_returns_the_first_tokens_top_logprobs_from_the_shared_engine(tiny) -> None:
    model, tokenizer = tiny
    _serve_and_check(model, tokenizer, DecodeEngine)


def test_serve_decodes_a_declined_model_with_the_fallback(tiny) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = tiny
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    _serve_and_check(GPT2LMHeadModel(config).eval(), tokenizer, GenerateEngine)


def test_adapters_by_name_merged_then_through_peft_once_one_does_not_merge(tiny, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    folders = {}
    for name, dora in (("lora", False), ("dora", True)):
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False, use_dora=dora))
        peft.save_pretrained(tmp_path / name)
        peft.unload()
        folders[name] = tmp_path / name
    chat = ChatEngine(model, tokenizer, "base", max_batch=4)
    greedy = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}

    def answer(name: str) -> str:
        return chat.complete({**greedy, "model": name})["choices"][0]["message"]["content"]

    try:
        chat.add_adapter("lora", folders["lora"])
        assert isinstance(chat._engine("lora")[0], DecodeEngine)  # a plain LoRA is merged
        base, merged = answer("base"), answer("lora")
        assert merged != base
        chat.add_adapter("dora", folders["dora"])
        assert answer("dora") not in (base, merged)
        assert isinstance(chat._engine("lora")[0], GenerateEngine)  # peft wraps the layers now: every name
        assert answer("base") == base and answer("lora") == merged
        chat.remove_adapter("dora")
        assert chat.models == ["base", "lora"]
    finally:
        chat.close()
        if chat._peft is not None:
            chat._peft.unload()
