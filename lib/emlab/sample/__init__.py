"""Sampling: answers from a model, on this machine or behind an API.

    generate.py   `sample_answers`: resumable waves of answers from a base model or a checkpoint
    protocol.py   what every decode engine takes and gives (`Request`, `Completion`, `Engine`)
    choose.py     `engine_for`: the one choice of engine, for `sample_answers` and the chat server
    engine.py     emlab's decode engine (static KV cache, refill, per-answer randomness)
    fallback.py   the same interface on transformers' `generate` (other models, 4-bit, DoRA)
    weights.py    the weights the engine reads, and LoRA adapters applied to them
    draw.py       drawing the next token with randomness that belongs to each answer
    serve.py      an OpenAI-compatible chat server on the same engines (`python -m emlab.sample.serve`)
    remote/       subjects behind an API: answers through the chat completions API
"""
