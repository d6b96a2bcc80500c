"""A trial's nested MLflow run under the search's run: its values, per-epoch curves, final figures and state.

Only the driver writes to MLflow (trials hand their records back), so an
embedded SQLite store never sees concurrent writers.
"""

from __future__ import annotations

FIGURES = ("val_accuracy", "val_macro_f1", "latency_b1_ms", "latency_b256_ms", "size_bytes", "test_accuracy")


def _tags(outcome: dict, error: str | None) -> dict[str, str]:
    tags = {"distilflow.trial.state": outcome["state"], "distilflow.trial.host": str(outcome.get("host", ""))}
    if error:
        tags |= {"distilflow.trial.error": error[:4000], "mlflow.note.content": f"Failed: {error[:4000]}"}
    if outcome.get("reason"):
        tags["distilflow.trial.reason"] = str(outcome["reason"])[:4000]
    if (outcome.get("objective") or {}).get("variant"):
        tags["distilflow.trial.candidate"] = outcome["objective"]["variant"]
    return tags


def _figures(outcome: dict) -> dict[str, float]:
    o = outcome.get("objective") or {}
    metrics = {k: float(o[k]) for k in FIGURES if k in o}
    metrics |= {f"seconds.{k}": v for k, v in outcome.get("stage_s", {}).items()}
    if "seconds" in outcome:
        metrics["seconds"] = outcome["seconds"]
    if "feasible" in o:
        metrics["feasible"] = float(bool(o["feasible"]))
    return metrics


def _epochs(outcome: dict) -> list:
    from mlflow.entities import Metric

    epochs = [
        Metric(f"{stage}.{k}", float(v), int(row.get("ended_ms", 0)), int(row["epoch"]))
        for stage, rows in outcome.get("history", {}).items()
        for row in rows
        for k, v in row.items()
        if k not in ("epoch", "ended_ms") and isinstance(v, (int, float))
    ]
    return epochs + [Metric("pruner.val_accuracy", v, 0, int(e)) for e, v in outcome.get("curve", {}).items()]


def log_trial(tracker, run, outcome: dict, values: dict, error: str | None) -> None:
    """Fill and close a trial's nested run: FAILED for a failed trial, FINISHED otherwise (pruned included)."""
    run.log_params(values)
    run.set_tags(_tags(outcome, error))
    run.log_metrics(_figures(outcome))
    epochs = _epochs(outcome)
    for i in range(0, len(epochs), 500):
        run.client.log_batch(run.run_id, metrics=epochs[i : i + 500])
    tracker.close(run, "FAILED" if outcome["state"] == "failed" else "FINISHED")
