"""keep_freed_host_memory: freed activation-sized blocks are reused, not returned to the system and faulted in again.

The blocks are taken from glibc's malloc directly (as torch's CPU allocator takes them), so each step allocates the
same ten blocks and nothing else. Through torch, the tensors' own small allocations land among the blocks at
places that vary with address-space randomisation, the hash seed and thread scheduling: glibc's default then
sometimes kept the blocks too, and the same comparison failed or passed from one run to the next.
"""

import resource
import subprocess
import sys

import pytest

BLOCKS, BLOCK_BYTES = 10, 6 * 2**20
"""A step's activations: ten 6 MiB blocks written, then all freed together."""
LATER_STEPS = 5

FAULTS_OF_STEPS = f"""
import ctypes, resource, sys
from ftune.kernels.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def step_faults() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # this process's own page faults
    blocks = [libc.malloc({BLOCK_BYTES}) for _ in range({BLOCKS})]
    for block in blocks:
        ctypes.memset(block, 1, {BLOCK_BYTES})
    for block in blocks:
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

step_faults()  # the heap grows the first time either way
print(*[step_faults() for _ in range({LATER_STEPS})])
"""


def later_steps_faults(mode: str) -> list[int]:
    """The pages each step after the first faults in, in a fresh process (`keep`: after keep_freed_host_memory)."""
    done = subprocess.run([sys.executable, "-c", FAULTS_OF_STEPS, mode], capture_output=True, text=True, check=True)
    return [int(faults) for faults in done.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_later_steps_fault_in_no_fresh_pages():
    """Kept, the blocks come back without a fault; by default glibc returns them, and every step faults them in.

    Measured: 15,328 pages a step by default (the ten blocks, less the 128 KiB glibc keeps
    at the top of its heap), 0 kept.
    """
    block_pages = BLOCK_BYTES // resource.getpagesize()
    assert later_steps_faults("keep") == [0] * LATER_STEPS
    assert min(later_steps_faults("default")) >= block_pages
