"""`ftune plan`: exact parameter counts and a per-GPU memory estimate, without downloading or loading weights.

The model is built on the meta device from its config.json (`plan/meta.py`), the recipe's method applied to
it exactly as training does, and the counts and dtypes are read off its tensors. Memory per GPU is the sum of:
- weights: every tensor at its dtype, quantized ones by bitsandbytes' storage (`plan/memory.py`);
- gradients: the trainable tensors at their dtype;
- optimizer state: by `optim.name` (`plan/memory.py`);
- activations: what autograd keeps of one micro-batch of `data.max_length` tokens, measured by tracing the
  run's forward and step loss on fake tensors (`plan/trace.py`);
- logits: the loss's transient logits, one chunk's (`trainer.loss_chunk_size`) or, unfused, the micro-batch's:
  arithmetic (`logits_bytes`), since the trace sees what is kept, not what passes through;
- the distillation teacher's weights;
divided by the distribution (`gpus=N sharding=none|zero2|zero3|fsdp`, see `memory.per_gpu`).
"""

import os
from dataclasses import asdict, dataclass, field, replace

import torch

from ftune.config.schema import RunCfg, TrainerCfg
from ftune.errors import ConfigError, first_line
from ftune.model.blocks import decoder_layers, decoder_of
from ftune.model.dtypes import DTYPES, native_mixed_precision
from ftune.model.load import count_parameters
from ftune.plan import memory
from ftune.plan.meta import (
    build_meta_model,
    embedding_ids,
    meta_teacher,
    unique_parameters,
)
from ftune.plan.trace import StepLossBuilder, trace_step

GIB = 2**30
"""The `*_gb` figures are GiB, the unit GPU memory is sold and reported in."""
AUTOCAST_BYTES = 2
"""bf16 and fp16, the dtypes `trainer.mixed_precision` autocasts to."""
FP32 = 4
"""Bytes of the fp32 logits and softmax temporaries of the loss."""


@dataclass
class Memory:
    """Bytes per GPU of each part of a training step."""

    weights: float
    grads: float
    optimizer: float
    activations: float | None
    """None when the trace could not run the model's forward (the plan's notes say why)."""
    teacher: float = 0.0
    reference: float = 0.0
    """A preference objective's frozen copy of the base (full fine-tuning; adapter methods reuse the policy)."""
    logits: float = 0.0
    """The loss's transient logits: one chunk's with the chunked loss, the micro-batch's without."""

    @property
    def total(self) -> float | None:
        """The sum of the parts; None when the activations are unknown (a total without them would mislead)."""
        if self.activations is None:
            return None
        return self.weights + self.grads + self.optimizer + self.activations + self.teacher + self.reference + \
            self.logits


@dataclass
class Plan:
    """What `ftune plan` reports for one run."""

    recipe: str
    model: str
    method: str
    objective: str
    optimizer: str
    gpus: int
    sharding: str
    micro_batch_size: int
    seq_len: int
    grad_accum: int
    sequences_per_example: int
    effective_batch: int
    gradient_checkpointing: bool
    total_params: int
    trainable_params: int
    memory: Memory
    notes: dict[str, str] = field(default_factory=dict)
    """Component -> the arithmetic behind its figure, for the table."""


