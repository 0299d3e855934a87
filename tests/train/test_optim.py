"""Optimizers: every `optim.name` builds and steps, weight decay skips 1-D tensors, LoRA+ scales the B rate."""

import pytest
import torch

from ftune.config.schema import OptimCfg
from ftune.train.optim import build_optimizer, build_scheduler, param_groups

NAMES = ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]


def small_model() -> torch.nn.Module:
    """Big enough for bitsandbytes' 8-bit states (it keeps tensors under 4096 elements in 32 bits)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(128, 64), torch.nn.Linear(64, 128), torch.nn.LayerNorm(128))


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_builds_and_steps(name):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, OptimCfg(name=name, lr=1e-2))
    for _ in range(3):
        model(torch.randint(0, 128, (4, 8))).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", NAMES)
def test_weight_decay_skips_biases_and_norms(name):
    # With a zero gradient Adam's update is zero, so only decoupled weight decay moves a weight.
    model, lr, decay = small_model(), 0.1, 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, OptimCfg(name=name, lr=lr, weight_decay=decay))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for key, value in model.state_dict().items():
        expected = before[key] * (1 - lr * decay) if value.ndim >= 2 else before[key]
        torch.testing.assert_close(value, expected, msg=key)


def test_param_groups_split_by_dimension():
    groups = param_groups(small_model(), OptimCfg(weight_decay=0.1))
    assert [(g["weight_decay"], sorted(p.ndim for p in g["params"])) for g in groups] == [
        (0.0, [1, 1, 1]),  # linear bias, norm weight and bias
        (0.1, [2, 2]),  # embedding and linear weights
    ]


def test_frozen_parameters_are_left_out():
    model = small_model()
    model[0].requires_grad_(False)
    grouped = {id(p) for g in param_groups(model, OptimCfg()) for p in g["params"]}
    assert grouped == {id(p) for p in list(model[1].parameters()) + list(model[2].parameters())}


def test_loraplus_gives_b_matrices_ratio_times_the_rate(random_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(random_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    cfg = OptimCfg(lr=1e-3, loraplus_lr_ratio=16.0, weight_decay=0.1)
    optimizer = build_optimizer(model, cfg)
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = {name: id(p) for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA's 1-D magnitudes keep the base rate
    for name, key in names.items():
        assert rate[key] == pytest.approx(1.6e-2 if "lora_B" in name else 1e-3), name
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    rates = sorted({g["lr"] for g in optimizer.param_groups})
    assert rates[-1] == pytest.approx(16 * rates[0])  # the schedule keeps the ratio
    assert scheduler.get_last_lr()[0] == rates[0]  # the logged rate is the base one


def test_without_loraplus_every_group_has_the_base_rate(random_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(random_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert {g["lr"] for g in param_groups(model, OptimCfg(lr=1e-3))} == {1e-3}
