"""The model registry: registration, promotion gates, rollback and the audit trail.

Aliases, not stages. A new version of the int8 product gets `challenger`;
`promote` compares it with `champion` on the same frozen test split and, if
every gate passes, moves `champion` to it and keeps the old one as
`previous-champion`; `rollback` restores `previous-champion`. Each decision
is written as tags on the version and as one run in the experiment
`distilflow-registry-audit` (who, when, what, why), which `audit_trail` lists
and the MLflow UI shows.

Plain functions over a `Tracker`; the Prefect wrappers and the lock that keeps
two promotions of one model apart live in flows/registry.py.
"""

from __future__ import annotations

import getpass
import json
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from distilflow.errors import DistilflowError
from distilflow.hashing import frame_hash, path_hash
from distilflow.io import read_table
from distilflow.params import GateParams

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous-champion"
AUDIT_EXPERIMENT = "distilflow-registry-audit"
PROJECT = Path(__file__).resolve().parents[1]
# What the served model imports (tasks/serving.py and what it loads), pinned to this environment's versions.
SERVING_PACKAGES = ("mlflow", "numpy", "pandas", "torch", "onnxruntime", "safetensors", "pydantic", "pyyaml")


class NoChallenger(DistilflowError):
    """Nothing to promote: an error for a person asking to promote, a quiet night for the schedule."""


class UnknownModel(DistilflowError):
    """No registered model of that name: a typo for a person, a pipeline that has not registered yet for the schedule."""


@dataclass
class Variant:
    """One model to register: where its classifier lives and its row of the evaluation table."""

    model_name: str
    classifier: Path  # a torch model folder, an ONNX file or a TorchScript file
    metrics: dict     # the evaluation harness's row (tasks/evaluate.py:evaluate_variant)
    role: str         # "product" (gets the challenger alias) or "reference"


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for pkg in SERVING_PACKAGES:
        try:
            pins.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return pins


def headline(row: dict) -> dict[str, str]:
    """The metrics every registered version carries as tags (and promotion reads)."""
    return {"test_accuracy": f"{row['accuracy']:.6f}", "size_bytes": str(int(row["file_bytes"])),
            "latency_b1_ms": f"{row['latency_b1_median_ms']:.4f}", "latency_b256_ms": f"{row['latency_b256_median_ms']:.4f}",
            "parameters": str(row.get("parameters") or "n/a")}


def _context(artifacts: dict):
    return type("Context", (), {"artifacts": artifacts})()


def save_served_model(classifier: Path, preprocessor: Path, input_example: pd.DataFrame, out: Path,
                      card: str | None = None) -> Path:
    """Write the pyfunc (classifier + preprocessing + code + pinned requirements) to `out`.

    The signature is inferred from a real prediction on the input example, so
    it states the raw columns the model takes and the columns it returns.
    """
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    from tasks.serving import ClassifierModel

    artifacts = {"classifier": str(classifier), "preprocessor": str(preprocessor)}
    model = ClassifierModel()
    model.load_context(_context(artifacts))
    with warnings.catch_warnings():  # integer columns are the raw data's own; NaN there is refused clearly (conform_to_schema)
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(input_example, model.predict(None, input_example))
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)  # its note on pickled models: ours is our own class, loaded by reference
    try:
        mlflow.pyfunc.save_model(path=str(out), python_model=ClassifierModel(), artifacts=artifacts,
                                 signature=signature, input_example=input_example, pip_requirements=pip_requirements(),
                                 code_paths=[str(PROJECT / "tasks"), str(PROJECT / "distilflow")])
    finally:
        pyfunc_log.setLevel(level)
    if card:
        (out / "model_card.md").write_text(card)
    return out


def version_by_alias(client, name: str, alias: str):
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