def plan_run(cfg: RunCfg, gpus: int = 1, sharding: str = "none", device: str = "cuda", *,
             step_loss: StepLossBuilder) -> Plan:
    """Count parameters and estimate memory per GPU for `cfg` on `gpus` GPUs with `sharding`.

    Args:
        cfg: a validated run config.
        gpus: processes (GPUs) the run is launched on.
        sharding: none (one GPU or DDP), zero2, zero3 or fsdp.
        device: `cuda`, or `cpu` to estimate a CPU run (ftune's CPU kernels, other dropout masks;
            `trainer.mixed_precision=auto` resolved for that device).
        step_loss: `ftune.train.losses.build_step_loss` (the trace runs the run's own loss).

    Returns:
        The plan; nothing is downloaded and no weight is allocated.

    Raises:
        ConfigError: bad `gpus` or `sharding`.
        ResourceError: no config.json for the model or the teacher.
    """
    check_distribution(gpus, sharding)
    if cfg.trainer.mixed_precision == "auto":
        cfg = replace(cfg, trainer=replace(cfg.trainer, mixed_precision=native_mixed_precision(device)))
    model, quantized = build_meta_model(cfg, device)
    total, trainable = count_parameters(model)
    weights, grads, optimizer, notes = replica_bytes(model, quantized, cfg, sharding)
    gathered = memory.GATHERED_LAYERS * max_layer_bytes(model, quantized, cfg, sharding)
    weights, grads, optimizer = memory.per_gpu(weights, grads, optimizer, gathered, sharding, gpus)
    reference = reference_bytes(model, quantized, cfg)
    sequences = sequences_per_example(cfg)
    rows = cfg.trainer.micro_batch_size * sequences
    tokens = rows * planned_seq_len(cfg)
    logits, notes["logits"] = logits_estimate(model, cfg, sharding, tokens)
    activation_total, notes["activations"] = activation_estimate(model, cfg, sharding, device, step_loss, rows,
                                                                 tokens)
    for part, how in sharding_notes(sharding, gpus).items():
        notes[part] += how
    return Plan(
        recipe=cfg.recipe, model=cfg.model.name_or_path, method=method_label(cfg), objective=cfg.objective.name,
        optimizer=cfg.optim.name,
        gpus=gpus, sharding=sharding, micro_batch_size=cfg.trainer.micro_batch_size, seq_len=planned_seq_len(cfg),
        sequences_per_example=sequences,
        grad_accum=cfg.trainer.grad_accum, effective_batch=effective_batch(cfg.trainer, gpus),
        gradient_checkpointing=cfg.model.gradient_checkpointing, total_params=total, trainable_params=trainable,
        memory=Memory(weights, grads, optimizer, activation_total, teacher_bytes(cfg, device), reference, logits),
        notes=notes,
    )


def sharding_notes(sharding: str, gpus: int) -> dict[str, str]:
    """How `memory.per_gpu` turned each replica-wide figure into a per-GPU one, for the table."""
    if sharding == "none":
        return {"gradients": ", x2 for DDP's all-reduce buckets"} if gpus > 1 else {}
    split = f", / {gpus} GPUs"
    gathered = f"{split} + {memory.GATHERED_LAYERS} gathered layers"
    return {"weights": gathered if sharding != "zero2" else "", "gradients": split, "optimizer": split}


def replica_bytes(
    model: torch.nn.Module, quantized: dict[int, int], cfg: RunCfg, sharding: str
) -> tuple[int, int, int, dict[str, str]]:
    """Weights, gradients and optimizer state of one unsharded replica, and the arithmetic behind them.

    Under DeepSpeed with mixed precision the engine runs the model in bf16/fp16 (weights and gradients at
    2 bytes) and its optimizer keeps fp32 master weights next to fp32 moments.
    """
    params = unique_parameters(model)
    trainable = [p for p in params if p.requires_grad]
    deepspeed_mp = sharding in ("zero2", "zero3") and cfg.trainer.mixed_precision != "no"
    cast = AUTOCAST_BYTES if deepspeed_mp else None
    weights = memory.weights_bytes(params, quantized, cast)
    grads = sum(memory.tensor_bytes(p, cast) for p in trainable)
    optimizer = memory.optimizer_bytes(cfg.optim.name, trainable, deepspeed_mp, embedding_ids(model))
    count = sum(p.numel() for p in trainable)
    notes = {
        "weights": weights_note(params, quantized, cfg.quant.bits, deepspeed_mp),
        "gradients": f"{grads / max(count, 1):.2f} bytes x {billions(count)} trainable",
        "optimizer": f"{optimizer / max(count, 1):.2f} bytes x {billions(count)} trainable",
    }
    return weights, grads, optimizer, notes


def check_distribution(gpus: int, sharding: str) -> None:
    """Raise a ConfigError unless `gpus` is positive and `sharding` is one of `memory.SHARDINGS`."""
    if gpus < 1:
        raise ConfigError(f"gpus={gpus}: expected a positive number of GPUs")
    if sharding not in memory.SHARDINGS:
        raise ConfigError(f"sharding={sharding}: expected one of {', '.join(memory.SHARDINGS)}")


