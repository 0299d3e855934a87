"""FusedLoraLinear: PEFT's LoRA layer as one autograd node computes what PEFT's own layer computes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from ftune.config.schema import LoraCfg, MethodCfg
from ftune.kernels.dropout import DroppedLinear, use_sparse_dropout
from ftune.kernels.lora_linear import FusedLoraLinear, fuses, merged_for_sampling, use_fused_layers
from ftune.model.adapters import add_adapter
from ftune.model.instrument import instrument

IN, OUT, RANK = 24, 16, 4


class Holder(nn.Module):
    """One linear layer for PEFT to adapt."""

    def __init__(self, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def adapted_layer(fused: bool, p: float, bias: bool = False, dtype: torch.dtype = torch.float64, **lora):
    """The adapted `proj` of a fresh Holder (same seed, so the same weights), PEFT's or ftune's, dropout folded."""
    torch.manual_seed(0)
    config = LoraConfig(r=RANK, lora_alpha=8, lora_dropout=p, target_modules=["proj"], **lora)
    model = get_peft_model(Holder(bias, dtype), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B starts at zero: give the adapter an output to compare
    if fused:
        use_fused_layers(model)
    use_sparse_dropout(model)
    return model.base_model.model.proj.train()


def run(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor, seed: int = 5):
    """Output and the gradients of x, A and B after backpropagating `upstream`, the dropout drawn from `seed`."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(upstream.to(y.dtype))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return y, x.grad, a.grad, b.grad


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def is_fused(y: torch.Tensor) -> bool:
    """Whether y came out of `_LoraMatmul` (through the view that restores the leading dimensions)."""
    return type(y.grad_fn.next_functions[0][0]).__name__ == "_LoraMatmulBackward"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_layer_equals_peft_layer(p, bias, dtype):
    """Output and the gradients of the input, A and B equal PEFT's layer's, with the same dropped positions.

    The input is a non-contiguous [batch, seq, features]. Not bitwise: the scaled LoRA product is added by an addmm.
    """
    peft_layer, fused_layer = adapted_layer(False, p, bias, dtype), adapted_layer(True, p, bias, dtype)
    assert type(peft_layer) is PeftLoraLinear and type(fused_layer) is FusedLoraLinear
    assert isinstance(fused_layer.lora_A["default"], DroppedLinear) == (p > 0)
    x = torch.randn(5, 3, IN, dtype=dtype).transpose(0, 1).requires_grad_()
    upstream = torch.randn(3, 5, OUT, dtype=dtype)
    expected, got = run(peft_layer, x, upstream), run(fused_layer, x, upstream)
    assert is_fused(got[0]) and not is_fused(expected[0])
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for have, want in zip(got, expected, strict=True):
        assert have.shape == want.shape and relative(have, want) < tolerance


def test_an_input_without_gradient_gets_none_and_the_adapter_still_learns():
    fused_layer, peft_layer = adapted_layer(True, 0.1), adapted_layer(False, 0.1)
    x, upstream = torch.randn(2, 7, IN, dtype=torch.float64), torch.randn(2, 7, OUT, dtype=torch.float64)
    (y, grad_x, grad_a, grad_b), expected = run(fused_layer, x, upstream), run(peft_layer, x, upstream)
    assert is_fused(y) and grad_x is None
    assert relative(grad_a, expected[2]) < 1e-12 and relative(grad_b, expected[3]) < 1e-12


@pytest.mark.parametrize("bias", [False, True])
def test_sampling_with_the_adapter_merged_computes_what_peft_does_and_leaves_the_base_as_it_was(bias):
    """Inside `merged_for_sampling` without gradient: one matmul by W + s B A, giving PEFT's output.

    With gradient, and after the context, the fused forward again; the frozen base bitwise unchanged (no merge
    and unmerge in place).
    """
    peft_layer, fused_layer = adapted_layer(False, 0.1, bias).eval(), adapted_layer(True, 0.1, bias).eval()
    base = fused_layer.base_layer.weight.clone()
    x = torch.randn(3, 5, IN, dtype=torch.float64)
    with torch.no_grad():
        expected = peft_layer(x)
        with merged_for_sampling(fused_layer):
            merged = fused_layer(x)
            assert list(fused_layer.sampling_weights) == [torch.float64]
        assert fused_layer.sampling_weights is None
    assert relative(merged, expected) < 1e-12 and torch.equal(fused_layer.base_layer.weight, base)
    with merged_for_sampling(fused_layer):
        assert is_fused(fused_layer(x.requires_grad_()))


