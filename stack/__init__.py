"""The team stack on one machine: PostgreSQL, an MLflow server, a Prefect server, a Dask cluster, a DVC remote.

`python -m stack up` starts them (each bound to one address, loopback by
default), waits until each answers, and writes what a client needs to
`.stack/env`; `python -m stack down` stops what it started, by PID. A client
then reaches the stack through environment variables only:
`MLFLOW_TRACKING_URI`, `PREFECT_API_URL`, `DISTILFLOW_SEARCH_STORAGE` and
`DISTILFLOW_DASK_ADDRESS`. See `python -m stack --help`.
"""


class StackError(Exception):
    """A user-facing stack error: printed as one `distilflow: error: ...` line, exit 1."""
