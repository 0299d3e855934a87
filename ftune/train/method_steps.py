"""What a method does between optimizer steps: AdaLoRA's rank allocation and gradual unfreezing.

The loop knows neither: it calls each `MethodStep`'s `after_step` once per optimizer step, after the weights moved
and before their gradients are zeroed (AdaLoRA scores importance from them), and logs the figures it returns with
the step. A method's terms of the weights alone (AdaLoRA's orthogonality penalty) join the loss through the loop's
`penalties`, like EWC's.
"""

from typing import Protocol

import torch
from accelerate import Accelerator

from ftune.config.schema import AdaloraCfg, RunCfg
from ftune.errors import ConfigError
from ftune.model.blocks import decoder_layers


class MethodStep(Protocol):
    """A method's own work at each optimizer step."""

    def start(self, step: int) -> None:
        """Set up for a run that starts, or resumes, after `step` optimizer steps."""

    def after_step(self, step: int) -> dict[str, float]:
        """Act on optimizer step `step` (1-based) just taken; returns figures for its training row."""


def build_method_steps(cfg: RunCfg, model: torch.nn.Module, total_steps: int, accelerator: Accelerator
                       ) -> tuple[list[MethodStep], list]:
    """The run's method steps and the penalties they add to the loss, for the unwrapped `model`.

    Built before a checkpoint is loaded: AdaLoRA's allocator state is registered with `accelerator` so that it is
    saved and restored with the weights.
    """
    if cfg.method.name == "adalora":
        allocation = AdaloraAllocation(model, total_steps, cfg.method.adalora)
        accelerator.register_for_checkpointing(allocation)
        penalty = OrthogonalityPenalty(model, cfg.method.adalora.orth_reg_weight)
        return [allocation], [penalty] if cfg.method.adalora.orth_reg_weight else []
    if cfg.method.unfreeze_every:
        return [GradualUnfreezing(model, cfg.method.unfreeze_every)], []
    return [], []


def adalora_schedule(total_steps: int, cfg: AdaloraCfg) -> tuple[int, int]:
    """PEFT's (tinit, tfinal): the steps before the first cut and after the last, from `cfg`'s fractions.

    Raises:
        ConfigError: when they leave no step in between to allocate the ranks.
    """
    tinit, tfinal = round(cfg.warmup * total_steps), round(cfg.final * total_steps)
    if tinit >= total_steps - tfinal:
        raise ConfigError(f"method.adalora.warmup={cfg.warmup} and method.adalora.final={cfg.final} leave no step of "
                          f"this run's {total_steps} to allocate ranks in (expected warmup + final < 1 with at "
                          "least one step between them)")
    return tinit, tfinal


class AdaloraAllocation:
    """AdaLoRA's budget: PEFT's `update_and_allocate` after each step; the mean rank is logged as `mean_rank`.

    It scores the singular values and masks the least important ones while the total rank shrinks by its cubic
    schedule.
    PEFT keeps the importance estimates (moving averages, one per adapter weight) and the final rank pattern in
    the allocator and the config, not in the weights; `state_dict` hands them to the checkpoint so that a resumed
    run allocates as the uninterrupted one.
    """

    def __init__(self, model, total_steps: int, cfg: AdaloraCfg):
        self.tuner = model.base_model
        self.config = self.tuner.peft_config[self.tuner.trainable_adapter_name]
        self.config.total_step = total_steps
        self.config.tinit, self.config.tfinal = adalora_schedule(total_steps, cfg)
        self.allocator = self.tuner.rankallocator

    def start(self, step: int) -> None:
        """Nothing to do: the checkpoint restored the allocator's state (`load_state_dict`)."""

    def after_step(self, step: int) -> dict[str, float]:
        self.tuner.update_and_allocate(step)
        budget, _ = self.allocator.budget_schedule(step)
        return {"mean_rank": budget / len(self.allocator.name_set)}

    def state_dict(self) -> dict:
        allocator = self.allocator
        return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
                "rank_pattern": self.config.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        allocator = self.allocator
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (state["ipt"], state["exp_avg_ipt"],
                                                                       state["exp_avg_unc"])
        self.config.rank_pattern = state["rank_pattern"]


