"""LoRA dropout that draws the dropped positions, not one random number per element, folded into lora_A.

LoRA dropout on CPU at a fraction of torch's cost, with the same distribution.

PEFT's LoRA applies `nn.Dropout(p)` to the full input of every adapted layer, and torch draws one
Mersenne-Twister number per element on CPU (20-30 ns each, on one thread). On a 100M-parameter model that
costs about as much as the adapted layer's own matmul. The dropped positions of an i.i.d. Bernoulli(p)
sequence are the running sums of i.i.d. Geometric(p) gaps, so drawing about p*n gaps instead of n uniforms
gives exactly the same distribution of masks with p*n draws (20x fewer at p=0.05).

Where PEFT computes `lora_A(dropout(x))` (vanilla LoRA), the mask is never applied to x: `DroppedLinear` takes
lora_A's place and computes s * (x @ A^T - x_D @ A^T), x_D the dropped entries alone (an embedding bag over
p*n entries), s = 1/(1-p) on the rank-r output. No dropped copy of x is made in the forward nor kept for the
backward (in fp32, lora_A keeps the input it shares with its neighbours, as without dropout); the backward
zeroes the input's gradient in place and makes one transient zeroed copy of x for A's gradient, whose buffer
then holds the input's gradient. LoRA variants (DoRA) read lora_A's weight and the dropout themselves: there
`SparseDropout` applies the mask as one scaled copy and a scatter of zeros.

This is why it is hand-written: torch's CPU dropout has no such path, no library offers one, and PEFT's layer
forward can only be changed through the modules it calls. On other devices (CUDA's Philox dropout is fused and
cheap), for large p (where p*n gaps cost as much as n uniforms) and inside torch.compile (data-dependent sizes
would break the graph) both call `F.dropout`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftune.compat import fake_mode_active

SPARSE_UP_TO = 0.25
"""Largest p for which drawing gaps beats drawing one number per element (measured: ~1 gap costs ~4 uniforms)."""
BLOCK_MARGIN = 6.0
"""Gaps drawn per block: the expected count plus this many standard deviations (plus 16)."""


def dropped_positions(numel: int, p: float) -> torch.Tensor:
    """Sorted flat indices, in [0, numel), of the elements an i.i.d. Bernoulli(p) mask drops.

    Gaps between consecutive dropped elements are Geometric(p) on {1, 2, ...}: position k (1-based) is the
    sum of the first k gaps. Draws in blocks of the expected count plus six standard deviations until the
    sum passes `numel`, so the result is exact whatever the draw (a second block is needed about once in 10^9).
    Draws from the global CPU generator, whose state ftune's checkpoints save: resumed runs draw the same masks.
    On fake tensors (`ftune plan`'s trace, plan/trace.py), which hold no values to draw, the expected number.
    """
    expected = numel * p
    if fake_mode_active():
        return torch.empty(round(expected), dtype=torch.int64)
    block = max(1, int(expected + BLOCK_MARGIN * math.sqrt(expected * (1 - p)) + 16))
    ends, reached = [], 0
    while reached <= numel:
        block_ends = geometric_gaps(block, p).cumsum_(0).add_(reached)
        ends.append(block_ends)
        reached = int(block_ends[-1])
    positions = torch.cat(ends) if len(ends) > 1 else ends[0]
    return positions[: int(torch.searchsorted(positions, numel, right=True))].sub_(1)


def geometric_gaps(count: int, p: float) -> torch.Tensor:
    """`count` Geometric(p) draws on {1, 2, ...}, by inversion: 1 + floor(log(u) / log(1 - p)), u in (0, 1].

    P(gap > k) = P(u <= (1 - p)^k) = (1 - p)^k, the geometric law. Float64 uniforms (53 bits) keep the tail exact
    far beyond any gap that occurs; this is about twice as fast on CPU as torch's `geometric_`, which evaluates
    the same formula element by element.
    """
    uniform = torch.rand(count, dtype=torch.float64).neg_().add_(1)  # [0, 1) -> (0, 1]
    return uniform.log_().div_(math.log1p(-p)).floor_().add_(1).to(torch.int64)


def scale_and_zero(values: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """`values * scale` with the elements at flat `positions` set to zero (a new contiguous tensor)."""
    return zero_at(values.contiguous() * scale, positions)


class _DropAt(torch.autograd.Function):
    """y = x * scale, zero at `positions`; its gradient is the same map of the incoming gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return scale_and_zero(x, positions, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        return scale_and_zero(grad, positions, ctx.scale), None, None


def draws_positions(x: torch.Tensor, p: float) -> bool:
    """Whether dropout at `p` on `x` draws positions (see the module docstring for the cases that do not)."""
    return x.device.type == "cpu" and p <= SPARSE_UP_TO and x.numel() > 0 and not torch.compiler.is_compiling()


class SparseDropout(nn.Dropout):
    """`nn.Dropout(p)` whose CPU training path draws dropped positions (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if not draws_positions(x, self.p):
            return F.dropout(x, self.p, True, self.inplace)  # a compiled graph fuses its own mask
        return _DropAt.apply(x, dropped_positions(x.numel(), self.p), 1.0 / (1.0 - self.p))


class _DroppedMatmul(torch.autograd.Function):
    """y = dropout(x) @ W^T for the dropout that zeroes x at flat `positions` and scales the rest by s.

    With x_D holding only x's entries at `positions`, dropout(x) = s * (x - x_D), so
        y      = s * (x @ W^T - x_D @ W^T)
        grad_x = (s * g) @ W, zeroed at `positions`
        grad_W = (s * g)^T @ (x zeroed at `positions`)
    The forward's x_D term is sparse (about p * numel entries) and the scale multiplies rank-r tensors only, so
    no dropped copy of x is kept from the forward to the backward and the gradient is zeroed in place. grad_W
    zeroes a transient copy of x: measured faster on CPU than its sparse form, a scatter-add of p * numel rows of
    r values (`(s * g)^T @ x - (s * g)^T @ x_D`). x is a contiguous [tokens, in_features]; W is [r, in_features].
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, positions)
        ctx.scale = scale
        return (F.linear(x, weight) - dropped_times(x, weight, positions)) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, positions = ctx.saved_tensors
        grad_x, grad_weight = dropped_matmul_grads(x, weight, positions, grad * ctx.scale, *ctx.needs_input_grad[:2])
        return grad_x, grad_weight, None, None


def dropped_matmul_grads(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, grad: torch.Tensor,
                         needs_x: bool, needs_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_W) of y = (x zeroed at flat `positions`) @ W^T, given y's gradient `grad` (scale applied).

    grad_W zeroes a transient copy of x; grad_x then overwrites that copy, which grad_W no longer needs: one
    full-size buffer, not two. Either is None where it is not needed.
    """
    dropped = zero_at(x.clone(), positions) if needs_weight else None
    grad_weight = None if dropped is None else grad.t() @ dropped
    if not needs_x:
        return None, grad_weight
    grad_x = torch.mm(grad, weight, out=dropped) if dropped is not None else grad @ weight
    return zero_at(grad_x, positions), grad_weight


def zero_at(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`values` (contiguous), its elements at flat `positions` set to zero in place."""
    values.view(-1).index_fill_(0, positions, 0)
    return values


def dropped_times(x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x_D @ W^T, one bag of W's columns per row of x, weighted by x's dropped entries (an embedding bag).

    `positions` are sorted, so each row's dropped entries are contiguous and the bags start at row boundaries.
    """
    tokens, features = x.shape
    columns = positions.remainder(features)
    starts = torch.searchsorted(positions, torch.arange(tokens, device=x.device) * features)
    return F.embedding_bag(columns, weight.t().contiguous(), starts, mode="sum",
                           per_sample_weights=x.view(-1).index_select(0, positions))


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype an autocast region casts `x` to for a linear (None outside autocast; CPU autocast leaves fp64)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device)


class DroppedLinear(nn.Linear):
    """PEFT's `lora_A` with the LoRA dropout of its input folded in: `lora_A(dropout(x))` as one sparse product.

    The same weight (and state-dict key), so PEFT's merge, save and load see a plain linear. Dropped positions
    come from `dropped_positions`, as in SparseDropout: the same masks from the same generator state. In eval it
    is the plain linear; where SparseDropout would call `F.dropout`, this calls it too, then the plain linear.
    """

    def __init__(self, linear: nn.Linear, p: float):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias, self.p = linear.weight, linear.bias, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(x)
        if not draws_positions(x, self.p):
            return super().forward(F.dropout(x, self.p, True))
        return dropped_linear(x, self.weight, self.bias, self.p)


def dropped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: float) -> torch.Tensor:
    """`F.linear(F.dropout(x, p), weight, bias)` for any leading shape, in the dtype nn.Linear has under autocast.

    A custom Function's ops run in the dtypes they are given, so the casts autocast applies to a linear are made
    here, and autocast is off inside (embedding_bag would otherwise run in fp32).
    """
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # a copy only for inputs that are not
    with torch.autocast(x.device.type, enabled=False):
        out = _DroppedMatmul.apply(flat, weight, dropped_positions(flat.numel(), p), 1.0 / (1.0 - p))
    out = out.view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def use_sparse_dropout(model: nn.Module) -> int:
    """Replace each LoRA dropout (`lora_dropout` entries that are `nn.Dropout`) by a sparse one of the same p.

    A module swap, not a patch of PEFT's code: the LoRA layer calls whatever modules its `lora_dropout` and
    `lora_A` dicts hold. Where PEFT computes `lora_A(dropout(x))` (vanilla LoRA on a linear `lora_A`), lora_A
    becomes a DroppedLinear sharing its weight and the dropout an identity; elsewhere (variants such as DoRA,
    which read lora_A's weight and the dropout themselves) the dropout becomes a SparseDropout. Saved adapters
    are unchanged. Returns the number of dropouts replaced.
    """
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout and dropout.p > 0:
                make_dropout_sparse(module, name, dropout)
                replaced += 1
    return replaced


def make_dropout_sparse(lora_layer: nn.Module, adapter: str, dropout: nn.Dropout) -> None:
    """Fold the adapter's dropout into its lora_A where `folds_into_lora_a`, else swap in a SparseDropout.

    The new module drops in the mode the old one was in: a module is made in training mode, and a model loaded
    for inference (`ftune merge`'s check, evaluation) would otherwise drop again.
    """
    if folds_into_lora_a(lora_layer, adapter):
        lora_layer.lora_A[adapter] = DroppedLinear(lora_layer.lora_A[adapter], dropout.p).train(dropout.training)
        lora_layer.lora_dropout[adapter] = nn.Identity().train(dropout.training)
    else:
        lora_layer.lora_dropout[adapter] = SparseDropout(dropout.p).train(dropout.training)


def folds_into_lora_a(lora_layer: nn.Module, adapter: str) -> bool:
    """Whether PEFT computes `lora_A(dropout(x))` for this adapter: vanilla LoRA (no variant) on a linear lora_A."""
    lora_a = lora_layer.lora_A[adapter] if adapter in lora_layer.lora_A else None
    return type(lora_a) is nn.Linear and adapter not in getattr(lora_layer, "lora_variant", {})
