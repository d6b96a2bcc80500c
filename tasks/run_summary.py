"""What a pipeline run reports: the headline numbers of each stage that ran, on the parent run and for the CLI."""

from __future__ import annotations

from distilflow.records import StageResult


def _metrics(parent, results: dict[str, StageResult], summary: dict) -> None:
    """The teacher, baseline, transfer and KD headline figures, on the parent run and in `summary`."""
    if "baseline" in results:
        summary["baseline"] = results["baseline"].info["models"]
        parent.log_metrics({f"baseline.{k}": v for k, v in results["baseline"].metrics.items()})
    if "finetune" in results:
        summary["teacher"] = results["finetune"].metrics
        parent.log_metrics({f"teacher.{k}": v for k, v in results["finetune"].metrics.items() if k.startswith("test.")})
    if "transfer_gain" in results:
        parent.log_metrics(results["transfer_gain"].metrics)
        summary["transfer_gain"] = results["transfer_gain"].info["gains"]
    if "distill" in results:
        parent.log_metrics({f"student.{k}": v for k, v in results["distill"].metrics.items()})
        summary["kd_gain"] = results["distill"].info["kd_gain"]


def _compression(parent, results: dict[str, StageResult], summary: dict) -> None:
    """The compression table and the selection, on the parent run and in `summary`."""
    if "evaluate" in results:
        parent.log_metrics(results["evaluate"].metrics)
        for path in results["evaluate"].artifacts:
            parent.log_artifact(path)
        summary["compression"] = results["evaluate"].info["table"]
        summary["notes"] = results["evaluate"].info["notes"]
    if "select" in results:
        summary["selection"] = results["select"].info
        parent.log_metrics(dict(results["select"].metrics))
        parent.set_tags(results["select"].tags)
        parent.log_text(results["select"].texts["selection.md"], "selection.md")


def summarize(parent, results: dict[str, StageResult], stages: dict[str, str]) -> dict:
    """What the CLI prints and the parent run shows: the headline numbers of each stage that ran."""
    summary = {"run_id": parent.run_id, "experiment_id": parent.experiment_id, "stages": stages}
    parent.log_metrics({"rows_clean": results["clean"].metrics["rows_out"], **results["split"].metrics})
    summary["split_hashes"] = results["split"].info["hashes"]
    summary["classes"] = results["normalize"].info["classes"]
    _metrics(parent, results, summary)
    _compression(parent, results, summary)
    return summary


def refusal(results: dict[str, StageResult]) -> str | None:
    """Why the select stage shipped nothing (its one line), or None when it picked a product or did not run."""
    if "select" in results and results["select"].info["pick"] is None:
        return results["select"].info["reason"]
    return None


def parent_tags(results: dict[str, StageResult], stages: dict[str, str], lineage: dict) -> dict[str, str]:
    """The parent run's tags once its stages ran: the lineage, the split hashes, which stages came from the cache."""
    cached = ",".join(n for n, s in stages.items() if s == "cached") or "-"
    return {**lineage, **(results["split"].tags if "split" in results else {}), "distilflow.cached_stages": cached}
