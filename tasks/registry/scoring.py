"""Raw rows through a registered model: batch scoring, and the re-scoring promotion does."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from distilflow.errors import DistilflowError


def conform_to_schema(model, frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """The model's input columns, each numeric (int or float, NaN allowed), or one clear error naming the column."""
    schema = model.metadata.get_input_schema()
    names = schema.input_names()
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise DistilflowError(
            f"{what} is missing the model's input columns: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(names)} expected)"
        )
    out = frame[names].copy()
    for name in names:
        if pd.api.types.is_numeric_dtype(out[name]) and not pd.api.types.is_bool_dtype(out[name]):
            continue
        converted = pd.to_numeric(out[name], errors="coerce")
        bad = out[name][converted.isna() & out[name].notna()]
        if len(bad):
            raise DistilflowError(f"{what}: column {name!r} holds non-numeric values (e.g. {bad.iloc[0]!r})")
        out[name] = converted
    return out


def score_frame(model, models_uri: str, frame: pd.DataFrame, what: str = "input") -> pd.DataFrame:
    """Predictions of a loaded registered model on raw rows (its own preprocessing applies)."""
    from mlflow.exceptions import MlflowException

    try:
        return model.predict(conform_to_schema(model, frame, what))
    except MlflowException as exc:
        raise DistilflowError(f"{models_uri} cannot score {what}: {str(exc).splitlines()[0][:300]}") from None


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


def score_registered(tracker, params, layout, source: str, out: str, model_uri: str | None = None) -> dict:
    """`distilflow score`: the champion (or `model_uri`) over a CSV; an unknown model name is one clear error."""
    from tasks.registry import CHAMPION
    from tasks.registry.registration import require_model

    uri = model_uri or f"models:/{params.registered_model()}@{CHAMPION}"
    if model_uri is None:
        require_model(tracker.client, params.registered_model())
    return score_csv(tracker, uri, layout.resolve(source), layout.resolve(out)) | {"model_uri": uri}
