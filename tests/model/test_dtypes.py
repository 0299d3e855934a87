"""`trainer.mixed_precision=auto`: the autocast dtype the device computes natively."""

import pytest

from ftune.errors import ConfigError
from ftune.model import dtypes


@pytest.fixture(autouse=True)
def cpu_as_detected(monkeypatch):
    """These tests are about the detection: FTUNE_CPU_BF16 (which a whole test session may set) is not."""
    monkeypatch.delenv(dtypes.CPU_BF16_ENV, raising=False)


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


@pytest.mark.parametrize(("told", "expected"), [("1", "bf16"), ("0", "no")])
def test_ftune_cpu_bf16_overrides_the_cpu_flags(monkeypatch, told, expected):
    """The switch that runs the suite here as on the other kind of CPU (with or without bf16 instructions)."""
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: {"avx512_bf16"} if expected == "no" else {"avx2"})
    monkeypatch.setenv(dtypes.CPU_BF16_ENV, told)
    assert dtypes.native_mixed_precision("cpu") == expected


def test_ftune_cpu_bf16_takes_only_0_or_1(monkeypatch):
    monkeypatch.setenv(dtypes.CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="FTUNE_CPU_BF16=yes"):
        dtypes.native_mixed_precision("cpu")


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
