"""Config dtype names and the torch dtypes they stand for, and what `trainer.mixed_precision=auto` means here.

The names are shared by model loading and quantization.
"""

import os
from pathlib import Path

import torch

from ftune.device import local_device
from ftune.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""/proc/cpuinfo flags of CPUs with bf16 matmul instructions (x86 AVX512-BF16 and AMX; Arm's `bf16` feature)."""
CPU_BF16_ENV = "FTUNE_CPU_BF16"
"""`1` or `0`: whether to take this CPU as one with bf16 instructions, whatever /proc/cpuinfo says."""


def native_mixed_precision(device: str | None = None) -> str:
    """The autocast dtype `trainer.mixed_precision=auto` resolves to: the fastest one `device` computes.

    CUDA: bf16 where the GPU has it (Ampere and later; assumed when planning for a GPU this machine lacks),
    else fp16. CPU: bf16 only with native bf16 matmul instructions. Without them torch emulates bf16, several
    times slower than fp32 (docs/benchmarks.md, "GEMM rates"), so autocast would only slow the run. `device`
    None: the one a run here would use.

    `FTUNE_CPU_BF16=1` (or `0`) takes the CPU as one with (or without) bf16 instructions: the switch to run the
    test suite here as it runs on the other kind of machine (`FTUNE_CPU_BF16=1 python -m pytest`; bf16 is then
    emulated, and slow, where the CPU lacks it).

    Raises:
        ConfigError: FTUNE_CPU_BF16 is set to something other than 0 or 1.
    """
    device = device or local_device()
    if device == "cuda":
        return "fp16" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bf16"
    return "bf16" if cpu_has_bf16() else "no"


def quant_compute_dtype(name: str, device: str | None = None) -> torch.dtype:
    """`quant.compute_dtype` as a torch dtype; `auto`: bf16 where `device` computes it natively, else fp32.

    Not fp16 on GPUs without bf16: QLoRA's dequantized matmuls can overflow in fp16. On a CPU without bf16
    instructions bf16 is emulated, a small fraction of fp32's rate (docs/benchmarks.md, "GEMM rates"), which
    made a tiny QLoRA step take seconds.
    """
    if name == "auto":
        return torch.bfloat16 if native_mixed_precision(device) == "bf16" else torch.float32
    return DTYPES[name]


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 matmuls natively: FTUNE_CPU_BF16 when set, else its /proc/cpuinfo flags.

    Raises:
        ConfigError: FTUNE_CPU_BF16 is set to something other than 0 or 1.
    """
    told = os.environ.get(CPU_BF16_ENV, "")
    if told not in ("", "0", "1"):
        raise ConfigError(f"{CPU_BF16_ENV}={told}", "expected 1 to take the CPU as one with bf16 instructions, "
                          "0 as one without, or unset to read /proc/cpuinfo")
    if told:
        return told == "1"
    return bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (`flags` on x86, `Features` on Arm); empty where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()
