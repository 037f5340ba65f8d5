"""Models: find and load chat models, and the attention kernels training and sampling share.

    load.py        the embedded SmolLM2, a Hugging Face id, a local folder or a GGUF file
    attention.py   attention over padding-free batches (FlashAttention varlen on GPU, sdpa on CPU)
"""
