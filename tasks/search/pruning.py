"""Stopping bad trials early on their per-epoch validation accuracy (the median rule).

Optuna's own pruners refuse multi-objective studies (`Trial.report` raises),
and the default study here is multi-objective. So the rule is applied here,
the same for both kinds: after `warmup` epochs, a trial whose best validation
accuracy so far is below the median of the completed trials' best at the same
epoch stops, once `startup` trials have completed. The values go through the
study's storage (Optuna's intermediate values), so a trial on another process
or machine sees the others' curves, and Optuna's dashboard shows them.
"""

from __future__ import annotations

import statistics


class TrialPruned(Exception):  # noqa: N818 - named as Optuna names it
    """Raised from inside the training loop when the median rule stops the trial."""


def best_so_far(curve: dict[int, float], epoch: int) -> float | None:
    """The best value of `curve` ({epoch: value}) up to and including `epoch`; None before its first report."""
    seen = [v for e, v in curve.items() if e <= epoch]
    return max(seen) if seen else None


def median_rule(mine: dict[int, float], epoch: int, others: list[dict[int, float]], warmup: int, startup: int) -> bool:
    """Whether a trial with curve `mine` stops at `epoch`, given the completed trials' curves (`others`)."""
    if epoch < warmup or len(others) < startup:
        return False
    theirs = [v for v in (best_so_far(c, epoch) for c in others) if v is not None]
    if len(theirs) < startup:
        return False
    current = best_so_far(mine, epoch)
    return current is not None and current < statistics.median(theirs)


class EpochReporter:
    """The `on_epoch` callback of one trial: records validation accuracy in the study and applies the rule.

    `storage` is an Optuna storage; `trial_id` its id of this trial.
    """

    def __init__(self, storage, study_id: int, trial_id: int, warmup: int, startup: int, enabled: bool = True):
        """Report into `storage` for `trial_id`; prune only if `enabled`."""
        self.storage, self.study_id, self.trial_id = storage, study_id, trial_id
        self.warmup, self.startup, self.enabled = warmup, startup, enabled
        self.curve: dict[int, float] = {}

    def __call__(self, row: dict) -> None:
        """Called by the training loop after each epoch's validation."""
        from optuna.trial import TrialState

        if "val_accuracy" not in row:
            return
        epoch, value = int(row["epoch"]), float(row["val_accuracy"])
        self.curve[epoch] = value
        self.storage.set_trial_intermediate_value(self.trial_id, epoch, value)
        if not self.enabled:
            return
        done = self.storage.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.COMPLETE,))
        others = [dict(t.intermediate_values) for t in done if t._trial_id != self.trial_id]
        if median_rule(self.curve, epoch, others, self.warmup, self.startup):
            raise TrialPruned(
                f"pruned at epoch {epoch}: best validation accuracy {best_so_far(self.curve, epoch):.4f} is below "
                f"the median of {len(others)} completed trials at that epoch"
            )
