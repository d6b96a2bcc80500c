"""The environment, read in one place at the edge and passed in as `Settings`.

Four variables point a client at shared services (README "Running as a
team"); nothing below the CLI and the deployments' entry points reads the
environment itself. An unset or empty variable means the project's default:
the embedded MLflow store, a temporary Prefect API, the study in
`.distilflow/search.db`, trials on local processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# field -> the environment variable it comes from (python -m stack writes these four into .stack/env)
ENV = {
    "tracking_uri": "MLFLOW_TRACKING_URI",
    "prefect_api_url": "PREFECT_API_URL",
    "search_storage": "DISTILFLOW_SEARCH_STORAGE",  # a database URL with a password belongs here, not in params
    "dask_address": "DISTILFLOW_DASK_ADDRESS",  # a team's Dask scheduler: search trials run there
}


@dataclass(frozen=True)
class Settings:
    """Where the shared services are; None means the project's own default."""

    tracking_uri: str | None = None
    prefect_api_url: str | None = None
    search_storage: str | None = None
    dask_address: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings `env` (default: this process's environment) holds."""
        env = os.environ if env is None else env
        return cls(**{field: env.get(var) or None for field, var in ENV.items()})
