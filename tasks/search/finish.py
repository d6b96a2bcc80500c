"""The end of a search: every trial as a report row, the pick re-measured and chosen by `select:`, the reports.

A student search re-measures the best trials one at a time, applies
`select:` to all their candidates, and hands the pick to registration
(`registration`); a teacher search writes the best fine-tune as a params file.
"""

from __future__ import annotations

import shutil

from distilflow.io import read_json, write_json, write_text
from distilflow.layout import PATHS, Layout
from distilflow.params import Params
from distilflow.stages import BY_NAME
from tasks.candidates import dominated, majority_macro_f1, select_product
from tasks.registry.run import NotRegistered
from tasks.search import front as fr
from tasks.search.report import search_markdown, search_plot, searched_params
from tasks.search.space import trial_params
from tasks.search.study import is_pruned
from tasks.search.trial import link_inputs
from tasks.stage_runner import run_plain

SEARCHED = PATHS["searched_params"]  # as the user types it: `python -m distilflow run --params params.searched.yaml`


def _row(t) -> dict | None:
    from optuna.trial import TrialState

    states = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    if t.state not in states:
        return None
    return {
        "number": t.number,
        "state": "pruned" if is_pruned(t) else states[t.state],
        "values": dict(t.params),
        "objective": t.user_attrs.get("objective"),
        "seconds": t.user_attrs.get("seconds", 0.0),
        "note": t.user_attrs.get("fail_reason") or t.user_attrs.get("reason", ""),
    }


def trial_rows(study, params: Params) -> list[dict]:
    """Every trial of the study (this session's and earlier ones') as the report's rows, the front marked."""
    out = [row for t in study.get_trials(deepcopy=False) if (row := _row(t)) is not None]
    done = [r for r in out if r["state"] == "complete" and r["objective"]]
    if params.search.target == "student" and done:
        cost = fr.OBJECTIVE_FIELD[params.select.objective]
        mask = fr.pareto_mask([r["objective"]["val_accuracy"] for r in done], [r["objective"][cost] for r in done])
        for r, m in zip(done, mask):
            r["front"] = m
    return out


def reevaluate(params: Params, layout: Layout, name: str, numbers: list[int], study) -> list[dict]:
    """Re-measure the shortlisted trials one at a time (the project's evaluate settings), then their select."""
    rows = []
    shared = study.user_attrs["distilflow.inputs"]
    for number in numbers:
        tparams = trial_params(params, dict(study.trials[number].params))
        tlayout = link_inputs(layout.study_inputs(name), layout.trial(name, number), shared)
        run_plain(BY_NAME["evaluate"], tparams, tlayout)
        run_plain(BY_NAME["select"], tparams, tlayout)
        for r in read_json(tlayout.compression_json):
            if isinstance(r.get("candidate"), str) and r["candidate"]:
                rows.append({**r, "variant": f"trial {number}: {r['variant']}", "trial": number, "local": r["variant"]})
    return rows


def _info(params: Params, name: str, teacher_val: float) -> dict:
    cfg = params.search
    return {
        "study": name,
        "target": cfg.target,
        "sampler": cfg.sampler,
        "seed": params.seed,
        "pruner": cfg.pruner,
        "runner": cfg.runner,
        "workers": cfg.workers,
        "threads": cfg.threads_per_trial,
        "teacher_val_accuracy": teacher_val,
        "eval_threads": params.evaluate.threads,
        "eval_repeats": params.evaluate.repeats,
    }


def _best_teacher(layout: Layout, name: str, raw_params: dict, trials: list[dict], info: dict) -> dict:
    """A teacher search's pick: the most accurate fine-tune, written as a params file a normal run uses."""
    best = max(
        (t for t in trials if t["state"] == "complete"), key=lambda t: (t["objective"]["val_accuracy"], -t["number"])
    )
    accuracy = best["objective"]["val_accuracy"]
    info["teacher_val_accuracy"] = accuracy
    info["objectives_text"] = "validation accuracy of the fine-tuned teacher (maximized)"
    info["pick_text"] = (
        f"Trial {best['number']}: validation accuracy {accuracy:.4f} with "
        + ", ".join(f"`{k}={v}`" for k, v in best["values"].items())
        + f". Written to `{SEARCHED}`: `python -m distilflow run --params {SEARCHED}` trains with it."
    )
    header = (
        f"written by `distilflow search` (study {name}, trial {best['number']}, validation accuracy "
        f"{accuracy:.4f}); run it with: python -m distilflow run --params {SEARCHED}"
    )
    write_text(searched_params(raw_params, best["values"], header), layout.searched_params)
    return {"best": best, "params_file": str(layout.searched_params)}


def _objectives_text(params: Params) -> str:
    drop = params.select.max_drop
    if params.search.objectives == "pareto":
        return f"validation accuracy (max) vs {params.select.objective} (min), constraint select.max_drop {drop}"
    return f"{params.select.objective} (min) subject to validation accuracy ≥ teacher − {drop}"


