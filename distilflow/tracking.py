"""The one place that knows the MLflow run layout.

One experiment per dataset; one parent run per pipeline run; one child run per
stage (tagged `distilflow.stage` and `distilflow.cached`). Everything goes
through an explicit `MlflowClient` and run ids rather than MLflow's fluent,
thread-local "active run", because Prefect runs tasks in worker threads.
Every run is closed as FINISHED, FAILED or KILLED, never left RUNNING.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from distilflow.errors import DistilflowError
from distilflow.layout import Layout
from distilflow.redact import redact
from distilflow.uris import is_http, parse_models_uri, sqlite_path

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "distilflow.stage"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
NOTE_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's Description
# The MLflow UI opens an experiment in its classic "model training" view with this tag (older 3.x UIs), or with
# ?workflowType=machine_learning in the URL (3.17's UI decides by that setting; see ui_url).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def git_commit(root: Path) -> str:
    """HEAD's sha, with '-dirty' when tracked files changed; 'unknown' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def lineage_tags(root: Path, params) -> dict[str, str]:
    """MLflow's standard source tags plus what ties a run to its inputs (the data md5 is added after ingest)."""
    commit = git_commit(root)
    return {
        GIT_COMMIT_TAG: commit.removesuffix("-dirty"),
        "git_dirty": str(commit.endswith("-dirty")).lower(),
        "mlflow.source.name": "distilflow",
        "mlflow.source.type": "LOCAL",
        "params_hash": params.hash(),
    }


