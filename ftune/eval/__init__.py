"""Evaluation: held-out loss, the forgetting probe, generations and lm-eval tasks, for `ftune eval` and the loop.

Nothing here creates an `Accelerator`: evaluation runs on accelerate's process state (`PartialState`: device,
rank, world size), which holds no precision or compilation settings, so a training run may follow an
evaluation in the same process with any settings of its own.
"""