def _choose(params: Params, layout: Layout, study, name: str, trials: list[dict], info: dict) -> dict:
    """A student search's pick: the shortlist re-measured, then `select:` over all its candidates."""
    cost = fr.OBJECTIVE_FIELD[params.select.objective]
    done = [
        {
            "number": t["number"],
            "val_accuracy": t["objective"]["val_accuracy"],
            "cost": t["objective"][cost],
            "feasible": t["objective"]["feasible"],
        }
        for t in trials
        if t["state"] == "complete"
    ]
    numbers = fr.shortlist(done, params.search.reevaluate_top)
    print(f"re-measuring trials {numbers} one at a time before the pick")
    rows = reevaluate(params, layout, name, numbers, study)
    majority = majority_macro_f1(read_json(Layout(layout.study_inputs(name)).split_report)["class_counts"]["val"])
    choice = select_product(rows, info["teacher_val_accuracy"], majority, params.select)
    info |= {"reevaluated": numbers, "objectives_text": _objectives_text(params), "plot": layout.search_plot.name}
    info["pick_text"] = f"**{choice['reason']}**" if choice["pick"] else f"**Nothing ships:** {choice['reason']}"
    search_plot(trials, layout.search_plot, params.search.threads_per_trial)
    summary = {"choice": choice}
    if choice["pick"] is not None:
        choice["dominated_by"] = dominated(choice["pick"], choice["verdicts"])
        summary["pick_trial"] = next(r for r in rows if r["variant"] == choice["pick"]["variant"])["trial"]
    return summary


def finish(params: Params, layout: Layout, parent, study, name: str, raw_params: dict) -> dict:
    """Choose, and write and log the reports; the summary `distilflow search` prints."""
    teacher_val = float(study.user_attrs.get("teacher_val_accuracy", 0.0))
    trials = trial_rows(study, params)
    info = _info(params, name, teacher_val)
    if params.search.target == "teacher":
        summary, objective = _best_teacher(layout, name, raw_params, trials, info), None
    else:
        summary, objective = _choose(params, layout, study, name, trials, info), params.select.objective
    write_text(search_markdown(info, trials, list(params.search.space), objective), layout.search_report)
    write_json({"info": info, "trials": trials, **summary}, layout.search_json)
    for path in (layout.search_report, layout.search_json, layout.search_plot, layout.searched_params):
        if path.exists():
            parent.log_artifact(path)
    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "failed")}
    parent.log_metrics({f"trials.{k}": v for k, v in counts.items()})
    if "best" in summary:
        parent.log_metrics({"best.val_accuracy": summary["best"]["objective"]["val_accuracy"]})
    return {"trials": trials, **summary}


def registration(params: Params, layout: Layout, parent, study, name: str, summary: dict, lineage: dict, raw: dict):
    """(params, layout, lineage) to register a student search's pick with; NotRegistered when nothing ships."""
    choice = summary["choice"]
    if choice["pick"] is None:
        parent.set_tags({"registration": "refused", "selection.reason": choice["reason"][:4000]})
        raise NotRegistered(f"search {name}: nothing registered: {choice['reason']}")
    number = summary["pick_trial"]
    values = dict(study.trials[number].params)
    header = (
        f"written by `distilflow search` (study {name}, trial {number}: the registered pick); "
        f"run it with: python -m distilflow run --params {SEARCHED}"
    )
    write_text(searched_params(raw, values, header), layout.searched_params)
    parent.log_artifact(layout.searched_params)
    pick = choice["pick"]
    parent.log_metrics({f"product.{k}": pick[k] for k in ("val_accuracy", "latency_b1_ms", "size_bytes")})
    parent.log_metrics({"product.test_accuracy": pick["test_accuracy"]})
    # the raw data by absolute path: registration reads an example row from it, and the trial folder is elsewhere
    tparams = trial_params(params, values).with_values({"data.source": str(layout.resolve(params.data.source))})
    tlayout = Layout(layout.trial(name, number))
    _own_selection(tlayout, choice, number)
    for extra in (layout.search_report, layout.search_plot):
        shutil.copy2(extra, tlayout.reports / extra.name)
    tlineage = {"search.study": name, "search.trial": str(number), "search.trials": str(len(summary["trials"]))}
    return tparams, tlayout, {**lineage, **tlineage, "search.report": PATHS["search_report"]}


def _own_selection(tlayout: Layout, choice: dict, number: int) -> None:
    """The trial's selection.json, saying the search's pick and why (registration reads it from there)."""
    own = read_json(tlayout.selection)
    local = choice["pick"]["variant"].removeprefix(f"trial {number}: ")
    verdict = next(v for v in own["verdicts"] if v["variant"] == local)
    own |= {"pick": verdict, "reason": choice["reason"], "search_policy": choice["policy"]}
    write_json(own, tlayout.selection)
