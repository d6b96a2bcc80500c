"""The search engine, with no Prefect in it: the study and its storage, trials, the driver's bookkeeping, the pick.

- `space`: the searched params paths, checked by the params schema;
- `study`: storage, the one-driver lock, the sampler, pruned and interrupted trials;
- `prepare`: what runs once before the trials (the parent run, the study, the inputs' snapshot);
- `trial`: one trial in a worker process: the pipeline's own stages on linked inputs;
- `driver`: ask, hand over, tell (Optuna and the trials' nested MLflow runs, `trial_runs`);
- `pruning`, `front`, `report`, `finish`: the median rule, the Pareto front, the reports, the pick.

flows/search.py wires them: trials run as Prefect tasks on a process pool or Dask.
"""
