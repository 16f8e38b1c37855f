"""Rooflines for the benchmarks: FLOPs per item (counted by torch) and the device's peak FLOP/s.

share = items/s × FLOPs per item ÷ peak. GPU peaks are dense (no structured sparsity) vendor figures;
a CPU's is estimated from its cores, clock and vector units.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Dense (no structured sparsity) peak TFLOP/s from the vendors' datasheets; the first matching name
# wins, so the more specific names come first. tf32 is what cuDNN uses for fp32 convolutions when
# torch.backends.cudnn.allow_tf32 is on (its default).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1, "fp16": 362.1},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "V100": {"fp32": 15.7, "tf32": 15.7, "bf16": 15.7, "fp16": 125.0},
    "T4": {"fp32": 8.1, "tf32": 8.1, "bf16": 8.1, "fp16": 65.0},
}


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call (convolutions and matrix products; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def cpu_peak() -> dict[str, Any]:
    """cores × clock × fp32 FLOPs per cycle per core (two FMA units of the widest vector ISA)."""
    flags, mhz, model = set(), 0.0, platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu MHz":
                mhz = max(mhz, float(value))
            elif key == "model name":
                model = value.strip()
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16 if "avx" in flags else 8
    cores = torch.get_num_threads()
    fp32 = cores * (mhz or 2000.0) * 1e6 * per_cycle / 1e12
    bf16 = fp32 * (2 if "avx512_bf16" in flags or "amx_bf16" in flags else 1)
    return {"model": model, "cores_used": cores, "mhz": mhz, "fp32_flops_per_cycle": per_cycle,
            "tflops": {"fp32": fp32, "tf32": fp32, "bf16": bf16, "fp16": fp32},
            "source": "cores × clock × FLOPs/cycle (estimate)"}


def gpu_peak(name: str) -> dict[str, Any]:
    """The PEAK_TFLOPS entry of a CUDA device name (first match; None figures when unknown)."""
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return {"model": name, "table_entry": key, "tflops": tflops, "source": "vendor datasheet, dense"}
    return {"model": name, "table_entry": None, "tflops": None, "source": "not in PEAK_TFLOPS"}


def device_peak(device: torch.device) -> dict[str, Any]:
    return gpu_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else cpu_peak()


def peak_for(peak: dict, dtype: str, tf32: bool | None = None) -> float | None:
    """Peak FLOP/s for `dtype`; fp32 on a GPU counts as tf32 while cuDNN may use it (its default)."""
    table = peak.get("tflops")
    if not table:
        return None
    tf32 = torch.backends.cudnn.allow_tf32 if tf32 is None else tf32
    if dtype == "fp32" and peak.get("table_entry") and tf32:
        dtype = "tf32"
    return table[dtype] * 1e12


def share(rate: float, flops: float, peak: dict, dtype: str, tf32: bool | None = None) -> float | None:
    """Achieved FLOP/s (`rate` items/s × `flops` per item) as a fraction of the peak."""
    top = peak_for(peak, dtype, tf32)
    return None if not top or not flops else rate * flops / top
