"""What this CPU offers int8: VNNI (one instruction for a u8×s8 dot product) or not.

Without VNNI, x86's u8×s8 multiply-add (`vpmaddubsw`) saturates its 16-bit
sums, so ONNX Runtime recommends 7-bit weights there (`reduce_range`,
onnxruntime's quantization guide); with it, full 8-bit ranges are exact and
fastest. Measured on this project's AMD EPYC (AVX512-VNNI): a u8×s8 GEMM at
3.8× fp32's rate, u8×u8 at 1.6×, s8×s8 at 0.3× (bench/results).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is not there)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return frozenset()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def has_vnni() -> bool:
    """Whether int8 dot products have their one-instruction form here."""
    return any(flag in cpu_flags() for flag in VNNI_FLAGS)


def reduce_range(setting: str) -> bool:
    """`quantize.reduce_range`: "on", "off", or "auto" (on exactly where the CPU has no VNNI)."""
    return setting == "on" or (setting == "auto" and not has_vnni())
