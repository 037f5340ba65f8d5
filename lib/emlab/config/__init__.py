"""Params: every file under `params/` (and every experiment file) read into typed objects.

    params.py          the one loader: read through store.inputs, validate with pydantic, explain
                       errors as 'file:line: key: ...' with the nearest valid key
    schemas.py         the schemas of question sets, upstream question files, rubrics, probe sets,
                       gold rows (experiments: experiment.py)
    experiment.py      the experiment schema and `load_experiment` (grids, models, judges, stages)
    question_files.py  question files, emlab's own and the studies' upstream files, as `Question`s
    questions.py       the prompts asked: questions as chats, per experiment
    rubrics.py         judge rubrics and the upstream judge prompts as rubrics
    rule.py            the EM rule (thresholds, inclusive or strict, bootstrap settings)
"""
