"""Helpers shared by test modules and bench/: public names, imported as `from support.X import ...`
(pytest puts tests/ on sys.path, tests/ having no __init__.py; bench/ adds it itself). No test
module imports another test module or conftest; fixtures live in tests/conftest.py.

    batch_double   BatchServer: a local stand-in for OpenAI's Files and Batch endpoints (OpenAIFile)
    openai_double  OpenAIDouble: OpenAI's Files, fine-tuning jobs and chat completions, really training
    judge          the shared llama.cpp judge server, LoopbackProxy (counts, delays, 429s, crashes),
                   judge_for, make_answers
    kills          Runner and run_until_killed: `emlab run` SIGKILLed mid-stage and rerun
    outputs        matching_files: the files a stage's declared pattern names
    runs           REPO, emlab_cli, run_config, fresh_cache, TinyRun, TINY_RUN_GROUP and CONTROLS_RUN_GROUP
                   (the session's tiny run; the arms-and-controls run)
    scores         scores: a made-up wide scores table for the measures and the figures
    slurm          LocalSlurm: a real one-node Slurm cluster, installed and started on demand

batch_double, judge, openai_double and slurm also run by hand: `python tests/support/<module>.py ...`
(see each module's docstring).
"""
