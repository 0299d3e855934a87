"""Library output that would stand in front of ftune's own first line is silenced at its source.

On CPUs with AVX512-BF16, importing bitsandbytes asks the `kernels` package for an optional hub kernel
(`get_kernel("kernels-community/quantization-bitsandbytes")`); with HF_HUB_OFFLINE=1, as CI and offline users
run, `kernels` logs that it skips the publisher check. The CPU here may lack AVX512-BF16, so the test makes the
same call bitsandbytes makes, with and without `ftune.cli.quiet_libraries`.
"""

import os
import subprocess
import sys

import pytest

CALL = """
import sys
if sys.argv[1] == "quiet":
    from ftune.cli import quiet_libraries
    quiet_libraries()
from kernels import get_kernel
try:
    get_kernel("kernels-community/quantization-bitsandbytes", version=1)
except Exception:
    pass  # not in the local cache: bitsandbytes falls back to its own kernel
"""


def stderr_of_the_bitsandbytes_kernel_lookup(mode: str) -> str:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", CALL, mode], env=env, capture_output=True, text=True,
                          timeout=120, check=True).stderr


@pytest.mark.parametrize("mode, noisy", [("loud", True), ("quiet", False)])
def test_the_offline_kernel_lookup_prints_nothing_once_ftune_quiets_libraries(mode, noisy):
    assert ("Skipping publisher trust check" in stderr_of_the_bitsandbytes_kernel_lookup(mode)) is noisy


def test_a_training_run_prints_no_library_output(tmp_path):
    """The weight-loading bar of transformers and its v6 deprecation notes on PEFT's calls are silenced."""
    command = [sys.executable, "-m", "ftune", "train", "recipe=tiny_lora", "trainer.max_steps=1",
               "trainer.eval_every=0", "model.gradient_checkpointing=true", f"output_dir={tmp_path / 'run'}"]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "Loading weights" not in output and "Warning" not in output, output
