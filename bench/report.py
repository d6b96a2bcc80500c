"""The results files: `bench/results/<date>-<host>.json` (everything) and `.md` (what a person reads)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "×":
        return f"{value:.2f}×"
    if unit == "pts":
        return f"{value:.2f} pts"
    if unit == "s":
        return f"{value:.1f} s"
    return f"{value:.3g}"


def _ms(t: dict) -> str:
    return f"{t['median']:.3f} ({t['min']:.3f}–{t['max']:.3f})"


def targets_table(targets: list[dict]) -> list[str]:
    lines = ["| target | measured | goal | verdict |", "|---|---:|---:|---|"]
    for t in targets:
        goal = f"{t['op'].replace('>=', '≥').replace('<=', '≤')} {_fmt(t['target'], t['unit'])}"
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(
            f"| {t['what']}{note} | {_fmt(t['measured'], t['unit'])} | {goal} | "
            f"{'✅' if t['passed'] else '❌'} {t['by']} |"
        )
    return lines


def _compression(sec: dict) -> list[str]:
    lines = []
    for s in sec["settings"]:
        earlier = (
            f"; measured by `{s['command']}` on {s.get('measured_on', 'an earlier day')}" if s.get("command") else ""
        )
        lines += [
            "",
            f"**{s['setting']}** ({s['description']}; {s['test_rows']} test rows, {s['threads']} threads{earlier})",
            "",
            "| variant | accuracy | size (KB) | parameters | b1 ms median (min–max) | b256 ms median (min–max) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for v in s["variants"]:
            params = f"{v['parameters']:,}" if v.get("parameters") else "n/a"
            lines.append(
                f"| {v['variant']} | {v['accuracy']:.4f} | {v['file_bytes'] / 1024:.1f} | {params} | "
                f"{_ms(v['latency_b1_ms'])} | {_ms(v['latency_b256_ms'])} |"
            )
        if s.get("compile_error"):
            lines.append(f"\ntorch.compile unavailable: {s['compile_error']}")
        if s.get("quantize"):
            lines.append(f"\nint8 remedy: `{s['quantize']['remedy']}` ({s['quantize']['reason']})")
    for name, error in sec.get("errors", {}).items():
        lines += ["", f"**{name}** failed: {error}"]
    return lines


def _quality(sec: dict) -> list[str]:
    lines = [
        "",
        sec["setting"],
        "",
        "| labels/class | teacher pretrained | teacher scratch | transfer gain | student KD | "
        "student no KD | KD gain | int8 student | int8 drop | KD closes gap |",
        "|---:|" + "---:|" * 9,
    ]
    pct = lambda s: f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"  # noqa: E731
    for budget, s in sec["summary"].items():
        lines.append(
            f"| {budget} | {pct(s['teacher_pretrained'])} | {pct(s['teacher_scratch'])} | "
            f"{pct(s['transfer_gain'])} | {pct(s['student_kd'])} | {pct(s['student_no_kd'])} | "
            f"{pct(s['kd_gain'])} | {pct(s['student_int8'])} | {pct(s['int8_drop'])} | "
            f"{s['kd_closes_gap']:.0%} |"
        )
    h = sec["hinton_2015"]
    lines += [
        "",
        "Accuracies in % (mean ± std over seeds). *KD closes gap* = (no-KD errors − KD errors) / (no-KD errors "
        f"− teacher errors). Hinton et al. 2015 (MNIST, 10k test): {h['student_errors_without_kd']} → "
        f"{h['student_errors_with_kd']} errors with KD against the teacher's {h['teacher_errors']}, i.e. KD "
        f"closes {h['kd_closes_gap']:.0%} of the gap.",
    ]
    for budget, s in sec["summary"].items():
        e = s["errors_mean"]
        lines.append(
            f"- {budget} labels/class, mean test errors of 1,000: student without KD "
            f"{e['student_no_kd']:.0f} → with KD {e['student_kd']:.0f}, teacher {e['teacher_pretrained']:.0f}."
        )
    return lines


def _orchestration(sec: dict) -> list[str]:
    lines = [
        "",
        sec["setting"],
        "",
        f"Plain functions {sec['plain_wall_s']['median']:.1f} s (min {sec['plain_wall_s']['min']:.1f}, max "
        f"{sec['plain_wall_s']['max']:.1f}); Prefect + MLflow {sec['prefect_wall_s']['median']:.1f} s (min "
        f"{sec['prefect_wall_s']['min']:.1f}, max {sec['prefect_wall_s']['max']:.1f}); n = "
        f"{sec['plain_wall_s']['n']} each, alternating; CPU-time ratio (child processes and the API "
        f"server they start) {sec['overhead_ratio_cpu']['median']:.2f}×. A new Prefect home's first start (database "
        f"migration, once per machine): {sec['prefect_home_first_start_s']:.1f} s.",
        "",
        f"Where the extra seconds of one cold Prefect run go, against the plain run of the same pair (pair "
        f"{sec.get('breakdown_pair', '?')}, the one whose stage compute agreed best; each part is timed in the "
        "run itself, so it does not depend on the other run's noise):",
        "",
        "| part | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in sec["breakdown_s"].items()]
    runs = sec["runs"]
    lines += ["", "| run | wall s | CPU s | stages run |", "|---|---:|---:|---|"]
    for label, key in (
        ("cold (fresh project)", None),
        ("warm, nothing changed", "prefect_warm"),
        ("one param changed (distill.temperature)", "prefect_param_change"),
        ("warm, on an already running Prefect server", "prefect_warm_running_server"),
    ):
        r = (
            runs["prefect_cold"][sec.get("breakdown_pair", len(runs["prefect_cold"])) - 1]
            if key is None
            else runs.get(key)
        )
        if r:
            ran = [k for k, v in r["stages"].items() if v == "ran"]
            lines.append(
                f"| {label} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {', '.join(ran) or 'none (all cached)'} |"
            )
    if runs.get("cli_warm"):
        c = runs["cli_warm"]
        lines.append(
            f"| warm, `distilflow run` (up-to-date check, before Prefect starts) | {c['wall_s']:.2f} | "
            f"{c['cpu_s']:.2f} | none (nothing changed since the last complete run) |"
        )
    return lines


def _data(sec: dict) -> list[str]:
    lines = [
        "",
        sec["setting"],
        "",
        "| rows | table MiB | clean s | split s | normalize s | total s median (min–max) | "
        "µs/row | peak extra MiB | peak / table |",
        "|---:|" + "---:|" * 8,
    ]
    for r in sec["sizes"]:
        s = r["seconds"]
        lines.append(
            f"| {r['rows']:,} | {r['table_bytes'] / 2**20:.0f} | {s['clean']['median']:.2f} | "
            f"{s['split']['median']:.2f} | {s['normalize']['median']:.2f} | {s['total']['median']:.2f} "
            f"({s['total']['min']:.2f}–{s['total']['max']:.2f}) | {r['us_per_row']:.1f} | "
            f"{r['peak_extra_bytes'] / 2**20:.0f} | {r['peak_over_table']:.2f}× |"
        )
    return lines


def _training(sec: dict) -> list[str]:
    lines = [
        "",
        sec["setting"] + ".",
        "",
        "| model | parameters | bare loop samples/s | bare loop + validation "
        "samples/s | fit loop samples/s | fit end-to-end samples/s | loop ratio (min–max) | end-to-end ratio "
        "(min–max) | end-to-end, CPU time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rng = lambda r: f"{r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f})"  # noqa: E731
    for m in sec["models"]:
        s = m["samples_per_s"]
        cpu = m.get("ratio_end_to_end_cpu")
        bare_val = s.get("bare loop + validation")
        lines.append(
            f"| {m['model']} | {m['parameters']:,} | {s['bare loop']['median']:.0f} | "
            f"{bare_val['median'] if bare_val else float('nan'):.0f} | "
            f"{s['fit loop']['median']:.0f} | {s['fit end-to-end']['median']:.0f} | "
            f"{rng(m['ratio_loop'])} | {rng(m['ratio_end_to_end'])} | {rng(cpu) if cpu else 'n/a'} |"
        )
    lines.append(
        "\nLoop ratio: fit's own per-epoch training samples/s against the bare training loop. End-to-end "
        "ratio: the whole fit() call (validation, best weights, history included) against the bare loop "
        "that also runs the same per-epoch validation forward pass."
    )
    if sec.get("ddp"):
        d = sec["ddp"]
        lines.append(
            f"\nData-parallel (`train.devices: 2`, {d['note']}): per-epoch samples/s {rng(d['epoch_ratio'])}× of one "
            f"process; wall time including process start and rendezvous {rng(d['wall_ratio'])}×."
        )
    lines.append(f"\nCUDA: {sec['cuda']}.")
    return lines


def _serving(sec: dict) -> list[str]:
    lines = ["", sec["setting"] + ".", "", "| contender | median ms | min ms | max ms |", "|---|---:|---:|---:|"]
    for name, t in sec["latency_ms"].items():
        lines.append(f"| {name} | {t['median']:.3f} | {t['min']:.3f} | {t['max']:.3f} |")
    s = sec["score_5_rows_s"]
    lines.append(
        f"\n`distilflow score` on 5 rows, a fresh process each time: {s['median']:.2f} s median "
        f"({s['min']:.2f}–{s['max']:.2f} s)."
    )
    return lines


def _transfer_row(r: dict) -> str:
    t, kd, pick = r["transfer"], r["kd_gain"], r["selection"]["pick"]
    gains = " / ".join(f"{100 * t[b]['gain']:+.2f}" for b in ("5", "20") if b in t) or "–"
    kd5 = f"{100 * kd['5']['gain']:+.2f}" if "5" in kd else "–"
    product = f"{pick['variant']} {100 * pick['test_accuracy']:.2f}" if pick else "nothing shipped"
    return (
        f"| {r['seed']} | {100 * r['teacher_test_accuracy']:.2f} | {gains} | {100 * kd['all']['kd']:.2f} / "
        f"{100 * kd['all']['no_kd']:.2f} ({100 * kd['all']['gain']:+.2f}) | {kd5} | {product} |"
    )


def _transfer(sec: dict) -> list[str]:
    lines = []
    for setting, body in sec["settings"].items():
        lines += [
            "",
            f"**{setting}**",
            "",
            "| seed | teacher test % | transfer gain 5 / 20 per class (pts) | KD / no-KD, all labels % (gain) | "
            "KD gain 5/class (pts) | shipped, test % |",
            "|---:|---:|---:|---:|---:|---|",
            *(_transfer_row(r) for r in body["runs"]),
        ]
    return lines + [
        "",
        "One test row of digits is 0.37 points, one of MNIST 0.1: a seed's all-label gain is a few rows.",
    ]


SECTIONS = {
    "compression": ("1. Compression", _compression),
    "quality": ("2. Quality at low label budgets", _quality),
    "orchestration": ("3–4. Orchestration overhead and caching", _orchestration),
    "data_scale": ("5. Data stages at scale", _data),
    "training": ("6. Training throughput", _training),
    "serving": ("7. Serving latency and start-up", _serving),
    "transfer": ("8. Real transfer: the ImageNet teacher, KD and the product, 3 seeds", _transfer),
}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"# distilflow benchmarks, {results['date']} on {m['host']}",
        "",
        f"Machine: {m['cpu']}, {m['cpus_usable']} usable CPU cores (os.cpu_count {m['cpu_count']}), "
        f"{m['memory_gb']} GB RAM, {m['platform']}; Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), onnxruntime {m.get('onnxruntime', 'n/a')}; GPU: "
        f"{m['cuda'] or 'none in this session (CUDA path not measured)'}.",
        "",
        f"Command: `{results['command']}` ({results['seconds']:.0f} s). Timings are medians after warm-up with "
        "min–max; each comparison is measured side by side in one process or one run.",
        "",
    ]
    if results["scale_notes"]:
        lines += ["Scale: " + "; ".join(results["scale_notes"]) + ".", ""]
    passed = sum(t["passed"] for t in results["targets"])
    lines += [f"## Targets: {passed} of {len(results['targets'])} met", ""] + targets_table(results["targets"])
    for key, (title, render) in SECTIONS.items():
        if key in results["benchmarks"]:
            sec = results["benchmarks"][key]
            lines += ["", f"## {title}"]
            if sec.get("command"):  # carried over from an earlier run by --merge
                lines += [
                    "",
                    f"_Measured by an earlier run on {sec.get('measured_on', 'an earlier day')}: `{sec['command']}`._",
                ]
            lines += render(sec)
    if results.get("errors"):
        lines += ["", "## Benchmarks that failed", ""] + [f"- {k}: {v}" for k, v in results["errors"].items()]
    return "\n".join(lines) + "\n"


def _stem(results: dict) -> str:
    return f"{results['date']}-{results['machine']['host']}"


def merge_previous(results: dict, out_dir: Path) -> None:
    """Carry over the families this run did not measure from the newest earlier file of this host.

    Each carried-over section keeps the command and the date that measured it, and the report says so.
    """
    path = out_dir / f"{_stem(results)}.json"
    if not path.is_file():
        earlier = sorted(out_dir.glob(f"*-{results['machine']['host']}.json"))
        if not earlier:
            return
        path = earlier[-1]
    previous = json.loads(path.read_text())

    def carried(section: dict) -> dict:
        return {"command": previous["command"], "measured_on": previous["date"]} | section

    for name, section in previous["benchmarks"].items():
        if name == "compression" and name in results["benchmarks"]:  # settings this run did not measure
            now = results["benchmarks"][name]
            have = {s["setting"] for s in now["settings"]}
            for old in section["settings"]:
                if old["setting"] not in have:
                    now["settings"].append(carried(old))
            now["targets"] = [t for s in now["settings"] for t in s["targets"]]
        elif name not in results["benchmarks"] and name not in results["errors"]:
            results["benchmarks"][name] = carried(section)
    results["targets"] = [t for sec in results["benchmarks"].values() for t in sec["targets"]]
    results["scale_notes"] = sorted(set(results["scale_notes"]) | set(previous.get("scale_notes", [])))


def write(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(results)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2, default=str, allow_nan=True) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path
