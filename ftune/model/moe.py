"""Mixture-of-experts training: the router's load-balancing loss joins ftune's loss with the model's coefficient.

transformers adds `router_aux_loss_coef * aux_loss` only when it computes the loss itself from `labels`, and
its balancing loss reads a 2D padding mask (a packed row's 4D mask breaks it). ftune computes its own
token-summed loss, so without this module an MoE model would train with no balancing term at all and its
routers could collapse onto a few experts. The router logits are recorded by forward hooks on the router
modules (the classes the model itself declares for `output_router_logits`, `ftune.compat.recorded_output`),
cleared at the start of each forward of the decoder, and turned into the Switch-Transformer balancing loss by
transformers' own function (`ftune.compat.load_balancing_loss`).
"""

import torch

from ftune.compat import load_balancing_loss, recorded_output

RECORD_ATTRIBUTE = "ftune_router_logits"
"""Where `record_router_logits` leaves its record on the model (PEFT and accelerate wrappers forward to it)."""


class RouterLogits:
    """The router logits of the latest forward of one model, one (tokens, experts) tensor per MoE layer."""

    def __init__(self):
        self.logits: list[torch.Tensor] = []


def record_router_logits(model) -> int:
    """Hook the routers of an MoE `model` so each forward's router logits can be read; returns how many.

    0 for dense models, and for MoE models that transformers itself trains without a balancing loss (their
    causal LM has no `router_aux_loss_coef`, e.g. DeepSeek-V3's bias-balanced routers).
    """
    found = recorded_output(model, "router_logits")
    if found is None or not hasattr(model, "router_aux_loss_coef"):
        return 0
    target, index = found
    record = RouterLogits()

    def keep(module, args, output):
        record.logits.append(output[index])

    def clear(module, args, kwargs):
        record.logits.clear()
        return args, kwargs

    routers = [module for module in model.modules() if isinstance(module, target)]
    for router in routers:
        router.register_forward_hook(keep)
    model.get_decoder().register_forward_pre_hook(clear, with_kwargs=True)
    setattr(model, RECORD_ATTRIBUTE, record)
    return len(routers)


def add_router_loss(model, batch: dict, parts: dict[str, torch.Tensor], learned: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """`parts` (summed loss terms of one micro-batch) with the router's balancing loss added, for MoE models.

    The expert count, top-k and coefficient are the attributes transformers' causal LM computes its own
    `aux_loss` from (`num_experts`, `num_experts_per_tok`, `router_aux_loss_coef`, set from whichever config
    keys the family uses), read through PEFT's wrappers.

    The balancing loss is a mean over the micro-batch's tokens; ftune's terms are sums that the loop divides by
    the step's learned tokens, so it enters as `coef * aux * learned tokens of this micro-batch`: after the
    division, `coef` times the token-weighted mean of `aux` over the step, as transformers and TRL add it per
    batch. `router_loss` (logged) is `aux` before its coefficient. A padded batch's 2D mask keeps padding out
    of the statistics; a packed row's padding (a few tokens at its end) is counted.

    Args:
        model: the (unwrapped) model the micro-batch just ran through.
        batch: the micro-batch (labels, attention mask).
        parts: the loss terms of that forward (`loss`, and distillation's `ce_loss`/`kd_loss`).
        learned: the micro-batch's learned tokens (the count the loop normalises by).

    Returns:
        `parts` unchanged for dense models; else with `router_loss` added and folded into `loss`.
    """
    record = getattr(model, RECORD_ATTRIBUTE, None)
    if record is None or not record.logits:
        return parts
    mask = batch.get("attention_mask")
    mask = mask if mask is not None and mask.dim() == 2 else None
    aux = load_balancing_loss(tuple(record.logits), model.num_experts, model.num_experts_per_tok, mask)
    router = aux * learned
    return parts | {"loss": parts["loss"] + model.router_aux_loss_coef * router, "router_loss": router}
