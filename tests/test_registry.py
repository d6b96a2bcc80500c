"""Registration, promotion gates, rollback, audit trail, batch scoring: real MLflow stores, real models.

One pipeline run (the session's `trained` project) provides the models; each
test that changes a registry gets a fresh SQLite store of its own.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from distilflow.errors import DistilflowError
from distilflow.io import read_json
from distilflow.layout import Layout
from distilflow.params import GateParams
from distilflow.tracking import Tracker
from tasks.registry import CHALLENGER, CHAMPION, PREVIOUS, packaging, promotion, registration, scoring
from tasks.registry.registration import Variant
from tests.conftest import REPO

pytestmark = pytest.mark.slow
NAME = "distilflow-digits"
LENIENT = GateParams(min_accuracy=0.5, max_accuracy_drop=0.5, max_latency_ms=1000, max_size_kb=1e6)


def rows(trained) -> dict:
    return {r["variant"]: r for r in trained["summary"]["compression"]}


def base_tags(trained) -> dict:
    mv = MlflowClient(trained["uri"]).get_model_version_by_alias(NAME, CHALLENGER)
    return {k: v for k, v in mv.tags.items() if k not in ("model_hash", "role", "variant", "registration")}


def fresh(tmp_path) -> Tracker:
    return Tracker(Layout(tmp_path).tracking_uri(), tmp_path)


def register(
    tracker, trained, classifier, row: str = "student int8", tags: dict | None = None, name: str = NAME
) -> str:
    """One product version in `tracker`'s store, as the pipeline registers it."""
    layout = Layout(trained["root"])
    pre = read_json(layout.preprocessor)
    example = packaging.raw_example(layout.root / "data/raw/digits.csv", layout.split("test"), pre["feature_columns"])
    with tracker.run("distilflow-test", "register") as run:
        registered = registration.register_variants(
            tracker,
            run,
            [Variant(name, classifier, rows(trained)[row], "product")],
            layout.preprocessor,
            example,
            {**base_tags(trained), **(tags or {})},
            "# card\n",
        )
    return registered["product"]


def random_model(trained, out):
    """The teacher's architecture with fresh random weights: a model that is certainly worse."""
    import torch

    from tasks.backbones import build_classifier, save_classifier

    arch = read_json(Layout(trained["root"]).teacher / "arch.json")
    torch.manual_seed(0)
    return save_classifier(build_classifier(arch), arch, out)


def aliases(tracker, name=NAME) -> dict:
    return {k: str(v) for k, v in tracker.client.get_registered_model(name).aliases.items()}


def promote(tracker, trained, gates=LENIENT, **kw):
    return promotion.promote(tracker, NAME, gates, Layout(trained["root"]).split("test"), actor="tester", **kw)


# ---------------------------------------------------------------------------- registration by the pipeline


