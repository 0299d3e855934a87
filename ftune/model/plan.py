"""`ftune plan`: exact parameter counts and a per-GPU memory estimate, without downloading or loading weights.

The model is built on the meta device from its config.json (`model/meta.py`), the recipe's method applied to
it exactly as training does, and the counts and dtypes are read off its tensors. Memory per GPU is the sum of:
- weights: every tensor at its dtype, quantized ones by bitsandbytes' storage (`model/memory.py`);
- gradients: the trainable tensors at their dtype;
- optimizer state: by `optim.name` (`model/memory.py`);
- activations: one micro-batch of `data.max_length` tokens (`model/activations.py`);
- logits: the loss's transient logits, one chunk's (`trainer.loss_chunk_size`) or, unfused, the micro-batch's;
- the distillation teacher's weights;
divided by the distribution (`gpus=N sharding=none|zero2|zero3|fsdp`, see `memory.per_gpu`).
"""

import os
from dataclasses import asdict, dataclass, field, replace

import torch
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer

from ftune.config.schema import RunCfg, TrainerCfg
from ftune.errors import ConfigError
from ftune.model import activations as act
from ftune.model import memory
from ftune.model.dropout import SPARSE_UP_TO, folds_into_lora_a
from ftune.model.dtypes import native_mixed_precision
from ftune.model.load import count_parameters
from ftune.model.lora_linear import fuses
from ftune.model.meta import (
    build_meta_model,
    decoder_of,
    embedding_ids,
    load_model_config,
    meta_model,
    quantized_storage,
    unique_parameters,
)

GIB = 2**30
"""The `*_gb` figures are GiB, the unit GPU memory is sold and reported in."""
AUTOCAST_BYTES = 2
"""bf16 and fp16, the dtypes `trainer.mixed_precision` autocasts to."""
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
"""`model_type`s whose decoder layer the activation formula describes (RMSNorm, RoPE attention, SwiGLU MLP)."""
LLAMA_LIKE = {
    "qwen3": "QK-norm's per-head normalisations not counted",
    "gemma3_text": "Gemma's extra pre/post-MLP norms not counted",
}
"""`model_type`s that are a Llama layer plus small normalisations the formula leaves out (a few % of the
activations): planned, with the omission named next to the figure."""


@dataclass
class Memory:
    """Bytes per GPU of each part of a training step."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    teacher: float = 0.0
    logits: float = 0.0
    """The loss's transient logits: one chunk's with the chunked loss, the micro-batch's without."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.teacher + self.logits


@dataclass
class Plan:
    """What `ftune plan` reports for one run."""

    recipe: str
    model: str
    method: str
    optimizer: str
    gpus: int
    sharding: str
    micro_batch_size: int
    seq_len: int
    grad_accum: int
    effective_batch: int
    gradient_checkpointing: bool
    total_params: int
    trainable_params: int
    memory: Memory
    notes: dict[str, str] = field(default_factory=dict)
    """Component -> the arithmetic behind its figure, for the table."""


