"""The driver's bookkeeping: ask Optuna for a trial, hand it over as a payload, tell Optuna and MLflow the outcome.

The flow (flows/search.py) only moves payloads to workers and outcomes back;
`TrialBook` owns the budget (`search.n_trials`, `search.timeout_s`), the
trials' nested MLflow runs, the pruned/failed/complete verdicts and the
progress bar.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from distilflow.errors import DistilflowError
from distilflow.layout import Layout
from distilflow.params import Params
from tasks.engine import progress
from tasks.search import front as fr
from tasks.search.space import suggest, trial_params
from tasks.search.study import finished_count, tell_pruned
from tasks.search.trial import TrialPayload
from tasks.search.trial_runs import log_trial


@dataclass
class Asked:
    """A trial in flight: Optuna's handle, its nested MLflow run, its searched values, what the worker gets."""

    trial: object
    run: object
    values: dict
    payload: TrialPayload

    @property
    def name(self) -> str:
        """`trial-0007`: the task run's, the MLflow run's and the folder's name."""
        return Path(self.payload.trial_dir).name


class TrialBook:
    """One search session's side of the study: what is left of the budget, and every trial's record."""

    def __init__(self, params: Params, study, tracker, parent, storage_url: str, layout: Layout, name: str):
        cfg = params.search
        self.params, self.study, self.tracker, self.parent = params, study, tracker, parent
        self.url, self.layout, self.name = storage_url, layout, name
        finished = finished_count(study)
        self.budget = max(0, cfg.n_trials - finished)
        self.deadline = time.monotonic() + cfg.timeout_s if cfg.timeout_s else None
        self.teacher_val = float(study.user_attrs.get("teacher_val_accuracy", 0.0))
        self.forced = {"train.threads": cfg.threads_per_trial, "evaluate.threads": cfg.threads_per_trial}
        if cfg.target == "student":
            self.forced["quantize.teacher"] = False  # the teacher's int8 is the same in every trial: built once
        self.asked, self.errors = 0, []
        self.bar = progress(self.budget, f"search {name}")
        self.bar.unit = "trial"
        if finished:
            print(f"resuming study {name}: {finished} trial(s) already finished, {self.budget} to go")

    def can_ask(self) -> bool:
        """Whether the budget and the timeout allow another trial."""
        return self.asked < self.budget and not (self.deadline and time.monotonic() > self.deadline)

    def ask(self) -> Asked | None:
        """The next trial as a payload; None when its values are a combination the params schema refuses."""
        trial = self.study.ask()
        self.asked += 1
        values = suggest(trial, dict(self.params.search.space))
        tags = {"optuna.study": self.name, "optuna.trial": str(trial.number)}
        run = self.tracker.open("", self.layout.trial(self.name, trial.number).name, tags=tags, parent=self.parent)
        try:
            tparams = trial_params(self.params, values).with_values(self.forced, source="search trial")
        except DistilflowError as exc:  # the schema's cross-checks refuse this combination: a failed trial
            self.fail(Asked(trial, run, values, None), str(exc))
            return None
        payload = TrialPayload(
            number=trial.number,
            trial_id=trial._trial_id,
            study_id=self.study._study_id,
            storage=self.url,
            params=tparams.model_dump(mode="json"),
            values=values,
            trial_dir=str(self.layout.trial(self.name, trial.number)),
            snapshot=str(self.layout.study_inputs(self.name)),
            shared=self.study.user_attrs["distilflow.inputs"],
            threads=self.params.search.threads_per_trial,
        )
        return Asked(trial, run, values, payload)

    def fail(self, asked: Asked, error: str) -> None:
        """A trial that raised (or was refused): FAIL in Optuna with its error, FAILED in MLflow; the study goes on."""
        from optuna.trial import TrialState

        self.errors.append(f"trial {asked.trial.number}: {error}")
        self.study._storage.set_trial_user_attr(asked.trial._trial_id, "fail_reason", error[:2000])
        self.study.tell(asked.trial, state=TrialState.FAIL)
        log_trial(self.tracker, asked.run, {"state": "failed"}, asked.values, error)
        print(f"trial {asked.trial.number} failed: {error.splitlines()[0][:300]}")
        self.bar.update(1)

    def tell(self, asked: Asked, outcome: dict) -> None:
        """A trial that finished: its timings, then pruned, or its objective values and accuracy constraint."""
        storage, trial = self.study._storage, asked.trial
        storage.set_trial_user_attr(trial._trial_id, "seconds", outcome["seconds"])
        # the stages' own compute: what the study's bookkeeping (ask → tell) is measured against (bench/search.py)
        storage.set_trial_user_attr(trial._trial_id, "compute_s", sum(outcome.get("stage_s", {}).values()))
        storage.set_trial_user_attr(trial._trial_id, "host", outcome["host"])
        storage.set_trial_user_attr(trial._trial_id, "pid", outcome["pid"])
        if outcome["state"] == "pruned":
            tell_pruned(self.study, trial, outcome["reason"])
        else:
            o = outcome["objective"]
            storage.set_trial_user_attr(trial._trial_id, "objective", o)
            if self.params.search.target == "student":
                trial.set_constraint("accuracy_floor", fr.constraint(self.params, o, self.teacher_val))
            self.study.tell(trial, fr.trial_values(self.params, o))
        log_trial(self.tracker, asked.run, outcome, asked.values, None)
        self.bar.update(1)

    def abandon(self, in_flight: list[Asked]) -> None:
        """The session is stopping with trials in flight: their runs end KILLED (the next session fails them)."""
        for asked in in_flight:
            self.tracker.close(asked.run, "KILLED")
        self.bar.close()

    def result(self) -> dict:
        """This session's counts; an error when no trial of the study completed."""
        from optuna.trial import TrialState

        self.bar.close()
        if not self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            first = self.errors[0] if self.errors else "no trial completed (all pruned?)"
            raise DistilflowError(f"search {self.name}: every trial failed, nothing registered; {first}")
        return {"study": self.name, "trials_this_session": self.asked, "failed_this_session": len(self.errors)}


def describe(exc: BaseException) -> str:
    """A trial's exception as its failure note: a user error's message alone, anything else with its type."""
    return str(exc) if isinstance(exc, DistilflowError) else f"{type(exc).__name__}: {exc}"
