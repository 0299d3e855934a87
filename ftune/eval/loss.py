"""Loss and perplexity of a model on a data loader: one implementation for training-time eval and `ftune eval`.

The next-token cross-entropy on full logits is defined here once; training's step loss (`train/losses.py`)
builds on it and passes its own (chunked) variant to `evaluate_loss`.
"""

import math
from collections.abc import Callable

import torch

from ftune.data.mask import IGNORE_INDEX
from ftune.model.dropout import eval_mode
from ftune.model.dtypes import DTYPES

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
"""Batch keys the model reads; packed batches carry position_ids (and a 4D mask, or none for flash-attn)."""

BatchLoss = Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]]
"""`loss(model, batch) -> {"loss": summed token loss, ...}`: `cross_entropy`, or training's `StepLoss`."""


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The batch tensors the model reads (not labels or token counts)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def text_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits of the text's own positions: the last `labels.size(1)` of them.

    Prompt tuning prepends virtual tokens to the input, so its logits are longer than the labels by that many
    leading positions, which have no label. For every other method this is the identity.
    """
    return logits[:, logits.size(1) - labels.size(1) :]


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's logits with token t+1's label, flattened to (tokens, vocab) and (tokens,)."""
    logits = text_logits(logits, labels)
    return logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over every label that is not IGNORE_INDEX, computed in fp32."""
    flat_logits, flat_labels = shifted(logits, labels)
    return torch.nn.functional.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX,
                                             reduction="sum")


def unfused_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens, from the full logits (in fp32)."""
    return unfused_token_logps(logits, labels).sum(1)


def unfused_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each labelled token's log-probability, [rows, length - 1] aligned with `labels[:, 1:]`, 0 where ignored."""
    logits, labels = text_logits(logits, labels)[:, :-1].float(), labels[:, 1:]
    learned = labels != IGNORE_INDEX
    token = torch.log_softmax(logits, dim=-1).gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return token * learned


def learned_token_count(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens of a batch carry a loss (the labels after the shift that are not ignored)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def cross_entropy(model, batch: dict) -> dict[str, torch.Tensor]:
    """The plain summed cross-entropy of a batch, from the model's full logits."""
    return {"loss": cross_entropy_sum(model(**model_inputs(batch)).logits, batch["labels"])}


@torch.no_grad()
def evaluate_loss(model, loader, max_batches: int = -1, loss: BatchLoss = cross_entropy) -> dict[str, float]:
    """Mean loss per learned token over the loader (summed over all processes), and its perplexity.

    Args:
        model: the model, on the device of this process's batches.
        loader: batches with `labels` (sharded over processes by accelerate when there are several).
        max_batches: stop after this many batches; -1 takes all.
        loss: the per-batch loss; training passes its own (chunked) one so evaluation holds no full logits.

    Returns:
        `{"loss", "ppl", "tokens"}`.
    """
    from accelerate import PartialState
    from accelerate.utils import reduce

    device = PartialState().device
    loss_sum, count = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    with eval_mode(model):
        for index, batch in enumerate(loader):
            if index == max_batches:
                break
            loss_sum += loss(model, batch)["loss"]
            count += learned_token_count(batch["labels"])
    loss_sum, count = reduce(loss_sum, "sum"), reduce(count, "sum")
    mean = (loss_sum / count.clamp(min=1)).item()
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": int(count.item())}


def on_this_process(loader):
    """`loader` sharded over the processes of the launch and moving its batches to this process's device."""
    from accelerate import PartialState
    from accelerate.data_loader import prepare_data_loader

    state = PartialState()
    return prepare_data_loader(loader, device=state.device, num_processes=state.num_processes,
                               process_index=state.process_index, put_on_device=True)


def autocast_forward(model, mixed_precision: str) -> None:
    """Run `model`'s forward under autocast with fp32 outputs, as accelerate prepares a model for training.

    A training run with `trainer.mixed_precision=bf16` evaluates under autocast; this makes `ftune eval` measure
    a model the same way (the wrapper is on this model object only). "no" leaves the model as it is.
    """
    from accelerate.utils import convert_outputs_to_fp32

    if mixed_precision == "no":
        return
    forward, device_type, dtype = model.forward, model.device.type, DTYPES[mixed_precision]

    def forward_under_autocast(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = convert_outputs_to_fp32(forward_under_autocast)
