"""Training (02_finetune): LoRA on a chat dataset, adapters saved on a schedule.

    encode.py        chat rows to token ids, labels only on assistant tokens
    lora.py          `train_lora`: the LoRA adapters and the training loop
    packing.py       which rows make each optimizer step, laid end to end (padding-free)
    loss.py          cross-entropy through the output layer without keeping the logits
    graphs.py        training steps recorded and replayed as CUDA graphs
    checkpoints.py   adapters and training state written in the background; resuming
    schedule.py      `CheckpointSchedule`: when to save adapters
    openai_jobs.py   fine-tuning jobs at OpenAI's API (subjects behind an API)
"""
