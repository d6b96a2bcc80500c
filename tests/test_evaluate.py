import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from distilflow.errors import DistilflowError
from tasks.evaluate import compare_variants, compression_markdown, evaluate_variant, pareto_front, pareto_plot
from tasks.onnx_export import export_onnx

torch.set_num_threads(1)

# An identity "classifier" over one-hot rows predicts exactly the class each row encodes, so every
# metric below can be worked out by hand.
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 1, 1, 1, 2, 0])
# recall: class 0 1/2, class 1 2/2, class 2 1/2; precision: 1/2, 2/3, 1/1
# F1: 0.5, 0.8, 2·1·0.5/1.5 = 2/3  → macro-F1 = (0.5 + 0.8 + 2/3) / 3
MACRO_F1 = (0.5 + 0.8 + 2 / 3) / 3


def _identity_model() -> nn.Module:
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
        model.bias.zero_()
    return model.eval()


def _one_hot_rows() -> np.ndarray:
    return np.eye(3, dtype=np.float32)[Y_PRED]


def _check_metrics(row: dict) -> None:
    assert row["accuracy"] == pytest.approx(4 / 6)
    assert row["macro_f1"] == pytest.approx(MACRO_F1)
    assert row["per_class_recall"] == pytest.approx({0: 0.5, 1: 1.0, 2: 0.5})
    assert row["parameters"] == 12  # 3×3 weights + 3 biases
    for bs in (1, 256):
        lo, mid, hi = (row[f"latency_b{bs}_{k}_ms"] for k in ("min", "median", "max"))
        assert 0 < lo <= mid <= hi
    assert row["threads"] == 1


def test_torch_and_onnx_variants_are_measured_the_same_way(tmp_path):
    model = _identity_model()
    onnx_path = export_onnx(model, _one_hot_rows(), tmp_path / "identity.onnx", dynamo=False)
    X = _one_hot_rows()
    torch.set_num_threads(2)  # the caller's count, which the harness must give back after measuring at 1
    torch_row = evaluate_variant("torch", model, X, Y_TRUE, threads=1, repeats=3)
    onnx_row = evaluate_variant("onnx", onnx_path, X, Y_TRUE, threads=1, repeats=3)
    _check_metrics(torch_row)
    _check_metrics(onnx_row)
    assert onnx_row["file_bytes"] == onnx_path.stat().st_size
    assert torch_row["kind"] == "torch" and onnx_row["kind"] == "onnx"
    assert torch.get_num_threads() == 2  # the harness restores the caller's thread count


def test_torchscript_files_are_a_variant_too(tmp_path):
    path = tmp_path / "identity.pt"
    torch.jit.save(torch.jit.trace(_identity_model(), torch.zeros(2, 3)), str(path))
    row = evaluate_variant("ts", path, _one_hot_rows(), Y_TRUE, threads=1, repeats=2)
    assert row["accuracy"] == pytest.approx(4 / 6) and row["file_bytes"] == path.stat().st_size


def test_unknown_or_missing_variant_files_are_clear_errors(tmp_path):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"x")
    with pytest.raises(DistilflowError, match="unsupported file type '.tflite'"):
        evaluate_variant("x", bad, _one_hot_rows(), Y_TRUE)
    with pytest.raises(DistilflowError, match="not found"):
        evaluate_variant("x", tmp_path / "gone.onnx", _one_hot_rows(), Y_TRUE)


def test_pareto_front_keeps_only_undominated_variants():
    table = pd.DataFrame(
        {
            "variant": ["a", "b", "c", "d"],
            "accuracy": [0.90, 0.80, 0.95, 0.90],
            "latency_b1_median_ms": [1.0, 2.0, 3.0, 1.0],
        }
    )
    # b is worse than a on both; d ties a exactly, so neither dominates the other
    assert pareto_front(table).tolist() == [True, False, True, True]


def test_compare_variants_table_plot_and_markdown(tmp_path):
    model = _identity_model()
    worse = _identity_model()
    with torch.no_grad():
        worse.weight.copy_(torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 0, 1]]))  # a one-hot 1 scores all-zero → class 0
    table = compare_variants({"identity": model, "worse": worse}, _one_hot_rows(), Y_TRUE, threads=1, repeats=3)
    assert list(table["variant"]) == ["identity", "worse"]
    assert table.loc[1, "accuracy"] == pytest.approx(3 / 6)  # predictions 0,0,0,0,2,0
    png = pareto_plot(table, tmp_path / "reports" / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = compression_markdown(table)
    assert md.startswith("# Compression")
    assert "| identity | 0.6667 |" in md and "| worse | 0.5000 |" in md
    assert "1 thread(s)" in md and "## Per-class recall" in md
