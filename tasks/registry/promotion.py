"""Promotion through aliases: gates, promote, rollback, and the audit trail of every decision.

Each decision is written as tags on the version and as one run in the
experiment `distilflow-registry-audit` (who, when, what, why), which
`audit_trail` lists and the MLflow UI shows.
"""

from __future__ import annotations

import getpass
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from distilflow.errors import DistilflowError
from distilflow.hashing import frame_hash
from distilflow.io import read_table
from distilflow.params import GateParams
from tasks.registry import AUDIT_EXPERIMENT, CHALLENGER, CHAMPION, PREVIOUS
from tasks.registry.registration import require_model, version_by_alias
from tasks.registry.scoring import score_frame


class NoChallenger(DistilflowError):
    """Nothing to promote: an error for a person asking to promote, a quiet night for the schedule."""


@dataclass
class Gate:
    """One promotion gate's value, threshold and verdict."""

    name: str
    value: float | None
    threshold: float
    passed: bool
    reason: str


def check_gates(challenger: dict, champion: dict | None, gates: GateParams) -> list[Gate]:
    """Each gate with its value, threshold and verdict; the accuracy-drop gate passes trivially with no champion."""
    acc, lat, kb = challenger["accuracy"], challenger["latency_b1_ms"], challenger["size_bytes"] / 1024
    out = [
        Gate(
            "min_accuracy",
            acc,
            gates.min_accuracy,
            acc >= gates.min_accuracy,
            f"test accuracy {acc:.4f} {'≥' if acc >= gates.min_accuracy else '<'} {gates.min_accuracy}",
        )
    ]
    if champion is None:
        out.append(Gate("max_accuracy_drop", None, gates.max_accuracy_drop, True, "no champion yet: first model"))
    else:
        drop = champion["accuracy"] - acc
        ok = drop <= gates.max_accuracy_drop + 1e-12
        out.append(
            Gate(
                "max_accuracy_drop",
                drop,
                gates.max_accuracy_drop,
                ok,
                f"drop vs champion v{champion['version']} ({champion['accuracy']:.4f}) is {drop:+.4f} "
                f"{'≤' if ok else '>'} {gates.max_accuracy_drop}",
            )
        )
    out.append(
        Gate(
            "max_latency_ms",
            lat,
            gates.max_latency_ms,
            lat <= gates.max_latency_ms,
            f"batch-1 latency {lat:.3f} ms {'≤' if lat <= gates.max_latency_ms else '>'} {gates.max_latency_ms} ms",
        )
    )
    if gates.max_served_latency_ms is not None:
        served = challenger.get("served_latency_b1_ms", float("inf"))
        ok = served <= gates.max_served_latency_ms
        out.append(
            Gate(
                "max_served_latency_ms",
                served,
                gates.max_served_latency_ms,
                ok,
                f"pyfunc.predict of one row {served:.3f} ms {'≤' if ok else '>'} {gates.max_served_latency_ms} ms",
            )
        )
    out.append(
        Gate(
            "max_size_kb",
            kb,
            gates.max_size_kb,
            kb <= gates.max_size_kb,
            f"size {kb:.1f} KB {'≤' if kb <= gates.max_size_kb else '>'} {gates.max_size_kb} KB",
        )
    )
    return out


def test_accuracy(tracker, models_uri: str, test: pd.DataFrame) -> float:
    """Accuracy of a registered model on the raw frozen test split (label column `label`)."""
    model = tracker.load_pyfunc(models_uri)
    pred = score_frame(model, models_uri, test.drop(columns=["label"]), "the frozen test split")["prediction"]
    return float((pred.astype(str).to_numpy() == test["label"].astype(str).to_numpy()).mean())


def _record(version) -> dict:
    t = version.tags
    return {
        "version": str(version.version),
        "data_md5": t.get("data_md5"),
        "split_hash": t.get("split_hash.test"),
        "latency_b1_ms": float(t.get("latency_b1_ms", "inf")),
        "served_latency_b1_ms": float(t.get("served_latency_b1_ms", "inf")),
        "size_bytes": float(t.get("size_bytes", "inf")),
    }


def audit(
    tracker,
    name: str,
    action: str,
    version: str | None,
    details: dict[str, str],
    actor: str,
    reason: str,
    state: str = "done",
) -> str:
    """One run in the audit experiment per promotion or rollback; returns its id.

    `state` is `intent` for a promotion recorded before it changes anything
    (see `apply`), then `done`.
    """
    tags = {
        "model": name,
        "action": action,
        "version": str(version),
        "by": actor,
        "reason": reason[:4000],
        "state": state,
        **{k: str(v)[:4000] for k, v in details.items()},
    }
    with tracker.run(
        AUDIT_EXPERIMENT, f"{action} {name} v{version}", tags={f"distilflow.audit.{k}": v for k, v in tags.items()}
    ) as run:
        run.log_dict(details, "decision.json")
    return run.run_id


