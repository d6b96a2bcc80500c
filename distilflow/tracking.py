"""The one place that knows the MLflow run layout.

One experiment per dataset; one parent run per pipeline run; one child run per
stage (tagged `distilflow.stage` and `distilflow.cached`). Everything goes
through an explicit `MlflowClient` and run ids rather than MLflow's fluent,
thread-local "active run", because Prefect runs tasks in worker threads.
Every run is closed as FINISHED, FAILED or KILLED, never left RUNNING.
"""

from __future__ import annotations

import json
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from distilflow.errors import DistilflowError

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "distilflow.stage"


def default_tracking_uri(root: Path) -> str:
    """The embedded store: SQLite beside the project, artifacts in mlartifacts/."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI when set (a server), else the embedded store: read only at the edges (CLI, deployments)."""
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def artifact_root(root: Path) -> str:
    return (Path(root).resolve() / "mlartifacts").as_uri()


def git_commit(root: Path) -> str:
    """HEAD's sha, with '-dirty' when tracked files changed; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def wait_for_server(uri: str, attempts: int = 3, backoff_s: float = 1.0) -> None:
    """Probe a tracking server's /health, retrying with backoff, then fail with one clear message.

    MLflow's own client retries each request for minutes; a scheduled run
    should learn quickly that the server is down.
    """
    import urllib.error
    import urllib.request

    error = ""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                if response.status == 200:
                    return
                error = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            error = str(getattr(exc, "reason", exc))
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    raise DistilflowError(f"MLflow tracking server {uri} is unreachable after {attempts} attempts ({error}): "
                          "start it, or unset MLFLOW_TRACKING_URI to use the embedded store")


@dataclass
class Run:
    """A handle on one MLflow run: log through it by id, from any thread."""

    client: "object"
    run_id: str
    experiment_id: str

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)


class Tracker:
    """Opens the store once and hands out parent and child runs."""

    def __init__(self, uri: str, root: Path):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.root = Path(root)
        if uri.startswith(("http://", "https://")):
            wait_for_server(uri)
        try:
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        except Exception as exc:
            raise DistilflowError(f"MLflow tracking store {uri!r} could not be opened: {exc}") from None

    def experiment_id(self, name: str) -> str:
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            location = artifact_root(self.root) + f"/{name}" if self.uri.startswith("sqlite:") else None
            return self.client.create_experiment(name, artifact_location=location)
        except DistilflowError:
            raise
        except Exception as exc:
            raise DistilflowError(f"MLflow tracking store {self.uri!r} is unusable: {str(exc).splitlines()[0]}") from None

    @contextmanager
    def run(self, experiment: str, name: str, tags: dict[str, str] | None = None, parent: Run | None = None) -> Iterator[Run]:
        """A run that ends FINISHED on success, FAILED on error, KILLED on Ctrl-C."""
        exp_id = parent.experiment_id if parent else self.experiment_id(experiment)
        all_tags = dict(tags or {})
        if parent:
            all_tags[PARENT_TAG] = parent.run_id
        mlrun = self.client.create_run(exp_id, run_name=name, tags=all_tags)
        run = Run(self.client, mlrun.info.run_id, exp_id)
        try:
            yield run
        except KeyboardInterrupt:
            self.client.set_terminated(run.run_id, "KILLED")
            raise
        except BaseException:
            self.client.set_terminated(run.run_id, "FAILED")
            raise
        self.client.set_terminated(run.run_id, "FINISHED")

    def register_classifier(self, run: Run, model_dir: Path, preprocessor: Path, name: str, alias: str,
                            input_example, tags: dict[str, str] | None = None) -> str:
        """Log a classifier + its preprocessing as a pyfunc in `run`, register it, point `alias` at it.

        Client calls only: the pyfunc is saved locally and uploaded to the run,
        so no process-wide MLflow state (tracking URI, active run) is touched.
        """
        import tempfile

        from mlflow.exceptions import MlflowException

        from tasks.registry import save_served_model

        with tempfile.TemporaryDirectory() as tmp:
            local = save_served_model(Path(model_dir), Path(preprocessor), input_example, Path(tmp) / "model")
            self.client.log_artifacts(run.run_id, str(local), "model")
        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already registered
        source = f"{self.client.get_run(run.run_id).info.artifact_uri}/model"
        mv = self.client.create_model_version(name, source, run_id=run.run_id, tags={k: str(v) for k, v in (tags or {}).items()})
        self.client.set_registered_model_alias(name, alias, mv.version)
        return str(mv.version)

    def model_version(self, models_uri: str):
        """`models:/name@alias` or `models:/name/version` → the ModelVersion, or None if absent."""
        from mlflow.exceptions import MlflowException

        ref = models_uri.removeprefix("models:/")
        name, sep, alias = ref.partition("@")
        try:
            return self.client.get_model_version_by_alias(name, alias) if sep else self.client.get_model_version(*ref.split("/"))
        except MlflowException:
            return None

    def load_pyfunc(self, models_uri: str):
        """A registered model (`models:/name@alias` or `models:/name/version`), loaded from this store."""
        import mlflow.artifacts
        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        mv = self.model_version(models_uri)
        if mv is None:
            raise DistilflowError(f"{models_uri}: no such registered model version in {self.uri}")
        try:
            location = self.client.get_model_version_download_uri(mv.name, mv.version)
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=self.uri)
            return mlflow.pyfunc.load_model(local)
        except MlflowException as exc:
            raise DistilflowError(f"{models_uri} could not be loaded: {str(exc).splitlines()[0]}") from None

    def log_stage(self, parent: Run, stage: str, result, cached: bool, lineage: dict[str, str]) -> Run:
        """One child run holding a stage's record (metrics, tags, files, texts)."""
        tags = {STAGE_TAG: stage, "distilflow.cached": str(cached).lower(), **lineage, **result.tags}
        with self.run("", stage, tags=tags, parent=parent) as child:
            if result.params:
                child.log_params(result.params)
            if result.metrics:
                child.log_metrics(result.metrics)
            for step, row in enumerate(result.history):
                child.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=step)
            for path in result.artifacts:
                child.log_artifact(path)
            for name, text in result.texts.items():
                child.log_text(text, name)
        return child