class OrthogonalityPenalty:
    """AdaLoRA's regulariser: `orth_reg_weight` x the mean over its P and Q matrices of ||P^T P - I||_F.

    PEFT adds it inside `AdaLoraModel.forward`, and only to a loss the model computed from `labels`; ftune computes
    its losses itself (chunked, `ftune.train.losses`), so the term is computed here as PEFT defines it.
    """

    name = "orth_loss"
    """The key under which the loop adds it to the loss and logs it."""

    def __init__(self, model, weight: float):
        adapter = model.base_model.trainable_adapter_name
        self.matrices = [(param, "lora_A" in name) for name, param in model.named_parameters()
                         if ("lora_A" in name or "lora_B" in name) and adapter in name]
        self.weight = weight

    def __call__(self) -> torch.Tensor:
        norms = []
        for param, rows in self.matrices:
            gram = param @ param.T if rows else param.T @ param
            norms.append(torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=gram.device, dtype=gram.dtype)))
        return self.weight * torch.stack(norms).mean()


class GradualUnfreezing:
    """`method.unfreeze_every` = N: the top of the model trains first, and every N steps the next block down joins.

    Stage 0 (the head, the final norm, the last block) trains from the first step, and after every N optimizer
    steps the next stage joins: the block below, down to the first, then the input embedding (which is stage 0
    where the head is tied to it). Howard and Ruder (2018, ULMFiT).
    The optimizer holds every parameter from the start; a frozen one has no gradient, which AdamW skips without
    touching its state, so a joining block starts with fresh moments, as if it had been added then. Which stages
    train is a function of the step alone, so a resumed run freezes exactly as the uninterrupted one did; a
    checkpoint holds the weights that trained so far (`save_trainable_weights_only`), the others are the base's.
    """

    def __init__(self, model: torch.nn.Module, every: int):
        self.stages = unfreezing_stages(model)
        self.every = every

    def start(self, step: int) -> None:
        self.train_stages(self.stages_trained_after(step))

    def after_step(self, step: int) -> dict[str, float]:
        trained = sum(p.numel() for stage in self.stages for p in stage if p.requires_grad)
        self.train_stages(self.stages_trained_after(step))
        return {"trainable_params": trained}

    def stages_trained_after(self, step: int) -> int:
        """How many stages train in the step after `step` steps."""
        return min(len(self.stages), 1 + step // self.every)

    def train_stages(self, count: int) -> None:
        for index, stage in enumerate(self.stages):
            for param in stage:
                param.requires_grad_(index < count)


def unfreezing_stages(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters of `model` by the order they join, top first.

    [everything outside the blocks and the input embedding, with the last block], [the block below], ..., [the
    first block], [the input embedding].
    Only parameters that train at all (`method.freeze`, `method.train_only`) are staged; stages left empty are
    dropped, so each N steps something joins.
    """
    blocks = decoder_layers(model)
    block_of = {id(p): index for index, block in enumerate(blocks) for p in block.parameters()}
    head = model.get_output_embeddings()
    tied = {id(head.weight)} if head is not None else set()
    embedding = {id(p) for p in model.get_input_embeddings().parameters()} - tied
    last = len(blocks) - 1
    stages: list[list[torch.nn.Parameter]] = [[] for _ in range(len(blocks) + 1)]
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in block_of:
            stages[last - block_of[id(param)]].append(param)
        else:
            stages[len(blocks) if id(param) in embedding else 0].append(param)
    if not stages[0]:
        raise ConfigError("method.unfreeze_every: nothing of the head or the last block trains (expected "
                          "method.freeze / method.train_only to leave the top of the model trainable)")
    return [stage for stage in stages if stage]
