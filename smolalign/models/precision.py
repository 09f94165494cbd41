"""The precision a device trains and infers in: float32 master weights everywhere, half-precision autocast where
the hardware computes it natively.

- CUDA GPUs: bf16 autocast where the GPU has native bf16 (Ampere and later), else fp16 with Accelerate's
  gradient scaler (a T4).
- CPUs: bf16 autocast where the CPU has native bf16 matmuls (Intel AMX, AVX512-BF16 on Intel and AMD Zen 4
  and later, BF16 on ARM64), else float32: emulated bf16 is slower than float32. `cpu_native_bf16` decides from
  the features PyTorch reports on any OS, confirmed by a short timed matmul and kept per machine;
  `SMOLALIGN_CPU_BF16=0` or `=1` overrides it.

Under autocast the log-softmax of the output head, the losses and the reductions stay in float32
(core/logprobs.py). LoRA keeps its frozen base weights in the half precision and only the adapters in float32.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from collections.abc import Mapping
from typing import Any

import torch

from smolalign.errors import UserError
from smolalign.models.embedded import cache_root

log = logging.getLogger("smolalign")

CPU_BF16_OVERRIDE = "SMOLALIGN_CPU_BF16"
# torch.cpu.get_capabilities() names of native bf16 matmuls: AMX and AVX512-BF16 (x86), BF16 and SVE-BF16 (ARM64)
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")
NATIVE_SPEEDUP = 1.3  # a bf16 matmul at least this much faster than float32 is native, not emulated


def native_bf16() -> bool:
    """Whether the CUDA GPU computes in bf16 natively (Ampere and later). A T4 reports bf16 as supported
    when emulation counts, and emulated bf16 is slower than float32 there."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: its features say so and a timed matmul confirms it (the answer is
    kept in the cache folder per CPU model and PyTorch version), unless SMOLALIGN_CPU_BF16 says otherwise."""
    override = os.environ.get(CPU_BF16_OVERRIDE)
    if override in ("0", "1"):
        return override == "1"
    if not cpu_bf16_features():
        return False
    record = cache_root() / "cpu-bf16.json"
    key = f"{_cpu_model()} | torch {torch.__version__}"
    known = json.loads(record.read_text()) if record.is_file() else {}
    if key not in known:
        speedup = bf16_speedup()
        known[key] = speedup >= NATIVE_SPEEDUP
        log.info("this CPU multiplies bf16 %.1fx as fast as float32: %s", speedup,
                 "native bf16, trained under bf16 autocast" if known[key] else "kept in float32")
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(known))
    return known[key]


def bf16_speedup(size: int = 768, repeats: int = 5) -> float:
    """The float32 time of a square matmul over its bf16 time, each the fastest of `repeats` (no random numbers,
    so a seeded run's generator is untouched)."""
    a = torch.linspace(-1, 1, size * size).reshape(size, size)

    def fastest(x: torch.Tensor) -> float:
        x @ x  # warm-up: the kernel's first call may select or pack
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    return fastest(a) / fastest(a.bfloat16())


def cpu_bf16_features() -> set[str]:
    """This CPU's native bf16 features (CPU_BF16_FEATURES) as PyTorch's cpuinfo reports them, on Linux, Windows and
    macOS alike; none where this PyTorch is older than `torch.cpu.get_capabilities`."""
    return {feature for feature in CPU_BF16_FEATURES if _cpu_capabilities().get(feature) is True}


def _cpu_capabilities() -> Mapping[str, Any]:
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    return get_capabilities() if get_capabilities is not None else {}


def _cpu_model() -> str:
    return _cpu_capabilities().get("cpu_name") or platform.processor()


def half_precision(device: torch.device) -> str | None:
    """The half precision `device` computes natively: "bf16", "fp16" (a GPU without bf16) or None (a CPU without
    native bf16)."""
    if device.type == "cuda":
        return "bf16" if native_bf16() else "fp16"
    return "bf16" if cpu_native_bf16() else None


def resolve_precision(requested: str, device: torch.device, *, lora: bool) -> tuple[torch.dtype, str]:
    """Weights dtype and Accelerate mixed precision for training.

    float32 master weights under autocast in half precision, as TRL trains, since AdamW on half-precision
    weights loses small updates: `auto` takes the device's native half precision (`half_precision`), or none.
    Under LoRA the frozen base weights are stored in that half precision and only the adapters are float32.
    `bfloat16` and `float16` force that autocast (float16 on a GPU only: it is how older cards train);
    `float32` turns autocast off.
    """
    if requested == "float32":
        return torch.float32, "no"
    if requested == "float16" and device.type != "cuda":
        raise UserError("dtype float16 is not supported on the CPU; use bfloat16, float32 or auto.")
    if requested == "bfloat16" and device.type == "cuda" and not native_bf16():
        raise UserError("dtype bfloat16 was asked for but this GPU has no native bf16 (it would be emulated); "
                        "use float16 or auto.")
    if requested == "bfloat16" and device.type == "cpu" and not cpu_native_bf16():
        log.warning("bfloat16 on this CPU is emulated and usually slower than float32")
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(requested) or half_precision(device)
    if precision is None:
        return torch.float32, "no"
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    return (half if lora else torch.float32), precision


def held_out_autocast(device: torch.device, dtype: torch.dtype, mixed_precision: str) -> bool:
    """Whether a run scores its held-out pairs under its training autocast: on GPUs (as TRL evaluates), and
    where the weights themselves are half precision (LoRA's frozen base). Otherwise CPUs score them in float32,
    as `smolalign eval` does (`resolve_dtype`), so a run's eval_* lines and `smolalign eval` of its final
    model agree."""
    return device.type == "cuda" or mixed_precision == "no" or dtype != torch.float32


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Weights dtype for inference (eval, generation, the judge, chat): `auto` is bf16 on CUDA GPUs that have it
    natively and float32 elsewhere. CPUs infer in float32 even where they train in bf16: inference there is
    mostly batched generation, whose answers equal one-at-a-time generation's only in float32 (a bf16 batch
    rounds about 2% of the top logit away from a one-row run)."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" and native_bf16() else torch.float32
    if requested == "float16" and device.type == "cpu":
        raise UserError("dtype float16 is not supported on the CPU; use float32 (or auto).")
    if requested == "bfloat16" and device.type == "cpu" and not cpu_native_bf16():
        log.warning("bfloat16 on this CPU is emulated and usually slower than float32")
    return getattr(torch, requested)