def test_pipeline_registers_product_and_references_with_lineage_card_and_signature(trained):
    client = MlflowClient(trained["uri"])
    summary = trained["summary"]
    assert summary["stages"]["register"] == "ran"
    product = client.get_model_version_by_alias(NAME, CHALLENGER)
    t = product.tags
    run = client.get_run(summary["run_id"])
    for key in (
        "git_commit",
        "data_md5",
        "split_hash.train",
        "split_hash.val",
        "split_hash.test",
        "params_hash",
        "compression_recipe",
        "test_accuracy",
        "size_bytes",
        "latency_b1_ms",
        "latency_b256_ms",
    ):
        assert t.get(key), key
    assert t["parent_run_id"] == summary["run_id"] and t["data_md5"] == run.data.tags["data_md5"]
    assert t["split_hash.test"] == run.data.tags["split_hash.test"] and t["role"] == "product"
    # the product is the candidate the select stage picked, with its own recipe and figures
    pick = summary["selection"]["pick"]
    assert t["variant"] == pick["variant"] and t["selection.reason"].startswith(pick["variant"])
    runtime = "int8" if pick["candidate"].endswith(".int8") else "ONNX Runtime fp32"
    assert runtime in t["compression_recipe"] and ("no KD" in t["compression_recipe"]) == ("nokd" in pick["candidate"])
    row = rows(trained)[pick["variant"]]
    assert float(t["test_accuracy"]) == pytest.approx(row["accuracy"], abs=1e-6)
    assert int(t["size_bytes"]) == row["file_bytes"]
    # the version links to the register child run of this pipeline run, which holds what "compare versions"
    # shows: the params that produced the model and its numbers
    child = client.get_run(product.run_id)
    assert child.data.params["distill.temperature"] == str(trained["params"].distill.temperature)
    assert child.data.metrics["test.accuracy"] == pytest.approx(float(t["test_accuracy"]), abs=1e-6)
    assert {"size_bytes", "latency_b1_ms", "latency_b256_ms"} <= set(child.data.metrics)
    assert float(t["served_latency_b1_ms"]) > float(t["latency_b1_ms"])  # pyfunc.predict adds to the runtime
    assert (
        child.data.tags["mlflow.parentRunId"] == summary["run_id"] and child.data.tags["distilflow.stage"] == "register"
    )
    for ref in (f"{NAME}-teacher", f"{NAME}-student"):
        v = client.search_model_versions(f"name = '{ref}'")
        assert len(v) == 1 and v[0].tags["role"] == "reference" and v[0].run_id == product.run_id
        assert CHALLENGER not in client.get_registered_model(ref).aliases

    tracker = Tracker(trained["uri"], trained["root"])
    local = tracker.client.download_artifacts(product.run_id, f"registered/{NAME}")
    card = open(os.path.join(local, "model_card.md")).read()
    for heading in ("## Data", "## Cleaning", "## Metrics of every variant", "## Compression steps", "## Intended use"):
        assert heading in card
    assert "| student int8 |" in card and "| teacher fp32 |" in card and t["data_md5"] in card
    # a teacher from scratch (QUICK's builtin:cnn) is named as such, with no pretrained weights to trace
    assert t["teacher.backbone"] == "builtin:cnn" and not any(k.startswith("teacher.weights.") for k in t)
    assert "- teacher: `builtin:cnn` backbone, fine-tuned\n" in card
    reqs = open(os.path.join(local, "requirements.txt")).read()
    assert "torch==" in reqs and "onnxruntime==" in reqs and "mlflow==" in reqs
    model = tracker.load_pyfunc(f"models:/{NAME}@{CHALLENGER}")
    assert model.metadata.get_input_schema().input_names() == [f"px{i}" for i in range(64)]
    assert model.metadata.get_output_schema().input_names() == ["prediction"] + [f"prob_{c}" for c in range(10)]


def test_an_unchanged_model_is_not_registered_twice(trained, tmp_path):
    tracker = fresh(tmp_path)
    int8 = Layout(trained["root"]).candidates / "student.int8"
    first = register(tracker, trained, int8)
    assert register(tracker, trained, int8) == first
    layout = Layout(trained["root"])
    pre = read_json(layout.preprocessor)
    example = packaging.raw_example(layout.root / "data/raw/digits.csv", layout.split("test"), pre["feature_columns"])
    with tracker.run("distilflow-test", "register") as run:
        again = registration.register_variants(
            tracker,
            run,
            [Variant(NAME, int8, rows(trained)["student int8"], "product")],
            layout.preprocessor,
            example,
            base_tags(trained),
            "# card\n",
        )
    assert again == {"versions": {NAME: first}, "product": first, "unchanged": True}
    assert len(tracker.client.search_model_versions(f"name = '{NAME}'")) == 1
    # identical to any complete version, not only the newest: the nightly run that rebuilds the champion's
    # model after another version came in registers nothing
    other = register(tracker, trained, Layout(trained["root"]).teacher, row="teacher fp32")
    assert other != first and register(tracker, trained, int8) == first
    assert len(tracker.client.search_model_versions(f"name = '{NAME}'")) == 2


