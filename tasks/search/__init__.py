"""The search's logic, with no orchestration: the space, the pruning rule, the front and the reports.

`flows/search.py` runs it: Optuna asks, a trial runs the pipeline's own stage
functions with params overrides (flows/trial.py), Optuna is told.
"""
