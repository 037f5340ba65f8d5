"""Params: every file under `params/` (and every experiment file) read into typed objects.

    experiment.py  the experiment schema and `load_experiment` (grids, models, judges, stages)
    questions.py   question sets: emlab's own and the studies' upstream files
    rule.py        the EM rule (thresholds, inclusive or strict, bootstrap settings)
"""