def test_registration_is_all_or_nothing(trained, tmp_path):
    tracker = fresh(tmp_path)
    layout = Layout(trained["root"])
    broken = shutil.copytree(layout.student, tmp_path / "broken_student")
    (broken / "model.safetensors").write_bytes(b"not a model")
    variants = [
        Variant(NAME, (layout.candidates / "student.int8"), rows(trained)["student int8"], "product"),
        Variant(f"{NAME}-teacher", layout.teacher, rows(trained)["teacher fp32"], "reference"),
        Variant(f"{NAME}-student", broken, rows(trained)["student fp32 (KD)"], "reference"),
    ]
    pre = read_json(layout.preprocessor)
    example = packaging.raw_example(layout.root / "data/raw/digits.csv", layout.split("test"), pre["feature_columns"])
    with pytest.raises(DistilflowError), tracker.run("distilflow-test", "register") as run:
        registration.register_variants(
            tracker, run, variants, layout.preprocessor, example, base_tags(trained), "# c\n"
        )
    for name in (NAME, f"{NAME}-teacher", f"{NAME}-student"):
        assert tracker.client.search_model_versions(f"name = '{name}'") == []
        # the models this first registration created are gone too, so nothing looks registered
        assert tracker.client.search_registered_models(f"name = '{name}'") == []
    with pytest.raises(DistilflowError, match="unknown registered model"):
        registration.require_model(tracker.client, NAME)


def test_an_unfinished_registration_is_neither_promoted_nor_taken_for_a_finished_one(trained, tmp_path):
    tracker = fresh(tmp_path)
    int8 = Layout(trained["root"]).candidates / "student.int8"
    v = register(tracker, trained, int8)
    assert tracker.client.get_model_version(NAME, v).tags["registration"] == "complete"
    # what a process killed between creating the version and finishing the registration leaves behind
    tracker.client.set_model_version_tag(NAME, v, "registration", "pending")
    with pytest.raises(DistilflowError, match=f"challenger v{v} of {NAME} is marked registration=pending"):
        promote(tracker, trained)
    assert aliases(tracker) == {CHALLENGER: v}
    assert "promotion.decision" not in tracker.client.get_model_version(NAME, v).tags
    # the same model registered again is a new, complete version, not "unchanged"
    v2 = register(tracker, trained, int8)
    assert v2 != v and tracker.client.get_model_version(NAME, v2).tags["registration"] == "complete"
    assert aliases(tracker) == {CHALLENGER: v2}


# ---------------------------------------------------------------------------- gates


@pytest.mark.parametrize(
    "gate, setting, passes",
    [
        ("min_accuracy", {"min_accuracy": 0.95}, True),
        ("min_accuracy", {"min_accuracy": 0.97}, False),
        ("max_accuracy_drop", {"max_accuracy_drop": 0.02}, True),
        ("max_accuracy_drop", {"max_accuracy_drop": 0.01}, False),
        ("max_latency_ms", {"max_latency_ms": 0.5}, True),
        ("max_latency_ms", {"max_latency_ms": 0.3}, False),
        ("max_size_kb", {"max_size_kb": 30}, True),
        ("max_size_kb", {"max_size_kb": 20}, False),
    ],
)
def test_each_gate_passes_and_fails_on_its_threshold(gate, setting, passes):
    challenger = {"accuracy": 0.96, "latency_b1_ms": 0.4, "size_bytes": 25 * 1024, "version": "2"}
    champion = {"accuracy": 0.975, "version": "1"}
    gates = GateParams(**{**LENIENT.model_dump(), **setting})
    result = {g.name: g for g in promotion.check_gates(challenger, champion, gates)}
    assert result[gate].passed is passes
    assert all(g.passed for name, g in result.items() if name != gate)


def test_first_model_is_promoted_when_the_absolute_gates_pass(trained, tmp_path):
    tracker = fresh(tmp_path)
    v = register(tracker, trained, (Layout(trained["root"]).candidates / "student.int8"))
    result = promote(tracker, trained)
    assert result["decision"] == "promoted"
    assert aliases(tracker) == {CHAMPION: v}
    tags = tracker.client.get_model_version(NAME, v).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.by"] == "tester"
    assert tags["promotion.gate.max_accuracy_drop.value"] == "n/a" and tags["promotion.against"] == "none"
    # the accuracy gate used the model re-scored on the frozen test split: the pipeline's own figure
    assert float(tags["promotion.gate.min_accuracy.value"]) == pytest.approx(
        rows(trained)["student int8"]["accuracy"], abs=1e-5
    )


