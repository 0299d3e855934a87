"""`trainer.mixed_precision=auto`: the autocast dtype the device computes natively."""

import pytest

from ftune.model import dtypes


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "avx512f"}, "no"),  # bf16 would be emulated: 3-4.5x slower matmuls than fp32
    ({"avx512f", "avx512_bf16"}, "bf16"),
    ({"amx_bf16", "amx_tile"}, "bf16"),
    ({"asimd", "bf16"}, "bf16"),  # Arm's feature name
    (set(), "no"),
])
def test_cpu_autocast_follows_the_bf16_instructions(monkeypatch, flags, expected):
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: flags)
    assert dtypes.native_mixed_precision("cpu") == expected


def test_planning_for_a_gpu_this_machine_lacks_assumes_bf16(monkeypatch):
    monkeypatch.setattr(dtypes.torch.cuda, "is_available", lambda: False)
    assert dtypes.native_mixed_precision("cuda") == "bf16"


def test_a_run_here_uses_the_cpu_without_a_gpu_or_when_told(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: set())
    monkeypatch.setattr(dtypes.torch.cuda, "is_available", lambda: False)
    assert dtypes.native_mixed_precision() == "no"
    monkeypatch.setattr(dtypes.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert dtypes.native_mixed_precision() == "no"


def test_this_machine_has_flags():
    """/proc/cpuinfo is read (on Linux every CPU lists flags or features)."""
    assert dtypes.cpu_flags()
