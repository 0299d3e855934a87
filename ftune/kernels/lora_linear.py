"""PEFT's LoRA linear layer computed as one autograd node: base, adapter and dropout together.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as five autograd nodes per adapted layer, with
three output-sized temporaries (the LoRA product, its scaled copy, the sum), and autograd adds the two
branches' input gradients in the backward as a sixth. On short chat rows each of those ops is small and their
count, not the matmuls, sets the step time (docs/benchmarks.md, "Where the step goes"). `FusedLoraLinear`
computes the same function in one `torch.autograd.Function`:

    forward:   y = x W^T + b;  h = dropout(x) A^T;  y += s * h B^T          (in place: one addmm)
    backward:  g_h = s * g B;  grad_B = s * g^T h;  grad_A = g_h^T dropout(x)
               grad_x = g W + dropout'(g_h A)                                 (one addmm)

with s the LoRA scaling. The dropout is the one `use_sparse_dropout` folds into lora_A (`DroppedLinear`,
kernels/dropout.py): the same dropped positions, drawn from the same generator, so runs draw the same masks as
before, and resumed runs the same masks as uninterrupted ones. It keeps what PEFT's layer keeps for the
backward (the input, the rank-r product, the dropped positions), less one copy under autocast: PEFT casts a
16-bit input to the fp32 adapter dtype and back (`ftune plan` traces the layers a run uses, so it counts
what each keeps). Exact up to floating-point rounding (tests/kernels/test_lora_linear.py).

Sampling (`merged_for_sampling`, GRPO's completions) goes further: without gradient, nothing needs the rank-r
product, so each layer computes x (W + s B A)^T with the merged weight, one matmul per decoded token instead of
three, from a temporary copy of W made when sampling starts and dropped when it ends (PEFT's `merge_adapter`
would add and later subtract s B A in place, and the frozen base would drift by a rounding each time).

Hand-written because neither PEFT nor torch fuses a LoRA layer on CPU. PEFT's own forward runs wherever this one
does not apply: merged or disabled adapters, several active adapters, LoRA variants (DoRA), a LoRA bias, a
quantized or trainable base layer, mixed dtypes outside autocast, torch.compile (which fuses by itself), and a
dropout that `DroppedLinear` leaves to `F.dropout` (CUDA, p > 0.25).
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from ftune.kernels.dropout import (
    SPARSE_UP_TO,
    autocast_dtype,
    draws_positions,
    dropped_matmul_grads,
    dropped_positions,
    dropped_times,
)

NO_POSITIONS = torch.empty(0, dtype=torch.int64)
"""Stands for "no dropout" among the saved tensors (save_for_backward takes tensors only)."""


class _LoraMatmul(torch.autograd.Function):
    """y = F.linear(x, W, b) + s * (dropout(x) @ A^T) @ B^T for a frozen W and b (see the module docstring).

    x is a contiguous [tokens, in_features]; `positions` the flat indices the dropout zeroes (NO_POSITIONS: no
    dropout) and `keep` its scale 1 / (1 - p).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, positions, scaling: float, keep: float) -> torch.Tensor:
        hidden = F.linear(x, lora_a)
        if positions.numel():
            hidden = hidden.sub_(dropped_times(x, lora_a, positions)).mul_(keep)
        ctx.save_for_backward(x, weight, lora_a, lora_b, hidden, positions)
        ctx.scaling, ctx.keep = scaling, keep
        return F.linear(x, weight, bias).addmm_(hidden, lora_b.t(), alpha=scaling)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, lora_a, lora_b, hidden, positions = ctx.saved_tensors
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        grad_b = (grad.t() @ hidden).mul_(ctx.scaling) if needs_b else None
        grad_hidden = (grad @ lora_b).mul_(ctx.scaling)
        if positions.numel():
            lora_grad_x, grad_a = dropped_matmul_grads(x, lora_a, positions, grad_hidden.mul_(ctx.keep), needs_x,
                                                       needs_a)
        else:
            lora_grad_x = grad_hidden @ lora_a if needs_x else None
            grad_a = grad_hidden.t() @ x if needs_a else None
        grad_x = torch.addmm(lora_grad_x, grad, weight) if needs_x else None
        return grad_x, None, None, grad_a, grad_b, None, None, None


