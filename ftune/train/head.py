"""The model's output head, taken apart so the loss can apply it chunk by chunk (`train/chunked.py`).

The decoder runs as usual, through every wrapper (accelerate's autocast, DDP, PEFT, prompt tuning's virtual
tokens); a forward pre-hook on the head takes the last hidden states and hands the head an empty slice of them,
so the model computes no logits. The head is then rewritten as linear terms over those hidden states.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora import Linear as LoraLinear

from ftune.compat import module_to_run
from ftune.model.instrument import Change
from ftune.train.chunked import LinearHead

HEAD_CAPTURE = Change("the head's input taken for the chunked loss, the head given no positions",
                      "forward pre-hook on the output head, during each training forward", "train/head.py")
"""What `captured_head_input` puts on the model, for the run's list of changes (`ftune.model.instrument`)."""


@contextmanager
def captured_head_input(head: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, calls of `head` record their input in the yielded list and compute on zero positions.

    A pre-hook is the public way to see the head's input without editing the model: transformers' causal LMs
    compute `lm_head(hidden_states)` inside their forward, with no switch to skip it.
    """
    captured: list[torch.Tensor] = []

    def take(_module, args):
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield captured
    finally:
        handle.remove()


def unsupported_reason(head: torch.nn.Module) -> str | None:
    """Why the chunked loss cannot take this head apart (None when it can): checked once, at setup."""
    head = module_to_run(head)  # a PEFT `modules_to_save` head: the copy it runs
    if isinstance(head, LoraLinear):
        if head.lora_variant or any(head.lora_bias.values()):
            return "LoRA variants (DoRA) and lora_bias on the output head"
        head = head.get_base_layer()
    if type(head) is not torch.nn.Linear:
        return f"an output head of type {type(head).__name__}"
    if type(head.weight) is not torch.nn.Parameter or head.weight.numel() != head.in_features * head.out_features:
        return "a sharded output head (FSDP, ZeRO-3)"
    return None


def linear_head(head: torch.nn.Module, hidden: torch.Tensor, dtype: torch.dtype | None) -> LinearHead:
    """The head applied to `hidden` (tokens x hidden size) as linear terms, exactly as its forward computes it.

    A LoRA head adds one term per active adapter, `(lora_A(dropout(hidden)) * scaling, lora_B.weight)`: PEFT's
    `lora.Linear.forward` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`, rewritten here so lora_B's
    matmul joins the chunked one. The small lora_A part runs under the model's autocast dtype, as it would
    inside the model's forward.
    """
    head = module_to_run(head)  # a PEFT `modules_to_save` head: the copy it runs
    inputs, weights = [hidden], []
    if isinstance(head, LoraLinear) and not (head.disable_adapters or head.merged):
        with torch.autocast(hidden.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for name in head.active_adapters:
                if name in head.lora_A:
                    down = head.lora_A[name](head.lora_dropout[name](hidden)) * head.scaling[name]
                    inputs.append(down)
                    weights.append(head.lora_B[name].weight)
    base = head.get_base_layer() if isinstance(head, LoraLinear) else head
    return LinearHead(tuple(inputs), (base.weight, *weights), base.bias, dtype)
