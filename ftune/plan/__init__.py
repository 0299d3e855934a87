"""`ftune plan`'s estimates, made without weights: what a run will need before it loads anything.

- `estimate.py`: the plan of a run (parameters, memory per GPU, what changes it), its table and JSON;
- `meta.py`: the run's model built on the meta device, with its adapters and quantized layers as the run has them;
- `trace.py`: one step of the run's own loss traced on fake tensors, every tensor autograd keeps counted;
- `memory.py`: the arithmetic of storage, gradients and optimizer state per trainable weight.
"""
