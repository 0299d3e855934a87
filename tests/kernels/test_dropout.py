"""SparseDropout and DroppedLinear: the same Bernoulli mask distribution as nn.Dropout, drawn as dropped positions."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftune.kernels import dropout as sparse
from ftune.kernels.dropout import DroppedLinear, SparseDropout, dropped_positions, use_sparse_dropout

P = 0.05
N = 400_000


def five_sigma(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


def check_bernoulli(positions: torch.Tensor, numel: int, p: float) -> None:
    """In range, strictly increasing, the right drop rate, and independent neighbours (P(next dropped) = p)."""
    assert positions.dtype == torch.int64
    assert int(positions.min()) >= 0 and int(positions.max()) < numel
    assert bool((positions[1:] > positions[:-1]).all())
    assert abs(len(positions) / numel - p) < five_sigma(p, numel)
    dropped = torch.zeros(numel, dtype=torch.bool)
    dropped[positions] = True
    after_drop = dropped[1:][dropped[:-1]].float().mean().item()
    assert abs(after_drop - p) < five_sigma(p, len(positions))


def test_positions_follow_the_bernoulli_law():
    torch.manual_seed(0)
    check_bernoulli(dropped_positions(N, P), N, P)


def test_gap_lengths_are_geometric():
    torch.manual_seed(1)
    gaps = torch.diff(dropped_positions(N, P)).double()
    assert abs(gaps.mean().item() - 1 / P) < 5 * math.sqrt((1 - P) / P**2 / len(gaps))
    for k in (1, 2, 10):  # P(gap = k) = (1 - p)^(k - 1) p
        share, expected = (gaps == k).double().mean().item(), (1 - P) ** (k - 1) * P
        assert abs(share - expected) < five_sigma(expected, len(gaps))


def test_several_blocks_give_the_same_law(monkeypatch):
    """The rarely needed second block of gaps, forced by a negative margin."""
    monkeypatch.setattr(sparse, "BLOCK_MARGIN", -60.0)
    torch.manual_seed(2)
    check_bernoulli(dropped_positions(N, P), N, P)


def test_forward_zeroes_or_scales_and_backward_uses_the_same_mask():
    torch.manual_seed(3)
    x = (torch.rand(64, 300) + 0.5).requires_grad_()  # no zeros of its own
    layer = SparseDropout(P).train()
    y = layer(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * (1 / (1 - P)))
    upstream = torch.randn_like(y)
    y.backward(upstream)
    assert torch.equal(x.grad, torch.where(kept, upstream * (1 / (1 - P)), 0.0))


def test_same_seed_same_mask_and_eval_is_identity():
    layer, x = SparseDropout(P).train(), torch.rand(32, 50) + 0.5
    torch.manual_seed(4)
    first = layer(x)
    torch.manual_seed(4)
    assert torch.equal(layer(x), first)
    assert layer.eval()(x) is x


def test_large_p_is_torch_dropout():
    layer, x = SparseDropout(0.5).train(), torch.randn(16, 16)
    torch.manual_seed(5)
    expected = F.dropout(x, 0.5, True)
    torch.manual_seed(5)
    assert torch.equal(layer(x), expected)


def dropped_reference(x: torch.Tensor, weight: torch.Tensor, bias, p: float, seed: int):
    """F.linear of x dropped with the mask `dropped_positions` draws from `seed`, on fresh leaves, and them."""
    torch.manual_seed(seed)
    keep = torch.ones(x.numel(), dtype=x.dtype)
    keep[dropped_positions(x.numel(), p)] = 0
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    return F.linear(leaves[0] * keep.view(x.shape) / (1 - p), leaves[1], bias), leaves


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_dropped_linear_is_linear_of_the_same_dropout(dtype, bias):
    """Output and gradients equal F.linear(dropout(x)) with the mask of the same positions.

    The input is a non-contiguous [batch, seq, hidden]. Not bitwise: the dropped entries are subtracted after the
    matmul, and the scale applied to its output.
    """
    torch.manual_seed(6)
    layer = DroppedLinear(nn.Linear(48, 8, bias=bias, dtype=dtype), P).train()
    x = torch.randn(5, 3, 48, dtype=dtype).transpose(0, 1).requires_grad_()
    torch.manual_seed(7)
    y = layer(x)
    expected, (x_ref, weight_ref) = dropped_reference(x, layer.weight, layer.bias, P, seed=7)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    expected.backward(upstream)
    for got, want in ((y, expected), (x.grad, x_ref.grad), (layer.weight.grad, weight_ref.grad)):
        assert got.shape == want.shape and relative(got, want) < 1e-6


def test_dropped_linear_with_a_frozen_weight_passes_only_the_input_gradient():
    torch.manual_seed(13)
    layer = DroppedLinear(nn.Linear(40, 4, bias=False).requires_grad_(False), P).train()
    x = torch.randn(3, 7, 40, requires_grad=True)
    torch.manual_seed(14)
    y = layer(x)
    expected, (x_ref, _) = dropped_reference(x, layer.weight, None, P, seed=14)
    y.sum().backward()
    expected.sum().backward()
    assert layer.weight.grad is None and relative(x.grad, x_ref.grad) < 1e-6


def test_dropped_linear_under_autocast_has_nn_linear_dtypes():
    """bf16 output as nn.Linear's under CPU autocast, within bf16 rounding of the reference; fp32 weight grad."""
    torch.manual_seed(8)
    layer, x = DroppedLinear(nn.Linear(64, 8, bias=False), P).train(), torch.randn(2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(9)
        y = layer(x)
        expected, _ = dropped_reference(x, layer.weight, None, P, seed=9)
    assert y.dtype == expected.dtype == torch.bfloat16
    assert relative(y, expected) < 2e-2
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad is None  # x needs no gradient: none computed


def test_dropped_linear_in_eval_is_the_linear_and_large_p_is_torch_dropout():
    linear = nn.Linear(32, 4, bias=False)
    layer, x = DroppedLinear(linear, 0.5), torch.randn(6, 32)
    assert layer.weight is linear.weight
    assert torch.equal(layer.eval()(x), linear(x))
    torch.manual_seed(10)
    expected = linear(F.dropout(x, 0.5, True))
    torch.manual_seed(10)
    assert torch.equal(layer.train()(x), expected)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_dropouts_are_replaced_only_where_they_drop(random_llama, p):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(random_llama(), LoraConfig(r=4, lora_dropout=p, target_modules="all-linear"))
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    before, keys = model(input_ids=ids).logits, list(model.state_dict())
    replaced = use_sparse_dropout(model)
    lora_layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    assert replaced == (len(lora_layers) if p else 0) and len(lora_layers) > 0
    assert all(isinstance(m.lora_A["default"], DroppedLinear) == bool(p) for m in lora_layers)
    assert all(isinstance(m.lora_dropout["default"], nn.Identity) for m in lora_layers)
    assert list(model.state_dict()) == keys
    assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("dora", [False, True])  # folded into lora_A, and a SparseDropout
def test_a_model_in_eval_mode_stays_deterministic_after_the_swap(random_llama, dora):
    """A trained adapter loaded for inference (`ftune merge`'s check) must not start dropping after the swap."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(random_llama(), LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear",
                                                      use_dora=dora))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # a trained adapter: what dropout drops now shows in the logits
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    before = model(input_ids=ids).logits
    assert use_sparse_dropout(model) > 0
    assert not [name for name, module in model.named_modules() if module.training]
    assert torch.equal(model(input_ids=ids).logits, before)


def test_dora_keeps_its_dropout_module_and_every_adapter_is_replaced(random_llama):
    """A variant reads lora_A's weight and the dropout itself: it gets a SparseDropout; a second adapter too."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(random_llama(), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    model.add_adapter("dora", LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"], use_dora=True))
    use_sparse_dropout(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_A["default"], DroppedLinear) and isinstance(layer.lora_dropout["dora"], SparseDropout)
    assert type(layer.lora_A["dora"]) is nn.Linear


def test_folded_dropout_trains_and_merges(random_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(random_llama(), LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    assert use_sparse_dropout(model) > 0
    optimizer = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=1e-2)
    ids = torch.randint(1, 64, (4, 32), generator=torch.Generator().manual_seed(11))
    torch.manual_seed(12)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    adapted = model(input_ids=ids).logits
    torch.testing.assert_close(model.merge_and_unload()(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
