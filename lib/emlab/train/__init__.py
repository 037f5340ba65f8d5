"""Training (02_finetune): LoRA on a chat dataset, adapters saved on a schedule.

    lora.py          `train_lora`: encoding, the training loop, checkpoints
    packing.py       which rows make each optimizer step, laid end to end (padding-free)
    loss.py          cross-entropy through the output layer without keeping the logits
    schedule.py      `CheckpointSchedule`: when to save adapters
    openai_jobs.py   fine-tuning jobs at OpenAI's API (subjects behind an API)
"""
