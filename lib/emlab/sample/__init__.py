"""Sampling: answers from a model, on this machine or behind an API.

    generate.py   `sample_answers`: resumable waves of answers from a base model or a checkpoint
    engine.py     emlab's decode engine (static KV cache, refill, per-answer randomness)
    weights.py    the weights the engine reads, and LoRA adapters applied to them
    draw.py       drawing the next token with randomness that belongs to each answer
    serve.py      an OpenAI-compatible chat server on the same engine (`python -m emlab.sample.serve`)
    remote/       subjects behind an API: answers through the chat completions API
"""