@dataclass
class Decision:
    """What a promotion decided, before anything in the registry changes."""

    model: str
    version: str
    decision: str  # promoted | rejected
    reasons: str
    against: str | None  # the champion it was gated against
    gates: list[Gate]
    actor: str
    at: str

    @property
    def passed(self) -> bool:
        """Every gate passed."""
        return self.decision == "promoted"

    def summary(self) -> dict:
        """The decision as the flow and the CLI report it."""
        return {
            "model": self.model,
            "version": self.version,
            "decision": self.decision,
            "reasons": self.reasons,
            "champion": self.version if self.passed else self.against,
            "gates": [asdict(g) for g in self.gates],
        }

    def markdown(self) -> str:
        """The gate table (the Prefect artifact and the audit record)."""
        lines = [
            f"# {self.model} v{self.version}: {self.decision}",
            "",
            f"Gated against {'champion v' + self.against if self.against else 'no champion (first model)'} "
            f"by {self.actor} at {self.at}.",
            "",
            "| gate | value | threshold | verdict | why |",
            "|---|---:|---:|:---:|---|",
        ]
        for g in self.gates:
            value = "n/a" if g.value is None else f"{g.value:.4g}"
            lines.append(f"| {g.name} | {value} | {g.threshold:g} | {'pass' if g.passed else 'FAIL'} | {g.reason} |")
        return "\n".join(lines) + "\n"


def _reviewed_challenger(client, name: str, expected: str | None):
    """The @challenger version, refused unless it is the one the caller reviewed (`expected`) and complete."""
    from mlflow.exceptions import MlflowException

    challenger = version_by_alias(client, name, CHALLENGER)
    if expected and (challenger is None or str(challenger.version) != str(expected)):
        try:
            done = client.get_model_version(name, expected)
        except MlflowException:
            done = None
        if done is not None and "promotion.decision" in done.tags:
            raise DistilflowError(
                f"challenger version {expected} of {name} was already decided by another promotion "
                f"({done.tags['promotion.decision']} by {done.tags.get('promotion.by')} at "
                f"{done.tags.get('promotion.at')}); nothing changed"
            )
        now = f"v{challenger.version}" if challenger is not None else "no version"
        raise DistilflowError(
            f"version {expected} of {name} is not the challenger ({now} is @{CHALLENGER}): review "
            f"that one and promote it by its version; nothing changed"
        )
    if challenger is None:
        raise NoChallenger(
            f"{name} has no '{CHALLENGER}' version to promote: run the pipeline first "
            f"(it registers each new model as @{CHALLENGER})"
        )
    if challenger.tags.get("registration", "complete") != "complete":
        raise DistilflowError(
            f"challenger v{challenger.version} of {name} is marked registration="
            f"{challenger.tags['registration']}: its registration did not finish; run the pipeline "
            "again to register a complete version; nothing changed"
        )
    return challenger


def _comparable(name: str, challenger, champion, chal: dict, champ: dict | None) -> None:
    """Refuse a challenger evaluated on other data, or predicting other classes, than the champion."""
    if champ and (champ["data_md5"], champ["split_hash"]) != (chal["data_md5"], chal["split_hash"]):
        raise DistilflowError(
            f"challenger v{chal['version']} of {name} was evaluated on other data than champion v{champ['version']} "
            f"(data md5 {chal['data_md5']} vs {champ['data_md5']}, test split {chal['split_hash']} vs "
            f"{champ['split_hash']}): their accuracies are not comparable; nothing changed"
        )
    classes = (challenger.tags.get("classes"), champion.tags.get("classes") if champion is not None else None)
    if champ and all(classes) and classes[0] != classes[1]:
        raise DistilflowError(
            f"challenger v{chal['version']} of {name} predicts classes {classes[0]}, "
            f"champion v{champ['version']} {classes[1]}: a model that lost or gained a "
            "class is not a drop-in replacement; nothing changed"
        )


def _frozen_test(test_split: Path, chal: dict):
    """The local test split, refused unless it is the one the challenger was evaluated on."""
    if not Path(test_split).is_file():
        raise DistilflowError(f"frozen test split {test_split} not found: run the pipeline's data stages first")
    test = read_table(test_split)
    if frame_hash(test) != chal["split_hash"]:
        raise DistilflowError(
            f"the local test split {test_split} (hash {frame_hash(test)}) is not the one challenger "
            f"v{chal['version']} was evaluated on ({chal['split_hash']}); nothing changed"
        )
    return test