def test_first_model_failing_an_absolute_gate_is_rejected_and_recorded(trained, tmp_path):
    tracker = fresh(tmp_path)
    v = register(tracker, trained, (Layout(trained["root"]).candidates / "student.int8"))
    result = promote(tracker, trained, GateParams(**{**LENIENT.model_dump(), "max_size_kb": 0.5}))
    assert result["decision"] == "rejected" and "size" in result["reasons"]
    assert aliases(tracker) == {}  # no champion, and the challenger was decided
    tags = tracker.client.get_model_version(NAME, v).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.gate.max_size_kb.passed"] == "false"
    assert tags["promotion.gate.min_accuracy.passed"] == "true"


def test_worse_challenger_is_rejected_and_champion_kept_then_better_one_promoted_then_rollback(trained, tmp_path):
    tracker = fresh(tmp_path)
    layout = Layout(trained["root"])
    gates = GateParams(min_accuracy=0.0, max_accuracy_drop=0.1, max_latency_ms=1000, max_size_kb=1e6)
    v1 = register(tracker, trained, (layout.candidates / "student.int8"))
    assert promote(tracker, trained, gates)["decision"] == "promoted"

    v2 = register(tracker, trained, random_model(trained, tmp_path / "random"), row="teacher fp32")
    assert aliases(tracker) == {CHAMPION: v1, CHALLENGER: v2}
    result = promote(tracker, trained, gates)
    assert result["decision"] == "rejected" and result["champion"] == v1
    assert aliases(tracker) == {CHAMPION: v1}
    tags = tracker.client.get_model_version(NAME, v2).tags
    assert (
        tags["promotion.gate.max_accuracy_drop.passed"] == "false"
        and float(tags["promotion.gate.max_accuracy_drop.value"]) > 0.3
    )
    assert tags["promotion.against"] == v1

    v3 = register(tracker, trained, layout.teacher, row="teacher fp32")
    result = promote(tracker, trained, gates)
    assert result["decision"] == "promoted", result["reasons"]
    assert aliases(tracker) == {CHAMPION: v3, PREVIOUS: v1}

    back = promotion.rollback(tracker, NAME, actor="oncall", reason="latency regression in prod")
    assert back == {"model": NAME, "champion": v1, "demoted": v3}
    assert aliases(tracker) == {CHAMPION: v1}
    assert tracker.client.get_model_version(NAME, v3).tags["rollback.reason"] == "latency regression in prod"
    with pytest.raises(DistilflowError, match="no 'previous-champion'"):
        promotion.rollback(tracker, NAME, actor="oncall", reason="again")

    trail = promotion.audit_trail(tracker, NAME)
    assert [(r["action"], r["version"], r["decision"]) for r in trail] == [
        ("promote", v1, "promoted"),
        ("promote", v2, "rejected"),
        ("promote", v3, "promoted"),
        ("rollback", v1, ""),
    ]
    assert trail[-1]["by"] == "oncall" and trail[-1]["reason"] == "latency regression in prod"
    assert trail[-1]["from_version"] == v3 and trail[1]["by"] == "tester" and "drop" in trail[1]["reason"]
    assert all(r["at"] for r in trail)


# ---------------------------------------------------------------------------- bad input: clear error, no change


def test_promoting_without_a_challenger_changes_nothing(trained, tmp_path, monkeypatch):
    from flows.deployments import scheduled_promote

    tracker = fresh(tmp_path)
    v = register(tracker, trained, (Layout(trained["root"]).candidates / "student.int8"))
    promote(tracker, trained)
    with pytest.raises(DistilflowError, match="no 'challenger' version"):
        promote(tracker, trained)
    # the nightly promotion deployment completes quietly when the night brought nothing new
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.uri)
    assert scheduled_promote(params_file=str(trained["root"] / "params.yaml"))["decision"] == "none"
    assert aliases(tracker) == {CHAMPION: v} and len(promotion.audit_trail(tracker, NAME)) == 1


def test_challenger_on_other_data_than_the_champion_is_refused(trained, tmp_path):
    tracker = fresh(tmp_path)
    layout = Layout(trained["root"])
    v1 = register(tracker, trained, (layout.candidates / "student.int8"))
    promote(tracker, trained)
    v2 = register(tracker, trained, layout.teacher, row="teacher fp32", tags={"data_md5": "0" * 32})
    with pytest.raises(DistilflowError, match="other data than champion"):
        promote(tracker, trained)
    assert aliases(tracker) == {CHAMPION: v1, CHALLENGER: v2}
    assert "promotion.decision" not in tracker.client.get_model_version(NAME, v2).tags