def plan_run(cfg: RunCfg, gpus: int = 1, sharding: str = "none", device: str = "cuda") -> Plan:
    """Count parameters and estimate memory per GPU for `cfg` on `gpus` GPUs with `sharding`.

    Args:
        cfg: a validated run config.
        gpus: processes (GPUs) the run is launched on.
        sharding: none (one GPU or DDP), zero2, zero3 or fsdp.
        device: `cuda`, or `cpu` to estimate a CPU run (other dropout masks; `trainer.mixed_precision=auto`
            resolved for that device).

    Returns:
        The plan; nothing is downloaded and no weight is allocated.

    Raises:
        ConfigError: bad `gpus` or `sharding`, or a model outside the Llama family.
        ResourceError: no config.json for the model or the teacher.
    """
    check_distribution(gpus, sharding)
    if cfg.trainer.mixed_precision == "auto":
        cfg = replace(cfg, trainer=replace(cfg.trainer, mixed_precision=native_mixed_precision(device)))
    model, quantized = build_meta_model(cfg)
    check_architecture(model.config.model_type, cfg.model.name_or_path)
    weights, grads, optimizer, notes = replica_bytes(model, quantized, cfg, sharding)
    gathered = memory.GATHERED_LAYERS * max_layer_bytes(model, quantized, cfg, sharding)
    weights, grads, optimizer = memory.per_gpu(weights, grads, optimizer, gathered, sharding, gpus)
    activation_total, seq_len = activation_estimate(model, quantized, cfg, sharding, device)
    tokens = cfg.trainer.micro_batch_size * seq_len
    notes["activations"] = f"{activation_total / tokens / 1024:.1f} KiB x {tokens} tokens"
    if model.config.model_type in LLAMA_LIKE:
        notes["activations"] += f" ({LLAMA_LIKE[model.config.model_type]})"
    logits, notes["logits"] = logits_estimate(model, quantized, cfg, sharding, device, tokens)
    for part, how in sharding_notes(sharding, gpus).items():
        notes[part] += how
    total, trainable = count_parameters(model)
    return Plan(
        recipe=cfg.recipe, model=cfg.model.name_or_path, method=method_label(cfg), optimizer=cfg.optim.name,
        gpus=gpus, sharding=sharding, micro_batch_size=cfg.trainer.micro_batch_size, seq_len=seq_len,
        grad_accum=cfg.trainer.grad_accum, effective_batch=effective_batch(cfg.trainer, gpus),
        gradient_checkpointing=cfg.model.gradient_checkpointing, total_params=total, trainable_params=trainable,
        memory=Memory(weights, grads, optimizer, activation_total, teacher_bytes(cfg), logits), notes=notes,
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


def check_architecture(model_type: str, name_or_path: str) -> None:
    """Raise a ConfigError for a model whose layers the activation formula does not describe."""
    if model_type not in (*LLAMA_FAMILY, *LLAMA_LIKE):
        raise ConfigError(f"model.name_or_path={name_or_path}: ftune plan estimates Llama-family decoders "
                          f"({', '.join((*LLAMA_FAMILY, *LLAMA_LIKE))}), not model_type {model_type}")


def method_label(cfg: RunCfg) -> str:
    """`lora`, `qlora` (LoRA on a 4-bit base), `full`, ..., with `+distill` when a teacher is set."""
    name = "qlora" if cfg.method.name == "lora" and cfg.quant.bits == 4 else cfg.method.name
    name = f"{name} (base in {cfg.quant.bits} bits)" if cfg.quant.bits == 8 else name
    return f"{name}+distill" if cfg.distill.teacher else name


def max_layer_bytes(model: torch.nn.Module, quantized: dict[int, int], cfg: RunCfg, sharding: str) -> int:
    """Bytes of the largest decoder layer as ZeRO-3/FSDP gather it (in the mixed-precision dtype, if any)."""
    if sharding not in ("zero3", "fsdp"):
        return 0
    cast = AUTOCAST_BYTES if cfg.trainer.mixed_precision != "no" else None
    layers = decoder_of(model).layers
    return max(memory.weights_bytes(unique_parameters(layer), quantized, cast) for layer in layers)


def model_shape(model: torch.nn.Module) -> act.Shape:
    """The decoder's dimensions that activations scale with."""
    config = decoder_of(model).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return act.Shape(
        hidden=config.hidden_size, intermediate=config.intermediate_size,
        q_dim=config.num_attention_heads * head_dim, kv_dim=config.num_key_value_heads * head_dim,
        heads=config.num_attention_heads, vocab=config.vocab_size,
    )


def logits_estimate(model: torch.nn.Module, quantized: dict[int, int], cfg: RunCfg, sharding: str, device: str,
                    tokens: int) -> tuple[float, str]:
    """The loss's transient logits for this run, and the note comparing chunked with unfused."""
    shape = model_shape(model)
    prec = precision(model, cfg, sharding, device, four_bit=bool(quantized) and cfg.quant.bits == 4)
    distill, trains = cfg.distill.teacher is not None, head_trains(model)
    chunk = loss_chunk(cfg, sharding)
    chunked = act.logits_bytes(shape, prec, tokens, chunk, distill, trains)
    unfused = act.logits_bytes(shape, prec, tokens, 0, distill, trains)
    how = f"chunks of {chunk} tokens (unfused: {unfused / GIB:.2f} GiB)" if chunk else "unfused (full logits)"
    return chunked, how


def loss_chunk(cfg: RunCfg, sharding: str) -> int:
    """The loss's chunk size this run will use: 0 (full logits) where ZeRO-3 or FSDP shard the head's weight.

    The chunked loss reads the head's weight outside the model's forward, where only a shard of it exists
    (`train/head.py` falls back to the unfused loss there).
    """
    return 0 if sharding in ("zero3", "fsdp") else cfg.trainer.loss_chunk_size


def head_trains(model: torch.nn.Module) -> bool:
    """Whether the output head has a trainable weight (full fine-tuning, LoRA on it, modules_to_save)."""
    return any(p.requires_grad for p in model.get_output_embeddings().parameters())


def activation_estimate(
    model: torch.nn.Module, quantized: dict[int, int], cfg: RunCfg, sharding: str, device: str
) -> tuple[float, int]:
    """Activation bytes of one micro-batch (plus autocast's weight copies), and the sequence length used."""
    shape = model_shape(model)
    prec = precision(model, cfg, sharding, device, four_bit=bool(quantized) and cfg.quant.bits == 4)
    seq_len = cfg.data.max_length + (cfg.method.num_virtual_tokens if cfg.method.name == "prompt_tuning" else 0)
    decoder = decoder_of(model)
    layers = [layer_training(layer, device) for layer in decoder.layers]
    head = act.head_token_bytes(shape, prec, head_trains(model), decoder.norm.weight.requires_grad,
                                cfg.distill.teacher is not None, loss_chunk(cfg, sharding) > 0)
    eager = cfg.model.attn_implementation == "eager"
    total = act.activation_bytes(shape, prec, layers, head, cfg.trainer.micro_batch_size * seq_len, seq_len,
                                 eager, cfg.model.gradient_checkpointing)
    return total + autocast_copy_bytes(model, quantized, prec, cfg.model.gradient_checkpointing), seq_len


def precision(model: torch.nn.Module, cfg: RunCfg, sharding: str, device: str, four_bit: bool) -> act.Precision:
    """Bytes of the kept tensors.

    DeepSpeed and FSDP compute in the mixed-precision dtype (weights cast, no autocast); one GPU or DDP
    autocasts matmuls. bitsandbytes' 4-bit layers return their input's dtype: the norms' output, fp32 once
    k-bit preparation upcast the norms.
    """
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    adapter = lora[0].element_size() if lora else act.FP32
    mixed = cfg.trainer.mixed_precision != "no"
    if mixed and sharding != "none":
        return act.Precision(AUTOCAST_BYTES, AUTOCAST_BYTES, AUTOCAST_BYTES, AUTOCAST_BYTES, autocast=False)
    decoder = decoder_of(model)
    residual = decoder.embed_tokens.weight.element_size()
    if not mixed:
        return act.Precision(residual, residual, residual, adapter, autocast=False)
    mlp = max(residual, decoder.norm.weight.element_size()) if four_bit else AUTOCAST_BYTES
    return act.Precision(AUTOCAST_BYTES, mlp, residual, AUTOCAST_BYTES, autocast=True)


def layer_training(layer: torch.nn.Module, device: str) -> act.LayerTraining:
    """What trains in one decoder layer: base projections, norms, LoRA or IA3 adapters."""
    loras = tuple(
        act.LoraSite(name.rsplit(".", 1)[-1], module.in_features, module.r[adapter],
                     dropout_mask_bytes(module.lora_dropout[adapter], module.lora_A[adapter].weight, device),
                     keeps_dropped_copy(module, adapter, device), fuses(module, adapter, device))
        for name, module in layer.named_modules() if isinstance(module, LoraLayer)
        for adapter in module.active_adapters
    )
    linears = any(m.weight.requires_grad for name, m in layer.named_modules()
                  if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    ia3 = tuple(
        act.Ia3Site(module.in_features if module.is_feedforward else module.out_features, module.is_feedforward)
        for module in layer.modules() if isinstance(module, IA3Layer)
    )
    norms = any(p.requires_grad for n, p in layer.named_parameters() if "norm" in n)
    return act.LayerTraining(linears=linears, norms=norms, loras=loras, ia3=ia3)


def dropout_mask_bytes(dropout: torch.nn.Module, lora_a: torch.Tensor, device: str) -> float:
    """Bytes per input element a LoRA dropout keeps for the backward.

    A bool mask on CUDA; on CPU the int64 positions of the dropped share p (ftune's SparseDropout, which
    `add_adapter` installs), or torch's float mask in the adapter dtype above SPARSE_UP_TO. PEFT uses an
    Identity when p = 0: nothing kept.
    """
    if not isinstance(dropout, torch.nn.Dropout) or dropout.p == 0:
        return 0.0
    if device == "cuda":
        return 1.0
    return 8 * dropout.p if dropout.p <= SPARSE_UP_TO else float(lora_a.element_size())


def keeps_dropped_copy(module: LoraLayer, adapter: str, device: str) -> bool:
    """Whether lora_A keeps a dropped copy of its input: not where `use_sparse_dropout` folds the dropout into it.

    It folds on CPU up to SPARSE_UP_TO (model/dropout.py's `draws_positions`); read only where the dropout drops.
    """
    p = getattr(module.lora_dropout[adapter], "p", 0.0)
    return not (device == "cpu" and p <= SPARSE_UP_TO and folds_into_lora_a(module, adapter))


def autocast_copy_bytes(model: torch.nn.Module, quantized: dict[int, int], prec: act.Precision,
                        checkpointing: bool) -> float:
    """Autocast's 16-bit copies of floating linear weights, kept from the forward until the backward.

    With gradient checkpointing a layer's copies live only while it is recomputed: the head's and one layer's.
    """
    if not prec.autocast:
        return 0

    def copies(module: torch.nn.Module) -> int:
        return sum(AUTOCAST_BYTES * m.weight.numel() for m in module.modules()
                   if isinstance(m, torch.nn.Linear) and id(m.weight) not in quantized
                   and m.weight.element_size() != AUTOCAST_BYTES)

    layers = [copies(layer) for layer in decoder_of(model).layers]
    head = copies(model.get_output_embeddings())
    return head + (max(layers, default=0) if checkpointing else sum(layers))


def teacher_bytes(cfg: RunCfg) -> int:
    """Weights of the frozen distillation teacher (replicated on every GPU), 0 without one."""
    if cfg.distill.teacher is None:
        return 0
    model = meta_model(load_model_config(cfg.distill.teacher, "distill.teacher"), cfg.model.dtype)
    bits = cfg.distill.teacher_bits
    quantized = quantized_storage(model, bits, cfg.quant.double_quant) if bits else {}
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


def plan_to_json(plan: Plan) -> dict:
    """The plan as `ftune plan --json` prints it; `*_gb` are GiB."""
    gb = {f"{name}_gb": round(value / GIB, 4) for name, value in asdict(plan.memory).items()}
    return {
        "recipe": plan.recipe,
        "model": plan.model,
        "method": plan.method,
        "optimizer": plan.optimizer,
        "distribution": {"gpus": plan.gpus, "sharding": plan.sharding},
        "batch": {
            "micro_batch_size": plan.micro_batch_size, "seq_len": plan.seq_len, "grad_accum": plan.grad_accum,
            "effective_batch": plan.effective_batch,
            "gradient_checkpointing": plan.gradient_checkpointing,
        },
        "params": {"total": plan.total_params, "trainable": plan.trainable_params},
        "memory": gb | {"total_gb": round(plan.memory.total / GIB, 4)},
    }


def plan_rows(plan: Plan) -> dict[str, str]:
    """The plan as the two-column table `ftune plan` and `ftune train` print."""
    mem = plan.memory
    share = 100 * plan.trainable_params / max(plan.total_params, 1)
    rows = {
        "model": plan.model,
        "method / optimizer": f"{plan.method} / {plan.optimizer}",
        "distribution": f"{plan.gpus} GPU(s), sharding {plan.sharding}",
        "batch": f"{plan.micro_batch_size} x {plan.seq_len} tokens per GPU, accumulation {plan.grad_accum}, "
                 f"effective {plan.effective_batch}; gradient checkpointing "
                 f"{'on' if plan.gradient_checkpointing else 'off'}",
        "parameters": f"{plan.total_params:,} total, {plan.trainable_params:,} trainable ({share:.3f}%)",
        "weights": f"{mem.weights / GIB:.2f} GiB   {plan.notes.get('weights', '')}",
        "gradients": f"{mem.grads / GIB:.2f} GiB   {plan.notes.get('gradients', '')}",
        "optimizer state": f"{mem.optimizer / GIB:.2f} GiB   {plan.notes.get('optimizer', '')}",
        "activations": f"{mem.activations / GIB:.2f} GiB   {plan.notes.get('activations', '')}",
        "logits": f"{mem.logits / GIB:.2f} GiB   {plan.notes.get('logits', '')}",
    }
    if mem.teacher:
        rows["teacher weights"] = f"{mem.teacher / GIB:.2f} GiB"
    rows["total per GPU"] = f"{mem.total / GIB:.2f} GiB (+ CUDA context and allocator slack, ~1-2 GiB)"
    return rows
