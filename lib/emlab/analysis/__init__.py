"""Analysis (04_analysis): judged scores turned into EM rates, figures and the report.

    metrics.py     EM rates with bootstrap confidence intervals
    agreement.py   how far a judge can be trusted: its scores against the gold set
    plots.py       the report's figures (altair), each stating its n and its uncertainty
    report.py      notebook headers, judge summaries, the experiment's index page
"""