def test_unknown_model_name_is_a_clear_error(trained, tmp_path):
    tracker = fresh(tmp_path)
    register(tracker, trained, (Layout(trained["root"]).candidates / "student.int8"))
    for call in (
        lambda: promotion.promote(tracker, "no-such-model", LENIENT, Layout(trained["root"]).split("test")),
        lambda: promotion.rollback(tracker, "no-such-model"),
    ):
        with pytest.raises(DistilflowError, match=f"unknown registered model 'no-such-model'.*{NAME}"):
            call()


def test_unreachable_tracking_server_retries_then_fails_clearly(trained, tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "distilflow", "promote", "--params", str(trained["root"] / "params.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distilflow: error:")]
    assert len(errors) == 1 and errors[0].startswith("distilflow: error: MLflow tracking server http://127.0.0.1:")
    assert "unreachable after 3 attempts" in errors[0]
    assert 3 <= time.monotonic() - start < 100  # it retried (1 s + 2 s backoff), and did not hang


# ---------------------------------------------------------------------------- serving


def test_champion_loads_in_a_fresh_process_and_predicts_like_the_pipeline(trained, tmp_path):
    from tasks.dataset import load_xy
    from tasks.inference import load_predictor

    tracker = fresh(tmp_path)
    layout = Layout(trained["root"])
    register(tracker, trained, (layout.candidates / "student.int8"))
    promote(tracker, trained)
    test = pd.read_parquet(layout.split("test"))
    raw = pd.read_csv(layout.root / "data/raw/digits.csv").iloc[:0]  # the raw CSV's column types
    test[raw.columns.drop("label")].astype(raw.dtypes.drop("label")).to_csv(tmp_path / "raw_test.csv", index=False)
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({tracker.uri!r})\n"
        f"model = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        f"out = model.predict(pd.read_csv({str(tmp_path / 'raw_test.csv')!r}))\n"
        "json.dump({'pred': out['prediction'].tolist(), 'p0': out['prob_0'].tolist()}, sys.stdout)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])

    X, y = load_xy(layout.split("test"), read_json(layout.preprocessor))
    logits = load_predictor(layout.candidates / "student.int8")(X)
    classes = np.asarray(read_json(layout.preprocessor)["classes"])
    assert served["pred"] == classes[logits.argmax(1)].tolist()
    assert np.mean(np.asarray(served["pred"]) == classes[y]) == pytest.approx(rows(trained)["student int8"]["accuracy"])
    assert np.allclose(served["p0"], np.exp(logits[:, 0]) / np.exp(logits).sum(1), atol=1e-5)


def test_the_registered_model_sees_out_of_range_raw_values_as_training_did(trained):
    """No train/serve skew: training clipped values to data.value_range [0, 16]; so does the served model."""
    tracker = Tracker(trained["uri"], trained["root"])
    model = tracker.load_pyfunc(f"models:/{NAME}@{CHALLENGER}")
    raw = pd.read_csv(trained["root"] / "data/raw/digits.csv").drop(columns=["label"]).head(60)
    bright = raw.copy()
    bright[raw.columns[20:44]] = raw[raw.columns[20:44]] * 16  # 0..255-like pixels in the middle rows
    clipped = bright.clip(upper=16)
    assert (bright > 16).to_numpy().mean() > 0.1  # far out of range: unclipped, these rows would score differently
    out_bright, out_clipped = model.predict(bright), model.predict(clipped)
    assert out_bright["prediction"].tolist() == out_clipped["prediction"].tolist()
    np.testing.assert_allclose(out_bright["prob_3"], out_clipped["prob_3"], atol=1e-6)


