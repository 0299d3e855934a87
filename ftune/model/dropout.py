"""Dropout switched off for the forwards that must not draw masks, in a training run and in its probes.

The CPU kernels' own dropout modules (`ftune.kernels.dropout`) are turned off here with torch's.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ftune.kernels.dropout import DroppedLinear


def disable_dropout(model: nn.Module) -> None:
    """Turn every dropout of `model` off, in training mode too: torch's and ftune's modules, and attention's rate.

    What TRL does for preference tuning, so that the policy equals the reference at step 0. Transformers' attention
    modules keep their dropout as a float they pass to the attention kernel while training.
    """
    for module in model.modules():
        if isinstance(module, (nn.Dropout, DroppedLinear)):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with `model` in eval mode (no dropout), then give it back in the mode it was in.

    For forwards inside a training run that must not draw masks: evaluation, probes, the reference table,
    sampled answers. The mode comes back even when the block raises.
    """
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
