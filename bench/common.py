"""What every benchmark family shares: timing, the machine, and targets with verdicts."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from distilflow.layout import Layout

REPO = Path(__file__).resolve().parents[1]


def summarize(samples: list[float]) -> dict:
    """Median, min and max of repeated measurements (the median resists a scheduler hiccup)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def interleaved_timings(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 3, rounds: int = 5, settle_s: float = 0.02
) -> dict[str, dict]:
    """Seconds per call of each callable: `repeats` timed calls each, spread over `rounds` rounds.

    Each round runs every callable in turn, as a block of `warmup` untimed
    calls then its share of timed ones, so a slow spell of the machine
    (another process, a frequency drop) hits every contender alike and
    cancels out of their ratios. Blocks, not single alternating calls: ONNX
    Runtime's and OpenMP's worker threads spin for a while after a call, and
    on a 2-core machine that spinning would be billed to the next contender;
    `settle_s` of sleep between blocks lets it stop.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    for n in per_round:
        if n == 0:
            continue
        for name, fn in calls.items():
            time.sleep(settle_s)
            for _ in range(warmup):
                fn()
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: summarize(s) for name, s in samples.items()}


def in_ms(summary: dict) -> dict:
    """A timing summary in milliseconds (its count `n` left as it is)."""
    return {k: (v * 1e3 if k != "n" else v) for k, v in summary.items()}


def ratio(numerator: dict, denominator: dict) -> dict:
    """Ratio of two summaries' medians, with the range the extremes allow (worst to best case)."""
    return {
        "median": numerator["median"] / denominator["median"],
        "min": numerator["min"] / denominator["max"],
        "max": numerator["max"] / denominator["min"],
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict:
    """The machine and software the figures were taken on."""
    import numpy
    import torch

    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": _memory_gb(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


@dataclass
class Target:
    """One target we hold ourselves to, and how the measurement fared against it.

    `op` is '>=' (e.g. a speed-up), '<=' (e.g. an accuracy drop or overhead), or '>' where a tie
    is a miss (a gain that must be positive).
    `by` says by how much it passed or missed: relative for ratios, absolute
    for quantities in points (`unit='pts'`), where a relative margin misleads.
    """

    id: str
    what: str
    measured: float
    target: float
    op: str
    unit: str = "×"
    note: str = ""
    passed: bool = False
    by: str = ""

    def __post_init__(self):
        if self.op not in (">=", "<=", ">"):
            raise ValueError(f"Target {self.id}: op must be '>=', '<=' or '>', got {self.op!r}")
        m, t = float(self.measured), float(self.target)
        if m != m:  # NaN: nothing measured, nothing passed
            self.passed, self.by = False, "not measured"
            return
        self.passed = {">=": m >= t, "<=": m <= t, ">": m > t}[self.op]
        verb = "passed" if self.passed else "missed"
        if self.unit in ("pts", "s", "%", ""):
            self.by = f"{verb} by {abs(m - t):.2f}{' ' + self.unit if self.unit else ''}"
        elif self.op in (">=", ">"):  # a speed-up or shrink factor: how much of the target was reached
            self.by = f"{verb}: {m / t:.2f}× the target" + ("" if self.passed else f" ({1 - m / t:.1%} short)")
        else:  # an overhead or memory factor: how close to the limit
            self.by = f"{verb}: {m / t:.2f}× the limit" + ("" if self.passed else f" ({m / t - 1:.1%} over)")

    def as_dict(self) -> dict:
        return asdict(self)


def check(id: str, what: str, measured: float, op: str, target: float, unit: str = "×", note: str = "") -> dict:
    """A target's verdict as a JSON-able record."""
    return Target(id, what, float(measured), float(target), op, unit, note).as_dict()


class Stopwatch:
    """Accumulates named durations: `with sw('stage'): ...`, many times over."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str):
        sw = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                sw.add(name, time.perf_counter() - self.t0)
                return False

        return _Span()

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def wrap(self, owner, attr: str, name: str | None = None) -> None:
        """Time every call of `owner.attr` (or `owner[attr]`, a dict entry) under `name`; behaviour unchanged."""
        is_dict = isinstance(owner, dict)
        original = owner[attr] if is_dict else getattr(owner, attr)
        label = name or attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - t0)

        timed.__wrapped__ = original
        timed.__name__ = getattr(original, "__name__", attr)
        if is_dict:
            owner[attr] = timed
        else:
            setattr(owner, attr, timed)


def client_env(**extra: str) -> dict[str, str]:
    """This environment for a `python -m distilflow` child: no stack variables (MLFLOW_TRACKING_URI, ...)
    unless given in `extra`, this venv first on PATH, the repo importable, no telemetry or progress bars."""
    from stack.components import CLIENT_VARS

    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    env.update(
        PYTHONPATH=str(REPO),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TQDM_DISABLE="1",
        **extra,
    )
    return env


def make_project(root: Path, digits: Path | None = None) -> Path:
    """A fresh project: the repo's params.yaml and the demo digits CSV (a copy of `digits`, or written anew)."""
    from tasks.data import export_digits

    data = Layout(root).demo_data
    data.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    if digits is None:
        export_digits(data)
    else:
        shutil.copy(digits, data)
    return root


def distilflow_command(*args: str, params: Path, overrides: list[str] = ()) -> list[str]:
    """`python -m distilflow ARGS --params PARAMS --set O ...` as a child process runs it."""
    return [
        sys.executable,
        "-m",
        "distilflow",
        *args,
        "--params",
        str(params),
        *(a for o in overrides for a in ("--set", o)),
    ]