def test_batch_scoring_writes_predictions_and_refuses_bad_input(trained, tmp_path):
    tracker = fresh(tmp_path)
    register(tracker, trained, (Layout(trained["root"]).candidates / "student.int8"))
    promote(tracker, trained)
    uri = f"models:/{NAME}@{CHAMPION}"
    raw = pd.read_csv(trained["root"] / "data/raw/digits.csv").head(50)
    raw.insert(0, "id", range(50))
    raw.to_csv(tmp_path / "in.csv", index=False)
    result = scoring.score_csv(tracker, uri, tmp_path / "in.csv", tmp_path / "out.csv")
    out = pd.read_csv(tmp_path / "out.csv")
    assert result["rows"] == 50 and list(out["id"]) == list(range(50))
    assert {"prediction", "prob_0", "prob_9", "label"} <= set(out.columns) and "px0" not in out.columns
    assert np.allclose(out[[f"prob_{c}" for c in range(10)]].sum(1), 1, atol=1e-5)
    assert (out["prediction"] == out["label"]).mean() >= 0.88  # ~0.94 on these 50 rows (QUICK)

    raw.drop(columns=["px5"]).to_csv(tmp_path / "missing.csv", index=False)
    with pytest.raises(DistilflowError, match=r"missing the model's input columns: \['px5'\]"):
        scoring.score_csv(tracker, uri, tmp_path / "missing.csv", tmp_path / "out2.csv")
    # what the card promises: missing values are imputed, fractional ones are taken as they are
    raw.assign(px3=raw["px3"] + 0.5, px4=np.nan).to_csv(tmp_path / "float.csv", index=False)
    assert scoring.score_csv(tracker, uri, tmp_path / "float.csv", tmp_path / "float_out.csv")["rows"] == 50
    assert pd.read_csv(tmp_path / "float_out.csv")["prediction"].notna().all()
    raw.assign(px3="dark").to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(DistilflowError, match="column 'px3' holds non-numeric values"):
        scoring.score_csv(tracker, uri, tmp_path / "text.csv", tmp_path / "out2.csv")
    with pytest.raises(DistilflowError, match="not found"):
        scoring.score_csv(tracker, uri, tmp_path / "nope.csv", tmp_path / "out2.csv")
    assert not (tmp_path / "out2.csv").exists()


def test_two_promotions_at_once_one_wins_the_other_reports_it(trained, tmp_path):
    """Two CLI processes promote the same challenger together, through one Prefect API and one store."""
    from prefect.settings import get_current_settings

    tracker = fresh(tmp_path)
    v = register(tracker, trained, (Layout(trained["root"]).candidates / "student.int8"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.uri, "PREFECT_API_URL": str(get_current_settings().api.url)}
    cmd = [sys.executable, "-m", "distilflow", "promote", "--params", str(trained["root"] / "params.yaml")]
    procs = [
        subprocess.Popen(
            cmd + ["--by", who], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for who in ("alice", "bob")
    ]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    winners = [o for o in outs if o[0] == 0]
    losers = [o for o in outs if o[0] != 0]
    assert len(winners) == 1 and len(losers) == 1, outs
    assert f"promoted: {NAME} v{v}" in winners[0][1]
    error = [line for line in losers[0][2].splitlines() if line.startswith("distilflow: error:")]
    assert len(error) == 1 and ("already decided by another promotion" in error[0] or "no 'challenger'" in error[0])
    assert losers[0][0] == 1 and "Traceback" not in losers[0][2]
    assert aliases(tracker) == {CHAMPION: v}
    trail = promotion.audit_trail(tracker, NAME)
    assert len(trail) == 1 and trail[0]["decision"] == "promoted" and trail[0]["by"] in ("alice", "bob")


def _promote_cli(tracker, trained, *extra, who="bob"):
    from prefect.settings import get_current_settings

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.uri, "PREFECT_API_URL": str(get_current_settings().api.url)}
    cmd = [
        sys.executable,
        "-m",
        "distilflow",
        "promote",
        "--params",
        str(trained["root"] / "params.yaml"),
        "--by",
        who,
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_promotion_that_waited_for_the_lock_reports_the_decision_made_meanwhile(trained, tmp_path):
    """Deterministic order: bob's promotion is made to wait on the lock while alice's decides the challenger."""
    from flows.locks import registry_lock

    tracker = fresh(tmp_path)
    v = register(tracker, trained, (Layout(trained["root"]).candidates / "student.int8"))
    lines = []
    with registry_lock(tracker, NAME, 5):
        proc = _promote_cli(tracker, trained)
        for line in proc.stdout:  # bob has seen the challenger and is blocked on the lock
            lines.append(line)
            if "waiting for registered model" in line:
                break
        assert proc.poll() is None, "".join(lines)
        assert promote(tracker, trained)["decision"] == "promoted"  # alice, holding the lock
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("distilflow: error:")]
    assert (
        len(errors) == 1 and f"challenger version {v} of {NAME} was already decided by another promotion" in errors[0]
    )
    assert "promoted by tester" in errors[0] and "Traceback" not in out
    assert aliases(tracker) == {CHAMPION: v}
    assert [r["by"] for r in promotion.audit_trail(tracker, NAME)] == ["tester"]


def test_a_promotion_that_cannot_get_the_lock_in_time_fails_clearly_and_changes_nothing(trained, tmp_path):
    from flows.locks import registry_lock

    tracker = fresh(tmp_path)
    v = register(tracker, trained, (Layout(trained["root"]).candidates / "student.int8"))
    with registry_lock(tracker, NAME, 5):
        proc = _promote_cli(tracker, trained, "--set", "registry.lock_timeout_s=2")
        out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("distilflow: error:")]
    assert len(errors) == 1 and f"registered model {NAME} is busy" in errors[0]
    assert f"(pid {os.getpid()} since" in errors[0] and "registry.lock_timeout_s" in errors[0]  # who holds it
    assert "Traceback" not in out
    assert aliases(tracker) == {CHALLENGER: v}
    assert promotion.audit_trail(tracker, NAME) == []


