"""Mixed precision (section 3.2): low-precision compute, fp32 master weights, loss scaling where needed.

amp on CUDA: fp16 autocast plus a GradScaler (fp16 gradients underflow without loss scaling).
amp on CPU:  bf16 autocast; bf16 has fp32's exponent range, so no scaler (a disabled one, a no-op).
fp32:        no autocast, disabled scaler. Nothing here touches CUDA when the device is the CPU.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager

import torch

PRECISIONS = ("fp32", "amp")
AMP_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast compute dtype for this device and precision, None for plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type not in AMP_DTYPES:
        raise ValueError(f"precision 'amp' supports devices {list(AMP_DTYPES)}, not {device.type!r}")
    return AMP_DTYPES[device.type]


def autocast_context(device: torch.device, precision: str) -> ContextManager:
    """Wrap the forward pass and loss in this: autocast for amp, a no-op for fp32."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler enabled only for fp16 (CUDA amp); elsewhere a disabled one that passes through."""
    enabled = autocast_dtype(device, precision) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them bf16 convolutions are emulated, several times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRECISION_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def hardware(device: torch.device) -> dict:
    """The machine a run's precision and speed depend on, recorded in its metrics.json for the report:
    the CPU model, which of PRECISION_FLAGS it has, and the GPU's name when the run used one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name", ""), "cpu_flags": [f for f in PRECISION_FLAGS if f in flags],
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def effective_precision(device: torch.device, precision: str, cpu_amp: str) -> str:
    """The precision a run really uses: `train.cpu_amp: native_only` keeps CPUs without bf16 at fp32."""
    if precision == "amp" and device.type == "cpu" and cpu_amp == "native_only" and not cpu_has_native_bf16():
        return "fp32"
    return precision
