"""What the CLI prints at the end of a run and of a search: the headline numbers, the selection, the registration."""

from __future__ import annotations

import sys

from distilflow.layout import PATHS, Layout
from distilflow.redact import redact


def _gains(summary: dict) -> None:
    for name, row in (summary.get("baseline") or {}).items():
        beats = "teacher" in summary and row["test_accuracy"] > summary["teacher"]["test.accuracy"]
        print(
            f"baseline ({name}, scikit-learn) test accuracy: {row['test_accuracy']:.4f}"
            + ("  <- beats the teacher" if beats else "")
        )
    for budget, row in (summary.get("transfer_gain") or {}).items():
        print(
            f"transfer gain at {budget} labels/class: {row['gain']:+.4f} "
            f"(pretrained {row['pretrained']:.4f} vs scratch {row['scratch']:.4f})"
        )
    for budget, row in (summary.get("kd_gain") or {}).items():
        print(
            f"KD gain, {'all labels' if budget == 'all' else f'{budget} labels/class'}: {row['gain']:+.4f} "
            f"(student with KD {row['kd']:.4f} vs without {row['no_kd']:.4f})"
        )


def _selection(sel: dict) -> None:
    print(f"selection ({sel['policy']}):")
    for v in sel["verdicts"]:
        mark = "→" if sel["pick"] and v["variant"] == sel["pick"]["variant"] else " "
        print(
            f"  {mark} {v['variant']:<26} val {v['val_accuracy']:.4f}  b1 {v['latency_b1_ms']:.3f} ms  "
            f"{v['size_bytes'] / 1024:6.1f} KB  {'ok' if v['feasible'] else 'out: ' + v['why']}"
        )
    print(f"product: {sel['reason']}")


def print_run(summary: dict, root, uri: str) -> None:
    """What `distilflow run` prints at the end."""
    print(f"done: MLflow run {summary['run_id']} in {redact(uri)}")
    print("stages: " + ", ".join(f"{k}={v}" for k, v in summary["stages"].items()))
    if "teacher" in summary:
        print(f"teacher test accuracy: {summary['teacher']['test.accuracy']:.4f}")
    _gains(summary)
    if summary.get("compression"):
        print(f"compression report: {Layout(root).compression_report}")
    if summary.get("selection"):
        _selection(summary["selection"])
    if summary.get("registered"):
        reg = summary["registered"]
        state = "unchanged since the last run" if reg["unchanged"] else "@challenger"
        print(
            f"registered: {reg['model']} version {reg['version']} ({state}); review with `make ui`, then `make promote`"
        )


def print_search(summary: dict, uri: str) -> None:
    """What `distilflow search` prints at the end."""
    trials = summary["trials"]
    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "failed")}
    print(
        f"study {summary['study']}: {len(trials)} trials ({counts['complete']} complete, {counts['pruned']} pruned, "
        f"{counts['failed']} failed); report: {PATHS['search_report']}"
    )
    if "best" in summary:
        best = summary["best"]
        print(f"best teacher: trial {best['number']} (validation accuracy {best['objective']['val_accuracy']:.4f})")
        print(f"its params: {summary['params_file']} (python -m distilflow run --params {PATHS['searched_params']})")
    if summary.get("choice"):
        print(f"product: {summary['choice']['reason']}")
    if summary.get("registered"):
        reg = summary["registered"]
        state = "unchanged" if reg["unchanged"] else "@challenger"
        print(f"registered: {reg['model']} version {reg['version']} ({state}) in {redact(uri)}")
    sys.stdout.flush()
