"""Optimizer and learning-rate schedule, and the run length they are built for."""

import math

import torch
from transformers import get_scheduler

from ftune.config.schema import OptimCfg, TrainerCfg

BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}
"""`optim.name` -> class in `bitsandbytes.optim`: 8-bit states quarter Adam's memory; paged states spill to CPU
memory under GPU memory pressure instead of failing (on CPU they behave like the unpaged ones)."""
EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")
LORA_B = "lora_B."
"""Marks the B (up-projection) matrices of PEFT's LoRA layers in parameter names."""


def optimizer_steps(cfg: TrainerCfg, train_loader) -> int:
    """Optimizer steps the run takes: `max_steps`, or `epochs` passes (a short last step per epoch counts).

    A stream has no length, which is why `data.streaming` needs `max_steps`.
    """
    if cfg.max_steps > 0:
        return cfg.max_steps
    return cfg.epochs * math.ceil(len(train_loader) / cfg.grad_accum)


def param_groups(model: torch.nn.Module, cfg: OptimCfg) -> list[dict]:
    """Trainable parameters grouped by weight decay and learning rate.

    Biases and norm weights (1-D tensors) get no weight decay. With LoRA+ (`loraplus_lr_ratio`), the B matrices
    learn `ratio` times faster than everything else (Hayou et al., 2024). PEFT's `create_loraplus_optimizer`
    does the same but decides decay by layer type and gives 1-D parameters (DoRA magnitudes) the B rate, so
    the groups are built here to keep one decay rule for every method. The schedule scales each group's rate,
    so the ratio holds throughout; the group at the base rate comes first, and its rate is the one logged.

    Returns:
        Non-empty groups, each with `params`, `weight_decay` and `lr`.
    """
    ratio = cfg.loraplus_lr_ratio or 1.0
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = ratio if LORA_B in name else 1.0
        decay = cfg.weight_decay if param.ndim >= 2 else 0.0
        groups.setdefault((scale, decay), []).append(param)
    return [
        {"params": params, "weight_decay": decay, "lr": cfg.lr * scale}
        for (scale, decay), params in sorted(groups.items(), key=lambda item: item[0])
    ]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of `name`: torch's AdamW or a bitsandbytes one (imported only when asked for)."""
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    return getattr(bnb.optim, BNB_OPTIMIZERS[name])


def build_optimizer(model: torch.nn.Module, cfg: OptimCfg) -> torch.optim.Optimizer:
    """`cfg.name` over the trainable parameters (torch's AdamW fused where every parameter allows it)."""
    groups = param_groups(model, cfg)
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.name == "adamw":
        params = [p for g in groups for p in g["params"]]
        kwargs["fused"] = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if cfg.name in EIGHT_BIT:
        keep_embedding_states_32bit(model)
    return optimizer_class(cfg.name)(groups, **kwargs)


def keep_embedding_states_32bit(model: torch.nn.Module) -> None:
    """Give embedding weights 32-bit optimizer states: 8-bit states are unstable for them (bitsandbytes' advice).

    The override is registered with bitsandbytes' optimizer manager, which applies it at the first step.
    """
    import bitsandbytes as bnb

    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimCfg, total_steps: int):
    """Build transformers' schedule: linear warmup over `warmup_ratio` of the steps, then `cfg.scheduler`."""
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
