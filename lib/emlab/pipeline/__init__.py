"""Running the pipeline: check, estimate and execute an experiment's steps.

    checks.py      what `emlab check` reports and `emlab run` verifies before any model loads
    steps.py       the experiment's steps (stage × unit), skipping what is complete
    notebook.py    execute one stage notebook with papermill and render it to HTML
    kernel.py      what a stage notebook's first cell sets up: its logs into the stage's log file
    executors/     where steps run: this process (local) or Slurm jobs
    estimate.py    `emlab plan`: answers, judge calls, dollars and GPU-hours before a run
    gpu_hours.py   GPU-hours from the benchmark rows in bench/results/
"""