def method_label(cfg: RunCfg) -> str:
    """`lora`, `qlora` (LoRA on a 4-bit base), `full`, ..., with `+distill` when a teacher is set."""
    name = "qlora" if cfg.method.name == "lora" and cfg.quant.bits == 4 else cfg.method.name
    name = f"{name} (base in {cfg.quant.bits} bits)" if cfg.quant.bits == 8 else name
    return f"{name}+distill" if cfg.distill.teacher else name


def teacher_trains_along(cfg: RunCfg) -> bool:
    """Whether a teacher is loaded beside the student while it trains: logit distillation.

    With `distill.mode=sequence` the teacher has answered before the student loads, and is gone by then.
    """
    return cfg.distill.teacher is not None and cfg.distill.mode == "logits"


def max_layer_bytes(model: torch.nn.Module, quantized: dict[int, int], cfg: RunCfg, sharding: str) -> int:
    """Bytes of the largest decoder layer as ZeRO-3/FSDP gather it (in the mixed-precision dtype, if any)."""
    if sharding not in ("zero3", "fsdp"):
        return 0
    cast = AUTOCAST_BYTES if cfg.trainer.mixed_precision != "no" else None
    layers = decoder_layers(model)
    return max(memory.weights_bytes(unique_parameters(layer), quantized, cast) for layer in layers)


def sequences_per_example(cfg: RunCfg) -> int:
    """Sequences one example puts through the trained forward: a DPO pair's two, a GRPO prompt's completions.

    A pair is planned as two full rows: an upper bound for a pair whose prompt both responses share in one row
    (`pref.share_prompt`), which holds the prompt once. The reference's forward runs without gradient, so it saves
    nothing for the backward; KTO's KL rows likewise. A GRPO prompt is planned as `grpo.num_generations` rows of
    prompt and completion, likewise an upper bound where its completions share the prompt in one row
    (`grpo.share_prompt`); generation's KV cache, freed before the backward, is not counted.
    """
    if cfg.objective.name == "grpo":
        return cfg.grpo.num_generations
    return 2 if cfg.objective.name == "dpo" else 1


def per_example_label(plan) -> str:
    """How the batch row names an example's sequences: `pairs x 2`, `prompts x 8` completions, or nothing."""
    if plan.sequences_per_example == 1:
        return ""
    return f" {'pairs' if plan.objective == 'dpo' else 'prompts'} x {plan.sequences_per_example}"


def reference_bytes(model: torch.nn.Module, quantized: dict[int, int], cfg: RunCfg) -> int:
    """The frozen reference copy full fine-tuning keeps for a preference loss (replicated on every GPU), else 0.

    Adapter methods take the reference from the policy itself (adapter off), with no second copy; a precomputed
    reference (`pref.reference=precompute`) keeps none either.
    """
    if not cfg.keeps_reference_model or cfg.method.name != "full":
        return 0
    return memory.weights_bytes(unique_parameters(model), quantized)


def planned_seq_len(cfg: RunCfg) -> int:
    """Tokens per sequence the model sees: `data.max_length`, plus prompt tuning's virtual tokens."""
    return cfg.data.max_length + (cfg.method.num_virtual_tokens if cfg.method.name == "prompt_tuning" else 0)


def logits_estimate(model: torch.nn.Module, cfg: RunCfg, sharding: str, tokens: int) -> tuple[float, str]:
    """The loss's transient logits for this run, and the note comparing chunked with unfused."""
    config = decoder_of(model).config
    embeddings = model.get_input_embeddings().weight
    matmul = AUTOCAST_BYTES if cfg.trainer.mixed_precision != "no" else embeddings.element_size()
    distill, trains = teacher_trains_along(cfg), head_trains(model)
    chunk = loss_chunk(cfg, sharding)
    sizes = (config.vocab_size, config.hidden_size, matmul, tokens)
    chunked = logits_bytes(*sizes, chunk, distill, trains)
    unfused = logits_bytes(*sizes, 0, distill, trains)
    how = f"chunks of {chunk} tokens (unfused: {unfused / GIB:.2f} GiB)" if chunk else "unfused (full logits)"
    return chunked, how