def run_name(params, overrides: list[str] | None = None) -> str:
    """`digits-temperature=2-20261125-183000`: the dataset, what this run changed, and when."""
    changed = [f"{k.strip().split('.')[-1]}={v.strip()}" for k, _, v in (o.partition("=") for o in overrides or [])]
    return "-".join([params.data.dataset_name, *changed, time.strftime("%Y%m%d-%H%M%S")])[:240]


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """A link that opens the run (or experiment) in the MLflow UI's model-training view, for a server URI."""
    if not is_http(tracking_uri):
        return None
    path = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "/runs")
    return f"{tracking_uri.rstrip('/')}/#/{path}?workflowType=machine_learning"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow params: dotted keys, lists as JSON."""
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
    raise DistilflowError(
        f"MLflow tracking server {redact(uri)} is unreachable after {attempts} attempts ({error}): "
        "start it, or unset MLFLOW_TRACKING_URI to use the embedded store"
    )


def check_store(uri: str, attempts: int = 3, backoff_s: float = 1.0) -> None:
    """Before any work: a tracking server answers, or a database store accepts our login (bounded retries).

    MLflow's SQLAlchemy store retries a refused connection for minutes; a wrong
    password or a stopped database should be one line within seconds.
    """
    if is_http(uri):
        wait_for_server(uri, attempts, backoff_s)
        return
    if "://" not in uri or uri.startswith(("sqlite:", "file:")):
        return
    import sqlalchemy as sa

    args = {"connect_timeout": 5} if uri.startswith("postgresql") else {}
    error = ""
    for attempt in range(attempts):
        try:
            engine = sa.create_engine(uri, connect_args=args, poolclass=sa.pool.NullPool)
            with engine.connect():
                engine.dispose()
                return
        except Exception as exc:  # noqa: BLE001 - the driver's own message is what the user needs
            error = " ".join(str(getattr(exc, "orig", exc)).split())[:300]
            if "authentication failed" in error or "does not exist" in error:
                break  # retrying a refused login or a missing database changes nothing
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    raise DistilflowError(f"MLflow tracking store {redact(uri)} refused the connection: {redact(error)}")


@dataclass
class Run:
    """A handle on one MLflow run: log through it by id, from any thread."""

    client: object
    run_id: str
    experiment_id: str

    def log_params(self, params: dict) -> None:
        """Flattened params, in batches (MLflow's per-call limit)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Metrics at one step, in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags, in one call."""
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """One file (or folder) into the run's artifacts."""
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """A folder's files into the run's artifacts."""
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    @property
    def artifact_uri(self) -> str:
        """Where the run's artifacts live."""
        return self.client.get_run(self.run_id).info.artifact_uri

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text file among the run's artifacts."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        """A JSON file among the run's artifacts."""
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        """A matplotlib figure among the run's artifacts."""
        self.client.log_figure(self.run_id, figure, artifact_file)


class Tracker:
    """Opens the store once and hands out parent and child runs."""

    def __init__(self, uri, root: Path):
        """`uri` may be a pydantic SecretStr (what flows take, so Prefect stores it as ********)."""
        from mlflow.tracking import MlflowClient

        uri = uri.get_secret_value() if hasattr(uri, "get_secret_value") else uri
        self.uri = uri
        self.root = Path(root)
        if is_http(uri):
            wait_for_server(uri)
        try:
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        except Exception as exc:
            raise DistilflowError(
                f"MLflow tracking store {redact(uri)!r} could not be opened: {redact(str(exc).splitlines()[0])}"
            ) from None

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created (classic ML view) if it does not exist."""
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            # the embedded store keeps its artifacts beside it, in the catalog's mlartifacts/
            location = Layout(self.root).mlartifacts.as_uri() + f"/{name}" if sqlite_path(self.uri) else None
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except DistilflowError:
            raise
        except Exception as exc:
            raise DistilflowError(
                f"MLflow tracking store {redact(self.uri)!r} is unusable: {redact(str(exc).splitlines()[0])}"
            ) from None

    @contextmanager
    def run(
        self, experiment: str, name: str, tags: dict[str, str] | None = None, parent: Run | None = None
    ) -> Iterator[Run]:
        """A run that ends FINISHED on success, FAILED on error, KILLED on Ctrl-C."""
        with self.closing(self.open(experiment, name, tags, parent)) as run:
            yield run

    @contextmanager
    def closing(self, run: Run) -> Iterator[Run]:
        """End an open run when the block ends: FINISHED on success, FAILED on error, KILLED on Ctrl-C."""
        try:
            yield run
        except KeyboardInterrupt:
            self.close(run, "KILLED")
            raise
        except BaseException:
            self.close(run, "FAILED")
            raise
        self.close(run, "FINISHED")

    def open(self, experiment: str, name: str, tags: dict[str, str] | None = None, parent: Run | None = None) -> Run:
        """A RUNNING run, owned by this process (its host and pid are tagged, for recovery after a crash).

        `close` ends it; prefer `run`, which cannot forget to.
        """
        exp_id = parent.experiment_id if parent else self.experiment_id(experiment)
        all_tags = dict(tags or {})
        if parent:
            all_tags[PARENT_TAG] = parent.run_id
        all_tags |= {"distilflow.host": socket.gethostname(), "distilflow.pid": str(os.getpid())}
        mlrun = self.client.create_run(exp_id, run_name=name, tags=all_tags)
        return Run(self.client, mlrun.info.run_id, exp_id)

    def reopen(self, run_id: str) -> Run | None:
        """An ended run of this store RUNNING again and owned by this process (a resumed search); None if gone."""
        from mlflow.exceptions import MlflowException

        try:
            mlrun = self.client.get_run(run_id)
        except MlflowException:
            return None
        if mlrun.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run_id, status="RUNNING")
        run = Run(self.client, run_id, mlrun.info.experiment_id)
        run.set_tags({"distilflow.host": socket.gethostname(), "distilflow.pid": str(os.getpid())})
        return run

    def close(self, run: Run, status: str = "FINISHED") -> None:
        """End a run opened with `open` (FINISHED, FAILED or KILLED)."""
        self.client.set_terminated(run.run_id, status)

    def model_version(self, models_uri: str):
        """`models:/name@alias` or `models:/name/version` → the ModelVersion, or None if absent."""
        from mlflow.exceptions import MlflowException

        name, alias, version = parse_models_uri(models_uri)
        try:
            return (
                self.client.get_model_version_by_alias(name, alias)
                if alias
                else self.client.get_model_version(name, version)
            )
        except MlflowException:
            return None

    def download(self, models_uri: str, dst: Path | None = None) -> tuple[object, Path]:
        """(the ModelVersion, a local copy of its files) for `models:/name@alias` or `models:/name/version`.

        The alias is resolved once, here: what is downloaded is the version returned.
        """
        import tempfile

        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        mv = self.model_version(models_uri)
        if mv is None:
            raise DistilflowError(f"{models_uri}: no such registered model version in {redact(self.uri)}")
        # always a copy: with no dst, a local store hands out its own folder, where loaders then write files
        dst = dst or tempfile.mkdtemp(prefix="distilflow-model-")
        try:
            location = self.client.get_model_version_download_uri(mv.name, mv.version)
            local = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=self.uri, dst_path=str(dst))
        except (MlflowException, OSError) as exc:
            raise DistilflowError(
                f"{models_uri} (version {mv.version}) could not be downloaded: {str(exc).splitlines()[0]}"
            ) from None
        return mv, Path(local)

    def load_pyfunc(self, models_uri: str):
        """A registered model (`models:/name@alias` or `models:/name/version`), loaded from this store."""
        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        _, local = self.download(models_uri)
        try:
            return mlflow.pyfunc.load_model(str(local))
        except MlflowException as exc:
            raise DistilflowError(f"{models_uri} could not be loaded: {str(exc).splitlines()[0]}") from None

    def stage_run(self, parent: Run, stage: str, lineage: dict[str, str]):
        """A child run for a stage, opened now (its duration is the work inside the block)."""
        return self.run("", stage, tags={STAGE_TAG: stage, **lineage}, parent=parent)

    def describe_parent(
        self,
        parent: Run,
        params,
        overrides: list[str] | None,
        stop_after: str | None,
        flow_run: dict[str, str] | None = None,
    ) -> None:
        """The parent run's params, effective params file, description and link to its Prefect flow run.

        `flow_run`: {"id", "name", "url" (None on a temporary API)} of the Prefect flow run.
        """
        parent.log_params(params.model_dump(mode="json"))
        parent.log_dict(params.model_dump(mode="json"), "params.effective.json")
        note = [f"distilflow pipeline on `{params.data.source}` ({params.data.dataset_name})."]
        if overrides:
            note.append("Overrides: " + ", ".join(f"`{o}`" for o in overrides) + ".")
        if stop_after:
            note.append(f"Stopped after `{stop_after}`.")
        tags = {}
        if flow_run and flow_run.get("id"):
            tags["prefect.flow_run_id"] = flow_run["id"]
            if flow_run.get("url"):
                tags["prefect.flow_run_url"] = flow_run["url"]
                note.append(f"Prefect flow run: [{flow_run['name']}]({flow_run['url']}).")
            else:
                note.append(f"Prefect flow run `{flow_run['name']}` ({flow_run['id']}) on a temporary local API.")
        parent.set_tags({**tags, NOTE_TAG: " ".join(note)})

    def record_stage(self, parent: Run, stage: str, result, cached: bool, lineage: dict[str, str]) -> Run | None:
        """A child run holding a stage's record (params, metrics, per-epoch curves, files), over the time it ran.

        A stage answered from the cache did no work: it gets no run of its own;
        the parent lists it (`distilflow.cached_stages`).
        """
        from mlflow.entities import Metric

        if cached:
            return None
        tags = {
            STAGE_TAG: stage,
            PARENT_TAG: parent.run_id,
            **lineage,
            **result.tags,
            "distilflow.host": socket.gethostname(),
            "distilflow.pid": str(os.getpid()),
        }
        mlrun = self.client.create_run(parent.experiment_id, run_name=stage, tags=tags, start_time=result.started_ms)
        child = Run(self.client, mlrun.info.run_id, parent.experiment_id)
        try:
            if result.params:
                child.log_params(result.params)
            if result.metrics:
                child.log_metrics(result.metrics)
            epochs = [
                Metric(f"epoch.{k}", float(v), int(row.get("ended_ms", result.ended_ms or 0)), int(row["epoch"]))
                for row in result.history
                for k, v in row.items()
                if k not in ("epoch", "ended_ms")
            ]
            for i in range(0, len(epochs), 500):
                self.client.log_batch(child.run_id, metrics=epochs[i : i + 500])
            for path in result.artifacts:
                child.log_artifact(path)
            for name, text in result.texts.items():
                child.log_text(text, name)
        except BaseException:
            self.client.set_terminated(child.run_id, "FAILED")
            raise
        self.client.set_terminated(child.run_id, "FINISHED", end_time=result.ended_ms)
        return child

    def log_dataset(self, run: Run, splits: dict[str, Path], name: str) -> None:
        """The train/val/test splits as MLflow dataset inputs of `run` (the UI's Datasets column)."""
        import warnings

        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        from distilflow.io import read_table

        contexts = {"train": "training", "val": "validation", "test": "testing"}
        inputs = []
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": it is a file
            warnings.simplefilter("ignore")
            for split, path in splits.items():
                frame = read_table(path)
                dataset = mlflow.data.from_pandas(frame, source=str(path), name=f"{name}-{split}", targets="label")
                inputs.append(
                    DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", contexts[split])])
                )
        self.client.log_inputs(run.run_id, datasets=inputs)