def decide(
    tracker, name: str, gates: GateParams, test_split: Path, actor: str | None = None, expected: str | None = None
) -> Decision:
    """Re-score the challenger and the champion on the frozen test split and check every gate; change nothing.

    `expected` is the version the caller reviewed (`promote --version`) or saw
    before waiting for the lock: if the challenger is another version now, this
    refuses rather than gate a model nobody looked at.
    """
    client = tracker.client
    require_model(client, name)
    challenger = _reviewed_challenger(client, name, expected)
    champion = version_by_alias(client, name, CHAMPION)
    chal = _record(challenger)
    champ = _record(champion) if champion is not None else None
    _comparable(name, challenger, champion, chal, champ)
    test = _frozen_test(test_split, chal)
    chal["accuracy"] = test_accuracy(tracker, f"models:/{name}/{chal['version']}", test)
    if champ:
        champ["accuracy"] = test_accuracy(tracker, f"models:/{name}/{champ['version']}", test)
    results = check_gates(chal, champ, gates)
    passed = all(g.passed for g in results)
    return Decision(
        name,
        chal["version"],
        "promoted" if passed else "rejected",
        "; ".join(g.reason for g in results if not g.passed) or "all gates passed",
        champ["version"] if champ else None,
        results,
        actor or getpass.getuser(),
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def apply(tracker, d: Decision) -> dict:
    """Record the decision, then make it so: audit intent → version tags → aliases → audit done.

    Every step after the intent is idempotent, so a promotion killed between
    them is finished by the next one (`finish_interrupted`), from the intent.
    """
    details = {
        "decision": d.decision,
        "from_version": d.against or "none",
        "at": d.at,
        "gates": json.dumps([asdict(g) for g in d.gates]),
    }
    run_id = audit(tracker, d.model, "promote", d.version, details, d.actor, d.reasons, state="intent")
    _make_so(tracker, d.model, d.version, d.decision, d.against, d.actor, d.at, d.reasons, details["gates"])
    tracker.client.set_tag(run_id, "distilflow.audit.state", "done")
    return d.summary()


def _make_so(
    tracker,
    name: str,
    version: str,
    decision: str,
    against: str | None,
    actor: str,
    at: str,
    reasons: str,
    gates_json: str,
) -> None:
    client = tracker.client
    tags = {
        "promotion.decision": decision,
        "promotion.by": actor,
        "promotion.at": at,
        "promotion.reasons": reasons,
        "promotion.against": against or "none",
    }
    for g in json.loads(gates_json):
        tags |= {
            f"promotion.gate.{g['name']}.value": "n/a" if g["value"] is None else f"{g['value']:.6g}",
            f"promotion.gate.{g['name']}.threshold": f"{g['threshold']:g}",
            f"promotion.gate.{g['name']}.passed": str(g["passed"]).lower(),
        }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if decision == "promoted":
        current = version_by_alias(client, name, CHAMPION)
        if against and (current is None or str(current.version) != str(version)):
            client.set_registered_model_alias(name, PREVIOUS, against)
        client.set_registered_model_alias(name, CHAMPION, version)
    challenger = version_by_alias(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)


def finish_interrupted(tracker, name: str) -> list[str]:
    """Complete every promotion of `name` whose intent was recorded but which did not finish; returns their versions."""
    exp = tracker.client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if exp is None:
        return []
    runs = tracker.client.search_runs(
        [exp.experiment_id],
        f"tags.`distilflow.audit.model` = '{name}' and tags.`distilflow.audit.state` = 'intent'",
        order_by=["attributes.start_time ASC"],
        max_results=100,
    )
    finished = []
    for r in runs:
        t = {
            k.removeprefix("distilflow.audit."): v for k, v in r.data.tags.items() if k.startswith("distilflow.audit.")
        }
        against = None if t.get("from_version") in (None, "none") else t["from_version"]
        _make_so(
            tracker,
            name,
            t["version"],
            t["decision"],
            against,
            t["by"],
            t["at"],
            t.get("reason", ""),
            t.get("gates", "[]"),
        )
        tracker.client.set_tag(r.info.run_id, "distilflow.audit.state", "done")
        finished.append(t["version"])
    return finished


def promote(
    tracker, name: str, gates: GateParams, test_split: Path, actor: str | None = None, expected: str | None = None
) -> dict:
    """Finish any interrupted promotion, then decide and apply this one (see `decide` and `apply`)."""
    finish_interrupted(tracker, name)
    return apply(tracker, decide(tracker, name, gates, test_split, actor, expected))


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
    runs = tracker.client.search_runs(
        [exp.experiment_id], flt, order_by=["attributes.start_time ASC"], max_results=1000
    )
    rows = []
    for r in runs:
        t = {
            k.removeprefix("distilflow.audit."): v for k, v in r.data.tags.items() if k.startswith("distilflow.audit.")
        }
        rows.append(
            {
                "at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.info.start_time / 1000)),
                "model": t.get("model"),
                "action": t.get("action"),
                "version": t.get("version"),
                "from_version": t.get("from_version"),
                "decision": t.get("decision", ""),
                "by": t.get("by"),
                "reason": t.get("reason"),
                "run_id": r.info.run_id,
            }
        )
    return rows