def logits_bytes(vocab: int, hidden: int, matmul: int, tokens: int, chunk: int, distill: bool,
                 head_trains: bool) -> float:
    """The loss's transient logits at their largest: the whole micro-batch's, or one chunk's.

    Unfused, the larger of two moments (the saved fp32 log-probabilities, alive through both, are activations):
    in the forward, the head's output in the matmul dtype (`matmul` bytes) and its fp32 upcast; in the backward of
    the log-softmax, the gradients of the log-probabilities and of the logits, both fp32 (the larger one: a real
    bf16-autocast step over a 128,256-row head peaked 15% above the forward-only count). Chunked, per token of a
    chunk: the fp32 logits and logsumexp's fp32 temporary, plus under autocast the 16-bit matmul output and the
    16-bit gradient fed to the backward matmuls;
    distillation adds the teacher's logits and the two tempered log-softmaxes and the teacher's probabilities
    (4 fp32 tensors). With a trainable head the chunked loss also accumulates the head's weight gradient in fp32.
    """
    cast = matmul if matmul != FP32 else 0
    if chunk == 0:
        return tokens * vocab * max(cast + FP32, 2 * FP32) * (2 if distill else 1)
    per_element = 2 * FP32 + 2 * cast + (4 * FP32 if distill else 0)
    weight_grad = FP32 * vocab * hidden if head_trains else 0
    return min(chunk, tokens) * vocab * per_element + weight_grad


def loss_chunk(cfg: RunCfg, sharding: str) -> int:
    """The loss's chunk size this run will use: 0 (full logits) where ZeRO-3 or FSDP shard the head's weight.

    The chunked loss reads the head's weight outside the model's forward, where only a shard of it exists
    (`train/head.py` falls back to the unfused loss there).
    """
    return 0 if sharding in ("zero3", "fsdp") else cfg.trainer.loss_chunk_size


def head_trains(model: torch.nn.Module) -> bool:
    """Whether the output head has a trainable weight (full fine-tuning, LoRA on it, modules_to_save)."""
    return any(p.requires_grad for p in model.get_output_embeddings().parameters())


def activation_estimate(model: torch.nn.Module, cfg: RunCfg, sharding: str, device: str,
                        step_loss: StepLossBuilder, rows: int, tokens: int) -> tuple[int | None, str]:
    """Activation bytes of one micro-batch of `rows` sequences, `tokens` tokens, traced (`plan/trace.py`).

    One GPU or DDP autocast the forward to the mixed-precision dtype; DeepSpeed and FSDP run the model in
    that dtype instead (weights cast, no autocast). The loss is the one this distribution runs (`loss_chunk`).
    A model whose modelling code the trace cannot run (fake tensors reach code that needs real ones) gets None
    and the reason: the counts and the other parts do not depend on the trace. `model` is left on fake tensors.
    """
    mixed = DTYPES.get(cfg.trainer.mixed_precision)
    if mixed is not None and sharding != "none":
        model.to(mixed)
    teacher = meta_teacher(cfg, device)[0] if teacher_trains_along(cfg) else None
    run = replace(cfg, trainer=replace(cfg.trainer, micro_batch_size=rows, loss_chunk_size=loss_chunk(cfg, sharding)))
    autocast = mixed if sharding == "none" else None
    try:
        trace = trace_step(model, run, cfg.data.max_length, autocast, step_loss, teacher)
    except Exception as err:  # noqa: BLE001 -- the trace runs the library's modelling code, whatever it raises
        return None, f"not traced ({first_line(err, 200)}); please report it"
    activations = trace.activations(cfg.model.gradient_checkpointing)
    return activations, f"{activations / tokens / 1024:.1f} KiB x {tokens} tokens"


def teacher_bytes(cfg: RunCfg, device: str) -> int:
    """Weights of the frozen distillation teacher (replicated on every GPU), 0 without one."""
    if not teacher_trains_along(cfg):
        return 0
    model, quantized = meta_teacher(cfg, device)
    return memory.weights_bytes(unique_parameters(model), quantized)


def effective_batch(trainer: TrainerCfg, gpus: int) -> int:
    """Sequences per optimizer step: micro batch x accumulation x processes."""
    return trainer.micro_batch_size * trainer.grad_accum * gpus


