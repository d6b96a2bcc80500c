"""int8 quantization, by job: the backends, the fake-quant fine-tune, and the accuracy-aware fallback policy.

- `attempt`: one quantizer configuration and the calibration rows;
- `ort`: ONNX Runtime static quantization (the default backend);
- `fx`: torch.ao FX graph mode, saved as TorchScript (the second backend);
- `qat`: BatchNorm folding and a short fake-quant fine-tune;
- `policy`: `quantize_int8`, the budget and its remedies, cheapest first.

Every backend calibrates once per model and calibration method, and reuses
those ranges for every attempt and sensitivity probe (optimum-onnx's
calibrate-once, quantize-many). The stage that writes the candidates is
tasks/quantize.py.
"""
