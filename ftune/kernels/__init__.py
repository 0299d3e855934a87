"""CPU kernels: what ftune computes its own way to train faster on a CPU, switched by `trainer.cpu_kernels`.

- `lora_linear.py`: PEFT's LoRA linear layer computed as one autograd node (`FusedLoraLinear`).
- `dropout.py`: LoRA dropout drawn as dropped positions and folded into lora_A (`DroppedLinear`, `SparseDropout`).
- `host_memory.py`: glibc's malloc told to keep freed blocks, so micro-batches reuse them.

Each computes what PEFT's or torch's own code computes, up to floating-point rounding (tests/kernels/), and each
says in its docstring why no library does it. `auto` (the default) turns them on for training on a CPU and off
elsewhere: on a GPU, torch's and PEFT's kernels are already the fast path. `ftune.model.instrument` installs the
model's kernels with every other change ftune makes to a model, and lists them; `ftune plan` builds its model
through the same function, so it counts what they keep.
"""

def kernels_on(setting: str, device: str) -> bool:
    """Whether a run on `device` (`cpu`, `cuda`, ...) uses the kernels: `on`, or `auto` on a CPU."""
    return setting == "on" or (setting == "auto" and device == "cpu")