def test_rollback_audit_and_score_commands(trained, tmp_path):
    """The CLI a person uses: rollback restores the previous champion, audit lists it all, score writes predictions."""
    tracker = fresh(tmp_path)
    layout = Layout(trained["root"])
    v1 = register(tracker, trained, (layout.candidates / "student.int8"))
    promote(tracker, trained)
    v2 = register(tracker, trained, layout.teacher, row="teacher fp32")
    promote(tracker, trained)
    assert aliases(tracker) == {CHAMPION: v2, PREVIOUS: v1}
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.uri}
    cli = [sys.executable, "-m", "distilflow"]
    params = ["--params", str(trained["root"] / "params.yaml")]

    back = subprocess.run(
        cli + ["rollback", *params, "--reason", "p99 latency up", "--by", "oncall"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert back.returncode == 0, back.stderr
    assert aliases(tracker) == {CHAMPION: v1}

    trail = subprocess.run(cli + ["audit", *params], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert trail.returncode == 0, trail.stderr
    rows = [line.split(" | ") for line in trail.stdout.splitlines()[1:]]
    assert [(r[2], r[3], r[5], r[6]) for r in rows] == [
        ("promote", f"v{v1}", "promoted", "tester"),
        ("promote", f"v{v2}", "promoted", "tester"),
        ("rollback", f"v{v1}", "-", "oncall"),
    ]
    assert rows[-1][4] == f"v{v2}" and rows[-1][7] == "p99 latency up"

    raw = pd.read_csv(layout.root / "data/raw/digits.csv").head(40)
    raw.to_csv(tmp_path / "new.csv", index=False)
    scored = subprocess.run(
        cli + ["score", *params, str(tmp_path / "new.csv"), "--out", str(tmp_path / "pred.csv")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert scored.returncode == 0, scored.stderr
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert len(pred) == 40 and (pred["prediction"] == raw["label"]).mean() >= 0.85  # ~0.93 (QUICK)
    probs = pred[[c for c in pred.columns if c.startswith("prob_")]]
    assert probs.shape[1] == 10 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_the_registry_lock_is_named_after_the_store_it_guards(tmp_path):
    from tasks.registry.locking import lock_file, lock_name

    a, b = Layout(tmp_path / "a").tracking_uri(), Layout(tmp_path / "b").tracking_uri()
    assert lock_name(NAME, a) != lock_name(NAME, b)  # two checkouts with their own stores never block each other
    assert lock_name(NAME, a) == lock_name(NAME, a) and NAME in lock_name(NAME, a)
    secret = "postgresql://user:hunter2@db:5432/mlflow"
    assert lock_name(NAME, secret) == lock_name(NAME, "postgresql://user:other@db:5432/mlflow")  # no password in it
    assert lock_file(a, NAME).parent == tmp_path / "a" and lock_file("http://127.0.0.1:5000", NAME) is None