class FusedLoraLinear(LoraLinear):
    """PEFT's LoRA `Linear` whose forward is `_LoraMatmul` where it applies, PEFT's own forward elsewhere.

    Same parameters, state-dict keys, merge and unload as PEFT's layer: only the forward differs, which is why
    `use_fused_layers` can turn PEFT's layers into this class in place.
    """

    sampling_weights: dict | None = None
    """While `merged_for_sampling`: the merged weight W + s B A per dtype, made on first use."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if args or kwargs else self.fusable_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        if self.sampling_weights is not None and not torch.is_grad_enabled():
            return self.merged_forward(x, adapter)
        base, lora_a, lora_b = self.base_layer, self.lora_A[adapter], self.lora_B[adapter]
        p = getattr(lora_a, "p", 0.0) if self.training else 0.0
        weight, bias, a, b = base.weight, base.bias, lora_a.weight, lora_b.weight
        if (dtype := autocast_dtype(x)) is not None:  # the casts autocast makes for each linear of PEFT's layer
            x, weight, a, b = x.to(dtype), weight.to(dtype), a.to(dtype), b.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # a copy only for inputs that are not
        positions = dropped_positions(flat.numel(), p) if p > 0 else NO_POSITIONS
        with torch.autocast(x.device.type, enabled=False):
            out = _LoraMatmul.apply(flat, weight, bias, a, b, positions, self.scaling[adapter], 1.0 / (1.0 - p))
        return out.view(*x.shape[:-1], out.shape[-1])

    def merged_forward(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The layer's output x (W + s B A)^T + b, in the dtype the fused forward would compute in."""
        dtype = autocast_dtype(x) or x.dtype
        if dtype not in self.sampling_weights:
            base = self.base_layer.weight
            merged = torch.addmm(base, self.lora_B[adapter].weight.to(base.dtype),
                                 self.lora_A[adapter].weight.to(base.dtype), alpha=self.scaling[adapter])
            self.sampling_weights[dtype] = merged.to(dtype)
        bias = self.base_layer.bias
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.sampling_weights[dtype], None if bias is None else bias.to(dtype))

    def fusable_adapter(self, x: torch.Tensor) -> str | None:
        """The one active adapter `_LoraMatmul` computes exactly as PEFT would, or None (see the module docstring)."""
        if self.disable_adapters or self.merged or torch.compiler.is_compiling():
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or not fuses(self, active[0], x.device.type):
            return None
        adapter = active[0]
        base, lora_a, lora_b = self.base_layer, self.lora_A[adapter], self.lora_B[adapter]
        p = getattr(lora_a, "p", 0.0)
        if self.training and p > 0 and not draws_positions(x, p):
            return None
        same_dtype = x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype
        return adapter if same_dtype or autocast_dtype(x) is not None else None


def fuses(layer: nn.Module, adapter: str, device: str) -> bool:
    """Whether `layer` trains `adapter` through `_LoraMatmul` on `device` (for inputs of one dtype or autocast).

    A vanilla adapter (no variant, no LoRA bias) on a frozen plain nn.Linear with no dropout of its own (none, or
    folded into lora_A by `use_sparse_dropout`) drawn as positions: on CPU up to SPARSE_UP_TO (`draws_positions`).
    """
    if not isinstance(layer, FusedLoraLinear) or adapter not in layer.lora_A:
        return False
    base = layer.base_layer
    p = getattr(layer.lora_A[adapter], "p", 0.0)
    return (isinstance(layer.lora_dropout[adapter], nn.Identity) and adapter not in layer.lora_variant
            and not layer.lora_bias.get(adapter)
            and type(base) is nn.Linear and not any(t.requires_grad for t in (base.weight, base.bias) if t is not None)
            and (p == 0 or (device == "cpu" and p <= SPARSE_UP_TO)))


def use_fused_layers(model: nn.Module) -> int:
    """Turn each of PEFT's LoRA layers over a plain nn.Linear into a `FusedLoraLinear`; returns how many.

    A class change in place, not a copy: the subclass adds a forward and no state, so parameters, hooks and
    PEFT's bookkeeping stay as PEFT built them, and adapters added later (a reference copy) join the same layer.
    Layers over bitsandbytes' quantized linears (their own PEFT classes) and over fused MoE experts are left as
    they are. Each layer still runs PEFT's own forward wherever the fused one does not apply (`fusable_adapter`).
    """
    swapped = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.get_base_layer()) is nn.Linear:
            module.__class__ = FusedLoraLinear
            swapped += 1
    return swapped


@contextmanager
def merged_for_sampling(model: nn.Module):
    """Within: each `FusedLoraLinear` computes without gradient with its adapter merged (see the module docstring).

    The merged weights live until the context ends, so the weights must not change inside it (sampling only).
    A model with no fused layer (PEFT's own layers, kernels off) samples as it is.
    """
    layers = [module for module in model.modules() if isinstance(module, FusedLoraLinear)]
    for layer in layers:
        layer.sampling_weights = {}
    try:
        yield
    finally:
        for layer in layers:
            layer.sampling_weights = None
