"""All-or-nothing registration: every model of a run is registered, or none is.

The one registration path, used by the pipeline (the product plus the fp32
references, `challenger`) and by the pretrain flow (the backbone, `pretrained`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from distilflow.errors import DistilflowError
from distilflow.hashing import path_hash
from tasks.registry import CHALLENGER
from tasks.registry.card import card_description
from tasks.registry.packaging import headline, save_served_model, served_latency


class UnknownModel(DistilflowError):
    """No registered model of that name: a typo for a person, or (for the schedule) nothing registered yet."""


@dataclass
class Variant:
    """One model to register: where its classifier lives and its row of the evaluation table."""

    model_name: str
    classifier: Path  # a torch model folder, an ONNX file or a TorchScript file
    metrics: dict  # the evaluation harness's row (tasks/evaluate.py:evaluate_variant)
    role: str  # "product" (gets the challenger alias) or "reference"


def version_by_alias(client, name: str, alias: str):
    """The version an alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def require_model(client, name: str) -> None:
    """A clear error naming the registered models when `name` is not one of them."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=100))
        raise UnknownModel(f"unknown registered model {name!r} (registered: {', '.join(known) or 'none'})") from None


def find_complete_version(tracker, name: str, model_hash: str) -> str | None:
    """The newest complete version of `name` with this model hash whose files are still in the store, or None."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        versions = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"], max_results=1000)
    except MlflowException:
        return None
    for mv in versions:
        if mv.tags.get("model_hash") != model_hash or mv.tags.get("registration") != "complete":
            continue
        try:  # a deleted or emptied artifact store leaves a version that cannot load: register afresh
            files = mlflow.artifacts.list_artifacts(
                artifact_uri=client.get_model_version_download_uri(name, mv.version), tracking_uri=tracker.uri
            )
        except (MlflowException, OSError):
            files = []
        if any(f.path.endswith("MLmodel") for f in files):
            return str(mv.version)
    return None


def register_variants(
    tracker,
    run,
    variants: list[Variant],
    preprocessor: Path,
    input_example: pd.DataFrame,
    tags: dict[str, str],
    card: str,
    alias: str = CHALLENGER,
) -> dict:
    """Register every variant as a new version, all or nothing; the product's version gets `alias`.

    Returns {"versions": {model name: version}, "product": version, "unchanged": bool}.

    A version is created only once its files are uploaded; if any step fails,
    the versions this call created are deleted again, so the registry never
    holds half of a run. An unchanged product (same model file and preprocessing
    as *any* complete version whose files are still in the store) is not
    registered twice: that version is returned.
    """
    from mlflow.exceptions import MlflowException

    client = tracker.client
    product = next(v for v in variants if v.role == "product")
    model_hash = path_hash(product.classifier)[:16] + path_hash(preprocessor)[:16]
    same = find_complete_version(tracker, product.model_name, model_hash)
    if same is not None:
        return {"versions": {product.model_name: same}, "product": same, "unchanged": True}

    created: list[tuple[str, str]] = []
    new_models: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for v in variants:
                local = save_served_model(v.classifier, preprocessor, input_example, Path(tmp) / v.model_name, card)
                artifact_path = f"registered/{v.model_name}"
                run.log_artifacts(local, artifact_path)
                try:
                    client.create_registered_model(
                        v.model_name,
                        description="distilflow: raw feature columns in, class and class probabilities out",
                    )
                    new_models.append(v.model_name)
                except MlflowException:
                    pass  # already registered
                # "pending" until every variant and the alias are in place: a version that a killed process
                # leaves behind never claims to be complete
                version_tags = {
                    **tags,
                    **headline(v.metrics),
                    "role": v.role,
                    "variant": str(v.metrics["variant"]),
                    "registration": "pending",
                }
                if v is product:
                    version_tags["model_hash"] = model_hash
                    served = served_latency(local, input_example)
                    version_tags["served_latency_b1_ms"] = f"{served['median_ms']:.4f}"
                    product.metrics = {**product.metrics, "served_latency_b1_median_ms": served["median_ms"]}
                # a runs:/ source: loading models:/... then never writes into the artifact store (MLflow copies first)
                mv = client.create_model_version(
                    v.model_name,
                    f"runs:/{run.run_id}/{artifact_path}",
                    run_id=run.run_id,
                    tags=version_tags,
                    description=card_description(card),
                )
                created.append((v.model_name, str(mv.version)))
        versions = dict(created)
        client.set_registered_model_alias(product.model_name, alias, versions[product.model_name])
        for name, version in created:
            client.set_model_version_tag(name, version, "registration", "complete")
        return {"versions": versions, "product": versions[product.model_name], "unchanged": False}
    except BaseException:
        _undo_registration(client, created, new_models, product.model_name, alias)
        raise


def _undo_registration(
    client, created: list[tuple[str, str]], new_models: list[str], product_name: str, alias: str
) -> None:
    """Delete what a failed registration created; whatever cannot be deleted is tagged `registration=failed`."""
    try:  # set only if the failure came after the alias step; looked up once, not per version
        challenger = version_by_alias(client, product_name, alias)
    except Exception:  # noqa: BLE001 - best effort, as below
        challenger = None
    for name, version in created:
        try:
            if challenger is not None and (name, version) == (product_name, str(challenger.version)):
                client.delete_registered_model_alias(product_name, alias)
            client.delete_model_version(name, version)
        except Exception:  # noqa: BLE001 - best effort; the original error is what the user needs
            try:
                client.set_model_version_tag(name, version, "registration", "failed")
            except Exception:  # noqa: BLE001
                pass
    for name in new_models:  # a model this call created, left without versions, would look registered
        try:
            if not client.search_model_versions(f"name = '{name}'"):
                client.delete_registered_model(name)
        except Exception:  # noqa: BLE001
            pass
