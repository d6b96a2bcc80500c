"""What a search leaves for review: reports/search.md, the Pareto plot, and a params file a normal run can use."""

from __future__ import annotations

from pathlib import Path

import yaml

from tasks.search.front import OBJECTIVE_FIELD, pareto_mask


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_table(trials: list[dict], space_keys: list[str], objective: str | None) -> str:
    """One row per trial: its values, state, and (completed) its candidate's validation figures."""
    cost_field = OBJECTIVE_FIELD.get(objective or "", None)
    head = ["trial", "state", *space_keys, "val accuracy"]
    if cost_field:
        head += [objective, "size (KB)", "candidate", "feasible", "front"]
    head += ["seconds", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sorted(trials, key=lambda t: t["number"]):
        o = t.get("objective") or {}
        row = [str(t["number"]), t["state"], *(_fmt(t["values"].get(k, "")) for k in space_keys)]
        row.append(f"{o['val_accuracy']:.4f}" if "val_accuracy" in o else "")
        if cost_field:
            row += [
                _fmt(o[cost_field]) if cost_field in o else "",
                f"{o['size_bytes'] / 1024:.1f}" if "size_bytes" in o else "",
                str(o.get("variant", "")),
                ("yes" if o.get("feasible") else "no") if o else "",
                "yes" if t.get("front") else "",
            ]
        row += [f"{t.get('seconds', 0):.1f}", str(t.get("note", "")).replace("|", "/")[:160]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def search_markdown(info: dict, trials: list[dict], space_keys: list[str], objective: str | None) -> str:
    """reports/search.md: how the study was set up, the pick and why, and every trial."""
    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "failed")}
    lines = [
        f"# Search: {info['study']}",
        "",
        f"Target **{info['target']}**; {info['objectives_text']}; sampler {info['sampler']} (seed {info['seed']}), "
        f"pruner {info['pruner']}; runner {info['runner']} with {info['workers']} trial(s) in flight, "
        f"{info['threads']} thread(s) each.",
        "",
        f"Trials: {len(trials)} ({counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed); "
        f"teacher validation accuracy {info['teacher_val_accuracy']:.4f}.",
        "",
        "## Pick",
        "",
        info["pick_text"],
        "",
    ]
    if info.get("plot"):
        lines += [f"![accuracy vs latency of every trial]({info['plot']})", ""]
    if info.get("reevaluated"):
        lines += [
            "Latency and size in the trials table were measured inside each trial, beside the other trials "
            f"in flight; trials {', '.join(map(str, info['reevaluated']))} were re-measured one at a time "
            f"({info['eval_threads']} threads, {info['eval_repeats']} repeats) before the pick.",
            "",
        ]
    lines += ["## Trials", "", trials_table(trials, space_keys, objective)]
    return "\n".join(lines)


def search_plot(trials: list[dict], path: str | Path, threads: int) -> Path | None:
    """Validation accuracy vs batch-1 latency of every completed trial's candidate, bubble = size, front joined."""
    from tasks.plots import accuracy_latency_plot

    done = [t for t in sorted(trials, key=lambda t: t["number"]) if t["state"] == "complete" and t.get("objective")]
    if not done:
        return None
    acc = [t["objective"]["val_accuracy"] for t in done]
    lat = [t["objective"]["latency_b1_ms"] for t in done]
    return accuracy_latency_plot(
        names=[f"trial {t['number']}: {t['objective']['variant']}" for t in done],
        latency_ms=lat,
        accuracy=acc,
        size_bytes=[t["objective"]["size_bytes"] for t in done],
        front=pareto_mask(acc, lat),
        path=path,
        title="search: each trial's candidate, validation accuracy vs latency (bubble = size)",
        xlabel=f"CPU latency, batch 1, median (ms, {threads} thread(s), measured in the trial)",
        ylabel="validation accuracy",
    )


def searched_params(raw: dict, values: dict, header: str) -> str:
    """The project's params file with the chosen trial's values set: YAML a normal run takes (`--params`)."""
    tree = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    body = yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body