def register_variants(tracker, run, variants: list[Variant], preprocessor: Path, input_example: pd.DataFrame,
                      tags: dict[str, str], card: str) -> dict:
    """Register every variant as a new version, all or nothing; the product's version becomes `challenger`.

    Returns {"versions": {model name: version}, "product": version, "unchanged": bool}.

    A version is created only once its files are uploaded; if any step fails,
    the versions this call created are deleted again, so the registry never
    holds half of a run. An unchanged product (same int8 file and preprocessing
    as the newest version) is not registered twice: its version is returned.
    """
    from mlflow.exceptions import MlflowException

    client = tracker.client
    product = next(v for v in variants if v.role == "product")
    model_hash = path_hash(product.classifier)[:16] + path_hash(preprocessor)[:16]
    try:
        existing = client.search_model_versions(f"name = '{product.model_name}'", order_by=["version_number DESC"],
                                                max_results=1)
    except MlflowException:
        existing = []
    if existing and existing[0].tags.get("model_hash") == model_hash and \
            existing[0].tags.get("registration") == "complete":
        version = str(existing[0].version)
        return {"versions": {product.model_name: version}, "product": version, "unchanged": True}

    created: list[tuple[str, str]] = []
    new_models: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for v in variants:
                local = save_served_model(v.classifier, preprocessor, input_example, Path(tmp) / v.model_name, card)
                artifact_path = f"registered/{v.model_name}"
                run.log_artifacts(local, artifact_path)
                try:
                    client.create_registered_model(v.model_name, description="distilflow: raw feature columns in, "
                                                   "class and class probabilities out")
                    new_models.append(v.model_name)
                except MlflowException:
                    pass  # already registered
                # "pending" until every variant and the alias are in place: a version that a killed process
                # leaves behind never claims to be complete
                version_tags = {**tags, **headline(v.metrics), "role": v.role, "variant": str(v.metrics["variant"]),
                                "registration": "pending"}
                if v is product:
                    version_tags["model_hash"] = model_hash
                mv = client.create_model_version(v.model_name, f"{run.artifact_uri}/{artifact_path}", run_id=run.run_id,
                                                 tags=version_tags, description=card.split("\n## ")[0][:4000])
                created.append((v.model_name, str(mv.version)))
        versions = dict(created)
        client.set_registered_model_alias(product.model_name, CHALLENGER, versions[product.model_name])
        for name, version in created:
            client.set_model_version_tag(name, version, "registration", "complete")
        return {"versions": versions, "product": versions[product.model_name], "unchanged": False}
    except BaseException:
        _undo_registration(client, created, new_models, product.model_name)
        raise


def _undo_registration(client, created: list[tuple[str, str]], new_models: list[str], product_name: str) -> None:
    """Delete what a failed registration created; whatever cannot be deleted is tagged `registration=failed`."""
    try:  # set only if the failure came after the alias step; looked up once, not per version
        challenger = version_by_alias(client, product_name, CHALLENGER)
    except Exception:  # noqa: BLE001 - best effort, as below
        challenger = None
    for name, version in created:
        try:
            if challenger is not None and (name, version) == (product_name, str(challenger.version)):
                client.delete_registered_model_alias(product_name, CHALLENGER)
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


# ---------------------------------------------------------------------------- promotion


@dataclass
class Gate:
    name: str
    value: float | None
    threshold: float
    passed: bool
    reason: str


def check_gates(challenger: dict, champion: dict | None, gates: GateParams) -> list[Gate]:
    """Each gate with its value, threshold and verdict; the accuracy-drop gate passes trivially with no champion."""
    acc, lat, kb = challenger["accuracy"], challenger["latency_b1_ms"], challenger["size_bytes"] / 1024
    out = [Gate("min_accuracy", acc, gates.min_accuracy, acc >= gates.min_accuracy,
                f"test accuracy {acc:.4f} {'≥' if acc >= gates.min_accuracy else '<'} {gates.min_accuracy}")]
    if champion is None:
        out.append(Gate("max_accuracy_drop", None, gates.max_accuracy_drop, True, "no champion yet: first model"))
    else:
        drop = champion["accuracy"] - acc
        ok = drop <= gates.max_accuracy_drop + 1e-12
        out.append(Gate("max_accuracy_drop", drop, gates.max_accuracy_drop, ok,
                        f"drop vs champion v{champion['version']} ({champion['accuracy']:.4f}) is {drop:+.4f} "
                        f"{'≤' if ok else '>'} {gates.max_accuracy_drop}"))
    out.append(Gate("max_latency_ms", lat, gates.max_latency_ms, lat <= gates.max_latency_ms,
                    f"batch-1 latency {lat:.3f} ms {'≤' if lat <= gates.max_latency_ms else '>'} {gates.max_latency_ms} ms"))
    out.append(Gate("max_size_kb", kb, gates.max_size_kb, kb <= gates.max_size_kb,
                    f"size {kb:.1f} KB {'≤' if kb <= gates.max_size_kb else '>'} {gates.max_size_kb} KB"))
    return out


