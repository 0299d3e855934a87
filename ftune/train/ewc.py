"""EWC (`ewc.weight`): the weights that mattered to what the base knew are held near their base values.

Elastic weight consolidation (Kirkpatrick et al., 2017) adds `ewc.weight` x sum_i F_i (theta_i - theta*_i)^2 to the
loss: theta* the weights training starts from (the base) and F the diagonal of the base's Fisher information,
estimated on the forgetting probe's text, which is what the run should not forget. The estimate is the batch
empirical Fisher: the squared gradient of each probe batch's mean loss, averaged over `ewc.batches` batches (and over
processes); a per-example estimate would take one backward per document. F depends only on the base, the probe and
the trained parameters, so it is cached like the probe's base perplexity.

It applies to weights that train: full fine-tuning, with `method.freeze` or `method.train_only` (BitFit). An
adapter's base stays frozen, so `config/validate.py` refuses it there. F and theta* are two more copies of the
trained weights, in fp32 for F.
"""

import torch
from safetensors.torch import load_file, save_file

from ftune.atomic import atomic_file
from ftune.cache import cache_dir, file_signature, fingerprint
from ftune.config.schema import RunCfg
from ftune.eval.loss import BatchLoss, learned_token_count
from ftune.eval.probe import base_signature
from ftune.model.dropout import eval_mode


class ElasticPenalty:
    """`ewc.weight` x sum_i F_i (theta_i - theta*_i)^2 over the trained parameters, theta* as they are when built."""

    name = "ewc_loss"
    """The key under which the loop adds it to the loss and logs it."""

    def __init__(self, model: torch.nn.Module, fisher: dict[str, torch.Tensor], weight: float):
        named = dict(model.named_parameters())
        self.terms = [(named[name], named[name].detach().clone(), value.to(named[name].device))
                      for name, value in fisher.items()]
        self.weight = weight

    def __call__(self) -> torch.Tensor:
        return self.weight * sum(((param - anchor).float().pow(2) * fisher).sum()
                                 for param, anchor, fisher in self.terms)


def fisher_diagonal(model: torch.nn.Module, loader, batches: int, loss: BatchLoss) -> dict[str, torch.Tensor]:
    """The mean over `batches` probe batches of the squared gradient of each one's mean loss, per trained parameter.

    In eval mode (no dropout); the model's gradients are left cleared.
    """
    trained = {name: param for name, param in model.named_parameters() if param.requires_grad}
    fisher = {name: torch.zeros_like(param, dtype=torch.float32) for name, param in trained.items()}
    seen = 0
    with eval_mode(model):
        for index, batch in enumerate(loader):
            if index == batches:
                break
            model.zero_grad(set_to_none=True)
            (loss(model, batch)["loss"] / learned_token_count(batch["labels"]).clamp(min=1)).backward()
            for name, param in trained.items():
                if param.grad is not None:
                    fisher[name] += param.grad.float().pow(2)
            seen += 1
    model.zero_grad(set_to_none=True)
    return {name: value / max(seen, 1) for name, value in fisher.items()}


def build_elastic_penalty(cfg: RunCfg, model: torch.nn.Module, probe_loader, loss: BatchLoss, accelerator
                          ) -> ElasticPenalty:
    """The penalty of `model` (unwrapped, with its start weights), its Fisher diagonal read from the cache or estimated.

    Every process estimates on its share of the probe and the estimates are averaged, so all hold the same F.
    """
    key = fingerprint(base_signature(cfg.model), file_signature(cfg.probe.path), cfg.probe.max_length,
                      cfg.trainer.micro_batch_size, cfg.ewc.batches, cfg.method.freeze, cfg.method.train_only,
                      cfg.trainer.mixed_precision)
    cached = cache_dir("ewc") / f"{key}.safetensors"
    if cached.is_file():
        fisher = load_file(cached)
    else:
        fisher = {name: accelerator.reduce(value, "mean")
                  for name, value in fisher_diagonal(model, probe_loader, cfg.ewc.batches, loss).items()}
        if accelerator.is_main_process:
            with atomic_file(cached) as staging:
                save_file({name: value.contiguous().cpu() for name, value in fisher.items()}, staging)
    return ElasticPenalty(model, fisher, cfg.ewc.weight)
