"""SparseDropout: the same Bernoulli mask distribution as nn.Dropout, drawn as dropped positions."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftune.model import dropout as sparse
from ftune.model.dropout import SparseDropout, dropped_positions, use_sparse_dropout

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


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_dropouts_are_replaced_only_where_they_drop(random_llama, p):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(random_llama(), LoraConfig(r=4, lora_dropout=p, target_modules="all-linear"))
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    before = model(input_ids=ids).logits
    replaced = use_sparse_dropout(model)
    lora_layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    assert replaced == (len(lora_layers) if p else 0) and len(lora_layers) > 0
    assert all(isinstance(m.lora_dropout["default"], SparseDropout) == bool(p) for m in lora_layers)
    assert torch.equal(model(input_ids=ids).logits, before)
