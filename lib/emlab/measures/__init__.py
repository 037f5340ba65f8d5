"""Measures beside the judged EM rate, taken at every model state (base and checkpoints).

    probe.py   the judge-free logprob probe: misaligned vs aligned answer likelihood
    task.py    the in-distribution task rate on held-out training prompts
"""
