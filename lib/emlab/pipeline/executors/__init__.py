"""Where an experiment's steps run. Both executors list, check and guard through
`emlab.pipeline.steps`, and run a step through `emlab.pipeline.steps.run_or_skip`:

    local.py   here, one step after another (the default)
    gpus.py    here, steps side by side over several GPUs, one process per step (`--gpus N`);
               its order and placement in schedule.py
    slurm.py   one Slurm job per step (`emlab step` in the job), dependencies from the stage table
    status.py  each step's state for `emlab status`: done, queued, running, failed, ...
"""

from __future__ import annotations

EXECUTORS: tuple[str, ...] = ("local", "slurm")