def weights_note(params: list, quantized: dict[int, int], bits: int, deepspeed_mp: bool) -> str:
    """Parameters by storage: `6.476B in 4-bit (4.127 bits each with constants) + 0.302B float32`."""
    by_dtype: dict[str, int] = {}
    for p in params:
        if id(p) not in quantized:
            dtype = "16-bit" if deepspeed_mp and p.is_floating_point() else str(p.dtype).removeprefix("torch.")
            by_dtype[dtype] = by_dtype.get(dtype, 0) + p.numel()
    parts = [f"{billions(n)} {dtype}" for dtype, n in by_dtype.items()]
    n_quant = sum(p.numel() for p in params if id(p) in quantized)
    if n_quant:
        parts.insert(0, f"{billions(n_quant)} in {bits}-bit ({8 * sum(quantized.values()) / n_quant:.3f} bits "
                        "each with constants)")
    return " + ".join(parts)


def billions(count: int) -> str:
    """A parameter count as the table shows it: 6.738B, 39.98M."""
    return f"{count / 1e9:.3f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def distribution_from_env() -> tuple[int, str]:
    """(gpus, sharding) of a run started by `accelerate launch`, read from the variables it sets.

    Lets `ftune train` print the plan of the distribution it actually runs under, before anything loads.
    """
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return gpus, "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        return gpus, "zero3" if stage == "3" else "zero2"
    return gpus, "none"


def gib(value: float | None) -> float | None:
    """Bytes as GiB rounded for JSON; None (not traced) stays None."""
    return None if value is None else round(value / GIB, 4)


def plan_to_json(plan: Plan) -> dict:
    """The plan as `ftune plan --json` prints it; `*_gb` are GiB."""
    gb = {f"{name}_gb": gib(value) for name, value in asdict(plan.memory).items()}
    return {
        "recipe": plan.recipe,
        "model": plan.model,
        "method": plan.method,
        "optimizer": plan.optimizer,
        "distribution": {"gpus": plan.gpus, "sharding": plan.sharding},
        "batch": {
            "micro_batch_size": plan.micro_batch_size, "seq_len": plan.seq_len, "grad_accum": plan.grad_accum,
            "sequences_per_example": plan.sequences_per_example,
            "effective_batch": plan.effective_batch,
            "gradient_checkpointing": plan.gradient_checkpointing,
        },
        "params": {"total": plan.total_params, "trainable": plan.trainable_params},
        "memory": gb | {"total_gb": gib(plan.memory.total)},
    }


def plan_rows(plan: Plan) -> dict[str, str]:
    """The plan as the two-column table `ftune plan` and `ftune train` print."""
    mem = plan.memory
    share = 100 * plan.trainable_params / max(plan.total_params, 1)
    rows = {
        "model": plan.model,
        "method / optimizer": f"{plan.method} / {plan.optimizer}",
        "distribution": f"{plan.gpus} GPU(s), sharding {plan.sharding}",
        "batch": f"{plan.micro_batch_size}{per_example_label(plan)} x {plan.seq_len} "
                 f"tokens per GPU, accumulation {plan.grad_accum}, "
                 f"effective {plan.effective_batch}; gradient checkpointing "
                 f"{'on' if plan.gradient_checkpointing else 'off'}",
        "parameters": f"{plan.total_params:,} total, {plan.trainable_params:,} trainable ({share:.3f}%)",
        "weights": f"{mem.weights / GIB:.2f} GiB   {plan.notes.get('weights', '')}",
        "gradients": f"{mem.grads / GIB:.2f} GiB   {plan.notes.get('gradients', '')}",
        "optimizer state": f"{mem.optimizer / GIB:.2f} GiB   {plan.notes.get('optimizer', '')}",
        "activations": f"{'?' if mem.activations is None else f'{mem.activations / GIB:.2f}'} GiB   "
                       f"{plan.notes.get('activations', '')}",
        "logits": f"{mem.logits / GIB:.2f} GiB   {plan.notes.get('logits', '')}",
    }
    if mem.teacher:
        rows["teacher weights"] = f"{mem.teacher / GIB:.2f} GiB"
    if mem.reference:
        rows["reference weights"] = f"{mem.reference / GIB:.2f} GiB   a frozen copy of the base"
    rows["total per GPU"] = ("unknown: the activations were not traced" if mem.total is None else
                             f"{mem.total / GIB:.2f} GiB (+ CUDA context and allocator slack, ~1-2 GiB)")
    return rows