def test_under_autocast_dtypes_are_peft_layers():
    """bf16 output as PEFT's layer gives under CPU autocast, within bf16 rounding; fp32 adapter gradients."""
    peft_layer, fused_layer = (adapted_layer(fused, 0.1, dtype=torch.float32) for fused in (False, True))
    x, upstream = torch.randn(4, 8, IN, requires_grad=True), torch.randn(4, 8, OUT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = run(peft_layer, x, upstream), run(fused_layer, x, upstream)
    assert is_fused(got[0]) and got[0].dtype == expected[0].dtype == torch.bfloat16
    assert got[2].dtype == got[3].dtype == torch.float32
    for have, want in zip(got, expected, strict=True):
        assert relative(have, want) < 2e-2


@pytest.mark.parametrize("case", ["eval", "merged", "disabled", "dora", "lora_bias", "large_p", "trainable_base"])
def test_peft_computes_what_the_fused_layer_does_not(case):
    """Where `_LoraMatmul` does not apply, PEFT's own forward runs, and gives PEFT's result."""
    lora = {"use_dora": True} if case == "dora" else {"lora_bias": True} if case == "lora_bias" else {}
    p = 0.5 if case == "large_p" else 0.1
    layers = [adapted_layer(fused, p, **lora) for fused in (False, True)]
    for layer in layers:
        if case == "eval":
            layer.eval()
        elif case == "merged":
            layer.merge()
        elif case == "disabled":
            layer.enable_adapters(False)
        elif case == "trainable_base":
            layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    expected, got = run(layers[0], x, torch.ones(2, 3, OUT)), run(layers[1], x, torch.ones(2, 3, OUT))
    assert is_fused(got[0]) == (case == "eval")  # eval has no dropout: it still fuses
    assert fuses(layers[1], "default", "cpu") == (case not in ("dora", "lora_bias", "large_p", "trainable_base"))
    assert relative(got[0], expected[0]) < 1e-12


@pytest.mark.parametrize("sharding", ["fsdp2", "zero3"])
def test_sharded_fused_layers_give_the_unsharded_gradients(sharding):
    """Two gloo processes sharding the model: the fused layers run on gathered weights, every gradient unchanged.

    ZeRO-3 needs DeepSpeed (not a dependency of ftune: `pip install deepspeed`), run on its CPU accelerator.
    """
    if sharding == "zero3":
        pytest.importorskip("deepspeed")
    helper = Path(__file__).parents[1] / "sharded_lora_grads.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(helper), sharding, "0.1"],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fused_calls"] == 2 * 7  # every adapted linear of both layers
    assert report["gradients"] == [28, 28] and report["worst_grad_diff"] < 1e-5
    assert report["sharded_loss"] == pytest.approx(report["whole_loss"], rel=1e-6)


def test_quantized_layers_stay_peft_layers():
    """Only PEFT's layer over a plain nn.Linear becomes fused: bitsandbytes' layers keep PEFT's own classes."""
    bnb = pytest.importorskip("bitsandbytes")
    holder = Holder(False, torch.float32)
    holder.proj = bnb.nn.Linear8bitLt(IN, OUT, bias=False, has_fp16_weights=False)
    model = get_peft_model(holder, LoraConfig(r=RANK, target_modules=["proj"]))
    assert use_fused_layers(model) == 0 and type(model.base_model.model.proj) is not FusedLoraLinear


@pytest.mark.parametrize("kernels", [False, True])
def test_cpu_kernels_switch_gives_fused_or_peft_layers_that_train_alike(random_llama, kernels):
    """`instrument(kernels=...)`: fused layers and folded dropout, or PEFT's own; the same keys and training.

    Compared with PEFT's layers whose dropout draws the same masks (`use_sparse_dropout` alone) where the kernels
    are on; with them off, the dropout is torch's (other masks), so only learning and merging are compared.
    """
    cfg, method = LoraCfg(r=4, alpha=8, dropout=0.1), MethodCfg(name="lora")
    peft_model = add_adapter(random_llama(), method, cfg, False)
    use_sparse_dropout(peft_model)
    model = add_adapter(random_llama(), method, cfg, False)
    changes = instrument(model, kernels=kernels)
    assert [c.source for c in changes] == (["kernels/lora_linear.py", "kernels/dropout.py"] if kernels else [])
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert layers and all((type(m) is FusedLoraLinear) == kernels for m in layers)
    assert all(isinstance(m.lora_A["default"], DroppedLinear) == kernels for m in layers)
    assert all(type(m.lora_dropout["default"]) is (nn.Identity if kernels else nn.Dropout) for m in layers)
    assert list(model.state_dict()) == list(peft_model.state_dict())
    ids = torch.randint(1, 64, (4, 32), generator=torch.Generator().manual_seed(11))
    losses = []
    for trained in (peft_model, model):
        optimizer = torch.optim.AdamW([t for t in trained.parameters() if t.requires_grad], lr=1e-2)
        torch.manual_seed(12)
        losses.append([])
        for _ in range(4):
            loss = trained(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[-1].append(loss.item())
    assert losses[1][-1] < losses[1][0]
    if kernels:
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    model.eval()
    adapted = model(input_ids=ids).logits
    torch.testing.assert_close(model.merge_and_unload()(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