def conform_to_schema(model, frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """The model's input columns, cast to its signature's types where no value changes (5.0 → 5, 5 → 5.0).

    MLflow refuses int ↔ float conversions at serving time; raw data read by
    different tools lands on either side, so exact casts are made here and
    anything lossy is one clear error naming the column.
    """
    import numpy as np

    schema = model.metadata.get_input_schema()
    names = schema.input_names()
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise DistilflowError(f"{what} is missing the model's input columns: {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} ({len(names)} expected)")
    out = frame[names].copy()
    for name, dtype in zip(names, schema.numpy_types()):
        col = out[name]
        if col.dtype == dtype:
            continue
        try:
            cast = col.astype(dtype)
            exact = np.array_equal(cast.to_numpy(dtype=np.float64), col.to_numpy(dtype=np.float64), equal_nan=True)
        except (TypeError, ValueError):
            exact = False
        if not exact:
            raise DistilflowError(f"{what}: column {name!r} ({col.dtype}) cannot be given to the model as {dtype} "
                                  "without changing values (missing or non-integer values where the model takes integers?)")
        out[name] = cast
    return out


def score_frame(model, models_uri: str, frame: pd.DataFrame, what: str = "input") -> pd.DataFrame:
    """Predictions of a loaded registered model on raw rows (its own preprocessing applies)."""
    from mlflow.exceptions import MlflowException

    try:
        return model.predict(conform_to_schema(model, frame, what))
    except MlflowException as exc:
        raise DistilflowError(f"{models_uri} cannot score {what}: {str(exc).splitlines()[0][:300]}") from None


def test_accuracy(tracker, models_uri: str, test: pd.DataFrame) -> float:
    """Accuracy of a registered model on the raw frozen test split (label column `label`)."""
    model = tracker.load_pyfunc(models_uri)
    pred = score_frame(model, models_uri, test.drop(columns=["label"]), "the frozen test split")["prediction"]
    return float((pred.astype(str).to_numpy() == test["label"].astype(str).to_numpy()).mean())


def _record(version) -> dict:
    t = version.tags
    return {"version": str(version.version), "data_md5": t.get("data_md5"), "split_hash": t.get("split_hash.test"),
            "latency_b1_ms": float(t.get("latency_b1_ms", "inf")), "size_bytes": float(t.get("size_bytes", "inf"))}


def audit(tracker, name: str, action: str, version: str | None, details: dict[str, str], actor: str, reason: str) -> str:
    """One run in the audit experiment per promotion or rollback; returns its id."""
    tags = {"model": name, "action": action, "version": str(version), "by": actor, "reason": reason[:4000],
            **{k: str(v)[:4000] for k, v in details.items()}}
    with tracker.run(AUDIT_EXPERIMENT, f"{action} {name} v{version}",
                     tags={f"distilflow.audit.{k}": v for k, v in tags.items()}) as run:
        run.log_dict(details, "decision.json")
    return run.run_id


def promote(tracker, name: str, gates: GateParams, test_split: Path, actor: str | None = None,
            expected: str | None = None) -> dict:
    """Gate the challenger against the champion; move the aliases on a pass; record the decision either way.

    `expected` is the challenger version the caller saw before waiting for the
    lock: if another promotion decided it meanwhile, this one reports that and
    changes nothing.
    """
    from mlflow.exceptions import MlflowException

    client = tracker.client
    actor = actor or getpass.getuser()
    require_model(client, name)
    challenger = version_by_alias(client, name, CHALLENGER)
    if expected and (challenger is None or str(challenger.version) != str(expected)):
        # what this caller saw moved while it waited for the lock: report another promotion's decision; a newer
        # challenger that a registration put there meanwhile is gated as usual
        try:
            done = client.get_model_version(name, expected)
        except MlflowException:
            done = None
        if done is not None and "promotion.decision" in done.tags:
            raise DistilflowError(
                f"challenger version {expected} of {name} was already decided by another promotion "
                f"({done.tags['promotion.decision']} by {done.tags.get('promotion.by')} at "
                f"{done.tags.get('promotion.at')}); nothing changed")
    if challenger is None:
        raise NoChallenger(f"{name} has no '{CHALLENGER}' version to promote: run the pipeline first "
                           f"(it registers each new model as @{CHALLENGER})")
    if challenger.tags.get("registration", "complete") != "complete":
        raise DistilflowError(f"challenger v{challenger.version} of {name} is marked registration="
                              f"{challenger.tags['registration']}: its registration did not finish; run the pipeline "
                              "again to register a complete version; nothing changed")
    champion = version_by_alias(client, name, CHAMPION)
    chal = _record(challenger)
    champ = _record(champion) if champion is not None else None
    if champ and (champ["data_md5"], champ["split_hash"]) != (chal["data_md5"], chal["split_hash"]):
        raise DistilflowError(
            f"challenger v{chal['version']} of {name} was evaluated on other data than champion v{champ['version']} "
            f"(data md5 {chal['data_md5']} vs {champ['data_md5']}, test split {chal['split_hash']} vs "
            f"{champ['split_hash']}): their accuracies are not comparable; nothing changed")
    if not Path(test_split).is_file():
        raise DistilflowError(f"frozen test split {test_split} not found: run the pipeline's data stages first")
    test = read_table(test_split)
    if frame_hash(test) != chal["split_hash"]:
        raise DistilflowError(f"the local test split {test_split} (hash {frame_hash(test)}) is not the one challenger "
                              f"v{chal['version']} was evaluated on ({chal['split_hash']}); nothing changed")

    chal["accuracy"] = test_accuracy(tracker, f"models:/{name}/{chal['version']}", test)
    if champ:
        champ["accuracy"] = test_accuracy(tracker, f"models:/{name}/{champ['version']}", test)
    results = check_gates(chal, champ, gates)
    passed = all(g.passed for g in results)
    decision = "promoted" if passed else "rejected"
    reasons = "; ".join(g.reason for g in results if not g.passed) or "all gates passed"
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    version = chal["version"]

    tags = {"promotion.decision": decision, "promotion.by": actor, "promotion.at": at,
            "promotion.reasons": reasons, "promotion.against": champ["version"] if champ else "none"}
    for g in results:
        tags |= {f"promotion.gate.{g.name}.value": "n/a" if g.value is None else f"{g.value:.6g}",
                 f"promotion.gate.{g.name}.threshold": f"{g.threshold:g}",
                 f"promotion.gate.{g.name}.passed": str(g.passed).lower()}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if passed:
        if champ:
            client.set_registered_model_alias(name, PREVIOUS, champ["version"])
        client.set_registered_model_alias(name, CHAMPION, version)
    client.delete_registered_model_alias(name, CHALLENGER)
    details = {"decision": decision, "from_version": champ["version"] if champ else "none", "at": at,
               "gates": json.dumps([asdict(g) for g in results])}
    audit(tracker, name, "promote", version, details, actor, reasons)
    return {"model": name, "version": version, "decision": decision, "reasons": reasons,
            "champion": version if passed else (champ["version"] if champ else None),
            "gates": [asdict(g) for g in results]}


def rollback(tracker, name: str, actor: str | None = None, reason: str = "rollback requested") -> dict:
    """`champion` back to `previous-champion`; the demoted version is tagged with who, when and why."""
    client = tracker.client
    actor = actor or getpass.getuser()
    require_model(client, name)
    previous = version_by_alias(client, name, PREVIOUS)
    if previous is None:
        raise DistilflowError(f"{name} has no '{PREVIOUS}' version to roll back to; nothing changed")
    current = version_by_alias(client, name, CHAMPION)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if current is not None:
        for k, v in {"rollback.by": actor, "rollback.at": at, "rollback.reason": reason}.items():
            client.set_model_version_tag(name, current.version, k, v)
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    client.delete_registered_model_alias(name, PREVIOUS)
    old = str(current.version) if current is not None else "none"
    audit(tracker, name, "rollback", str(previous.version), {"from_version": old, "at": at}, actor, reason)
    return {"model": name, "champion": str(previous.version), "demoted": old}


def audit_trail(tracker, name: str | None = None) -> list[dict]:
    """Every promotion and rollback, oldest first: when, who, what, which versions, why."""
    exp = tracker.client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if exp is None:
        return []
    flt = f"tags.`distilflow.audit.model` = '{name}'" if name else ""
    runs = tracker.client.search_runs([exp.experiment_id], flt, order_by=["attributes.start_time ASC"], max_results=1000)
    rows = []
    for r in runs:
        t = {k.removeprefix("distilflow.audit."): v for k, v in r.data.tags.items() if k.startswith("distilflow.audit.")}
        rows.append({"at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.info.start_time / 1000)),
                     "model": t.get("model"), "action": t.get("action"), "version": t.get("version"),
                     "from_version": t.get("from_version"), "decision": t.get("decision", ""),
                     "by": t.get("by"), "reason": t.get("reason"), "run_id": r.info.run_id})
    return rows


def score_csv(tracker, models_uri: str, source: Path, out: Path) -> dict:
    """Batch scoring: the CSV's rows through a registered model; predictions (and id columns) to `out`."""
    from distilflow.io import atomic_path

    source = Path(source)
    if not source.is_file():
        raise DistilflowError(f"input to score not found: {source}")
    try:
        frame = pd.read_csv(source)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DistilflowError(f"{source} is not a readable CSV: {str(exc).splitlines()[0]}") from None
    if frame.empty:
        raise DistilflowError(f"{source} has no rows to score")
    model = tracker.load_pyfunc(models_uri)
    pred = score_frame(model, models_uri, frame, str(source))
    inputs = set(model.metadata.get_input_schema().input_names())
    kept = frame[[c for c in frame.columns if c not in inputs]].reset_index(drop=True)
    result = pd.concat([kept, pred.reset_index(drop=True)], axis=1)
    with atomic_path(out) as tmp:
        result.to_csv(tmp, index=False)
    return {"rows": len(result), "output": str(out), "model": models_uri}


# ---------------------------------------------------------------------------- model card


def model_card(name: str, params, lineage: dict[str, str], cleaning: dict, split: dict, table: list[dict],
               recipe: str, quantize_note: str) -> str:
    """The markdown a reviewer reads in the MLflow UI before promoting."""
    from tasks.data import cleaning_table

    product = next((r for r in table if r["variant"] == "student int8"), table[-1])
    n_classes = len(split["class_counts"]["train"])
    teacher = next((r for r in table if r["variant"] == "teacher fp32"), table[0])
    lines = [f"# {name}", "",
             f"{'Image' if params.data.image_shape else 'Tabular'} classifier ({product['variant']}) distilled from a "
             f"fine-tuned teacher by distilflow. Test accuracy "
             f"{product['accuracy']:.4f} (teacher {teacher['accuracy']:.4f}), {product['file_bytes'] / 1024:.1f} KB, "
             f"{product['latency_b1_median_ms']:.3f} ms per row on CPU. Takes the raw feature columns as a DataFrame; "
             "returns `prediction` and one `prob_<class>` column per class.", "",
             "## Data", "",
             f"- source: `{params.data.source}` (md5 `{lineage.get('data_md5')}`, DVC-tracked)",
             f"- classes: {', '.join(map(str, params.data.classes or []))}" if params.data.classes else "- classes: as found",
             f"- splits (stratified, content-addressed; test frozen): "
             + ", ".join(f"{k} {v} rows (`{split['hashes'][k]}`)" for k, v in split["sizes"].items()),
             f"- git commit `{lineage.get('git_commit')}`, params hash `{lineage.get('params_hash')}`", "",
             "## Cleaning", "", cleaning_table(cleaning),
             "## Metrics of every variant (frozen test split)", "",
             "| variant | accuracy | macro-F1 | size (KB) | latency b1 (ms) | latency b256 (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['variant']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['file_bytes'] / 1024:.1f} | "
                     f"{r['latency_b1_median_ms']:.3f} | {r['latency_b256_median_ms']:.2f} |")
    threads = table[0].get("threads")
    lines += ["", f"Latency: median after warm-up, CPU, {threads} thread(s).", "",
              "## Compression steps", "", f"{recipe}", "", f"int8: {quantize_note}", "",
              "## Intended use and limits", "",
              f"- For inputs like the training data: {n_classes} classes, the same feature columns"
              + (f", values in [{params.data.value_range[0]:g}, {params.data.value_range[1]:g}]" if params.data.value_range else "")
              + ". Values outside that range are not clipped at serving time; missing values are imputed with the "
              "train median.",
              "- Accuracy is measured on one frozen test split from the same distribution; it says nothing about "
              "shifted data. Check per-class recall in the compression report before relying on rare classes.",
              "- Latency is this machine's; measure on yours. The student trades accuracy for size and speed: "
              "use the registered teacher where the difference matters.",
              "- Not for decisions about people without a separate fairness review."]
    return "\n".join(lines) + "\n"


def recipe(params) -> str:
    """The compression recipe in one line (also a version tag)."""
    d, q = params.distill, params.quantize
    steps = [f"KD (T={d.temperature}, alpha={d.alpha}{f', hint {d.hint_weight}' if d.hint_weight else ''}) "
             f"into a {d.student} student {d.student_width}x{d.student_depth}"]
    if params.prune.enabled:
        steps.append(f"{params.prune.method} pruning {params.prune.sparsity:.0%}")
    if q.enabled:
        steps.append(f"int8 {q.backend} ({q.calibration_method} calibration, "
                     f"{'per-channel' if q.per_channel else 'per-tensor'}, budget {q.max_accuracy_drop})")
    return " → ".join(steps)



# ---------------------------------------------------------------------------- the pipeline's registration step


def pipeline_variants(params, layout, table: list[dict]) -> list[Variant]:
    """The product (the end of the compression chain) plus the fp32 teacher and student for reference."""
    rows = {r["variant"]: r for r in table}
    name = params.registered_model()
    if params.quantize.enabled:
        product = (layout.int8("student", params.quantize.backend), rows["student int8"])
    elif params.prune.enabled:
        product = (layout.student_pruned, rows["student pruned fp32"])
    else:
        product = (layout.student, rows["student fp32 (KD)"])
    return [Variant(name, product[0], product[1], "product"),
            Variant(f"{name}-teacher", layout.teacher, rows["teacher fp32"], "reference"),
            Variant(f"{name}-student", layout.student, rows["student fp32 (KD)"], "reference")]


def raw_example(source: Path, test_split: Path, columns: list[str], rows: int = 5) -> pd.DataFrame:
    """Test rows in the column types of the user's raw table (ints for 8-bit pixels in a CSV), else floats.

    The signature is inferred from this example, and MLflow refuses int64 ↔
    float64 conversions at serving time, so the types must be the raw data's:
    ingestion turns every feature into a float, hence the look at the source.
    """
    example = read_table(test_split).head(rows)[columns]
    source = Path(source)
    try:
        if source.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            raw = {f.name: f.type.to_pandas_dtype() for f in pq.read_schema(source) if f.name in columns}
        else:
            head = pd.read_csv(source, nrows=1000)
            raw = {c: head[c].dtype for c in columns if c in head.columns}
        if len(raw) == len(columns) and all(pd.api.types.is_numeric_dtype(t) for t in raw.values()):
            return example.astype(raw)
    except (OSError, ValueError, TypeError, pd.errors.ParserError):
        pass  # an image manifest, or a table we cannot sample: floats
    return example.astype("float64")


def register_stage(tracker, run, params, layout, lineage: dict[str, str], table: list[dict],
                   quantize_note: str) -> dict:
    """Build the card and tags from the run's own reports, then register all variants (all or nothing)."""
    from distilflow.io import read_json, write_text

    split = read_json(layout.split_report)
    card = model_card(params.registered_model(), params, lineage, read_json(layout.cleaning_report), split, table,
                      recipe(params), quantize_note)
    write_text(card, layout.model_card)
    run.log_artifact(layout.model_card)
    pre = read_json(layout.preprocessor)
    example = raw_example(layout.resolve(params.data.source), layout.split("test"), pre["feature_columns"])
    tags = {**lineage, **{f"split_hash.{k}": v for k, v in split["hashes"].items()},
            "parent_run_id": lineage.get("parent_run_id", ""), "compression_recipe": recipe(params),
            "dataset": params.data.dataset_name}
    registered = register_variants(tracker, run, pipeline_variants(params, layout, table), layout.preprocessor,
                                   example, tags, card)
    return {**registered, "model": params.registered_model(), "card": str(layout.model_card)}


from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

# Registration is never cached: each run decides afresh (an unchanged model is detected by content, above).
register_task = task(name="register", cache_policy=NO_CACHE)(register_stage)
