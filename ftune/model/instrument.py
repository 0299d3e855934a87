"""Everything ftune puts on a model beyond what transformers and PEFT build, installed in one place and listed.

Stepping through `model(**inputs)` shows transformers' and PEFT's code; what else runs in it is here, one line
each, with the module that says why. The start table of `ftune train` prints the list and summary.json keeps it
(`model_changes`), so a result can be read against what computed it. `ftune plan` builds its meta model through
this function too, so it plans what a run computes.

The output head's input is also taken, during each training forward, by a pre-hook that the chunked loss opens and
closes around the forward (`ftune.train.head.captured_head_input`); the training objective adds that line.
"""

import dataclasses
from dataclasses import dataclass

from torch import nn

from ftune.compat import neftune_noise
from ftune.kernels.dropout import use_sparse_dropout
from ftune.kernels.host_memory import keep_freed_host_memory
from ftune.kernels.lora_linear import use_fused_layers
from ftune.model.attention import isolate_sliding_windows
from ftune.model.moe import record_router_logits
from ftune.model.quant import disable_cpu_inference_repacking

CHANGES_ATTRIBUTE = "ftune_changes"
"""Where `instrument` leaves its list on the model (PEFT's and accelerate's wrappers forward to it)."""


@dataclass(frozen=True)
class Change:
    """One thing ftune put on a model: what it does, where it sits, and the module that says why."""

    what: str
    where: str
    source: str

    def line(self) -> str:
        """One line of the start table."""
        return f"{self.what}: {self.where} ({self.source})"

    def as_record(self) -> dict[str, str]:
        """For summary.json."""
        return dataclasses.asdict(self)


def instrument(model: nn.Module, *, trains: bool = False, kernels: bool = False, neftune_alpha: float = 0.0
               ) -> list[Change]:
    """Install every hook, module swap and setting ftune puts on `model`, and return (and keep) the list.

    Args:
        model: a loaded causal LM, or the PeftModel around one (built, adapters attached).
        trains: the model trains: its MoE routers are recorded for the balancing loss (`model/moe.py`).
        kernels: use ftune's CPU kernels (`trainer.cpu_kernels`, ftune/kernels/) on its LoRA layers.
        neftune_alpha: NEFTune's noise on the input embeddings of a model that trains (`trainer.neftune_alpha`;
            transformers' hook, which adds it in training mode only, so evaluation and sampling see none).

    Call it once per model, when the model is built and before any forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    changes = []
    if repacked := disable_cpu_inference_repacking(base):
        changes.append(Change("bitsandbytes' CPU inference repacking turned off",
                              f"{repacked} 4-bit linear layers", "model/quant.py"))
    if isolate_sliding_windows(base):
        changes.append(Change("packed rows' 4D masks narrowed to each layer's sliding window",
                              "forward pre-hook on the decoder", "model/attention.py"))
    if trains and (routers := record_router_logits(base)):
        changes.append(Change("router logits recorded for the load-balancing loss",
                              f"forward hooks on {routers} routers, a pre-hook on the decoder", "model/moe.py"))
    if trains and neftune_alpha:
        neftune_noise(base, neftune_alpha)
        changes.append(Change(f"NEFTune noise (alpha {neftune_alpha}) on the input embeddings in training forwards",
                              "forward hook on the input embeddings", "transformers.integrations.neftune"))
    if kernels and (fused := use_fused_layers(model)):
        changes.append(Change("LoRA layer computed as one autograd node",
                              f"{fused} LoRA linear layers made FusedLoraLinear", "kernels/lora_linear.py"))
    if kernels and (dropouts := use_sparse_dropout(model)):
        changes.append(Change("LoRA dropout drawn as dropped positions",
                              f"{dropouts} dropouts folded into lora_A or made SparseDropout", "kernels/dropout.py"))
    setattr(model, CHANGES_ATTRIBUTE, changes)
    return changes


def instrument_process(kernels: bool) -> list[Change]:
    """The CPU kernels' one process-wide setting (kernels/host_memory.py), made and listed like the model's changes."""
    if kernels and keep_freed_host_memory():
        return [Change("freed memory kept for the next micro-batch", "glibc malloc of this process (mallopt)",
                       "kernels/host_memory.py")]
    return []


def model_changes(model: nn.Module) -> list[Change]:
    """The list `instrument` left on `model` (empty for a model it did not see)."""
    return list(getattr(model, CHANGES_ATTRIBUTE, []))
