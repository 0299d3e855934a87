"""The model as training prepares it, built on the meta device from its config.json: shapes and dtypes, no memory.

`ftune plan` reads parameter counts and dtypes off it, and traces a training step through it (`plan/trace.py`).
The config comes from a local directory, from the config.json files shipped for public models
(ftune/configs/hub/<org>/<name>/config.json, so planning needs no network), or from the hub cache.

bitsandbytes cannot quantize meta tensors, so a quantized linear layer is built as `QuantizedLinear`: the
unquantized weight (its storage is counted apart, `quantized_storage`), computing what bitsandbytes' layer
computes in the dtypes it computes in, and keeping for the backward what its matmul keeps.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from peft import prepare_model_for_kbit_training
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ftune.compat import modules_kept_unquantized
from ftune.config.architecture import HUB_CONFIGS, config_dir
from ftune.config.schema import ModelCfg, RunCfg
from ftune.errors import ResourceError
from ftune.kernels import kernels_on
from ftune.kernels.dropout import DroppedLinear
from ftune.model.adapters import add_adapter
from ftune.model.dtypes import DTYPES, quant_compute_dtype
from ftune.model.instrument import instrument
from ftune.model.load import freeze_matching, new_token_ids
from ftune.model.vocab import adds_tokens, extend_embeddings
from ftune.plan import memory

TRACED_SDPA = "ftune_traced_sdpa"
"""The attention `model.attn_implementation=sdpa` is traced with (see `traced_sdpa`); flash-attention keeps what
SDPA's flash kernel keeps (q, k, v, the output and a log-sum-exp per head), so it is traced the same way."""


def traced_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention (transformers') as it runs on unpadded rows: causal, without a mask.

    Registered under its own name, which transformers builds no mask for: on fake tensors it cannot read the
    (unknown) attention mask and position ids to see that none is needed, and would build one that a real
    step does not have.
    """
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


AttentionInterface.register(TRACED_SDPA, traced_sdpa)


def load_model_config(name_or_path: str, key: str = "model.name_or_path") -> PretrainedConfig:
    """The model's config: a local directory's config.json, a shipped one (ftune/configs/hub/ID), or the hub cache.

    Raises:
        ResourceError: none of them has a config.json for `name_or_path`.
    """
    directory = config_dir(name_or_path)
    if directory is not None:
        return AutoConfig.from_pretrained(directory)
    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ResourceError(
            f"{key}={name_or_path}: no config.json (not a local directory, not shipped under {HUB_CONFIGS}, "
            "not in the hub cache)",
            f"add {HUB_CONFIGS / name_or_path / 'config.json'} or point {key} at a directory",
        ) from err


def build_meta_model(cfg: RunCfg, device: str = "cuda") -> tuple[torch.nn.Module, dict[int, int]]:
    """The model as a run on `device` (cuda or cpu) prepares it, on the meta device; its quantized weights' storage.

    Mirrors `model/load.py`'s `prepare_model`: quantize (here: `QuantizedLinear` layers, and the storage
    bitsandbytes would give their weights), k-bit preparation (freeze, upcast the rest to fp32, as
    `quant.prepare_quantized`), then the method: `method.freeze` for full fine-tuning, or `add_adapter`, then
    `instrument` with ftune's CPU kernels where `trainer.cpu_kernels` uses them on `device`, and on CUDA what a
    CUDA run computes for torch's dropout (`as_on_cuda`). Gradient checkpointing is left off: the trace reads each
    layer's working set.
    """
    bits = cfg.quant.bits
    config = load_model_config(cfg.model.name_or_path)
    model = meta_model(config, cfg.model.dtype, cfg.model.attn_implementation)
    token_ids = planned_token_ids(cfg.model, config)
    extend_embeddings(model, token_ids)
    quantized = quantized_storage(model, bits, cfg.quant.double_quant) if bits else {}
    if quantized:
        use_quantized_layers(model, quantized, bits, quant_compute_dtype(cfg.quant.compute_dtype, device), device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    if cfg.method.name == "full":
        freeze_matching(model, cfg.method.freeze, cfg.method.train_only)
        return model, quantized
    with torch.device("meta"):  # the adapter's weights on the meta device too
        model = add_adapter(model, cfg.method, cfg.lora, cfg.model.gradient_checkpointing, token_ids)
    instrument(model, kernels=kernels_on(cfg.trainer.cpu_kernels, device))
    if device == "cuda":
        as_on_cuda(model, quantized, cfg.trainer.mixed_precision != "no")
    return model, quantized


def planned_token_ids(cfg: ModelCfg, config: PretrainedConfig) -> list[int]:
    """The ids `model.add_tokens`/`add_special_tokens` get, for the rows the run adds and trains (empty: none).

    Read from the tokenizer of a local model. A hub model's tokenizer is not at hand offline, so its new tokens are
    taken to follow the config's `vocab_size`: for a matrix padded beyond its tokenizer (Qwen2.5), the plan then
    counts rows that the run finds among the padding instead of adding (the trainable count is the same).
    """
    if not adds_tokens(cfg):
        return []
    if Path(cfg.name_or_path).is_dir():
        return new_token_ids(cfg)
    vocab = config.get_text_config().vocab_size
    return list(range(vocab, vocab + len(cfg.add_tokens) + len(cfg.add_special_tokens)))


def meta_model(config: PretrainedConfig, dtype: str, attention: str = "sdpa") -> torch.nn.Module:
    """The causal LM of `config` in `dtype` on the meta device, with `attention` as the trace runs it."""
    traced = "eager" if attention == "eager" else TRACED_SDPA
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], attn_implementation=traced)


class _FrozenMatmul(torch.autograd.Function):
    """y = x W^T + b in `dtype` for a frozen quantized W, keeping x for the backward only if `keep`."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype: torch.dtype, keep: bool):
        ctx.save_for_backward(weight, *([x] if keep else []))
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.saved_tensors[0]
        return grad @ weight.to(grad.dtype), None, None, None, None


class QuantizedLinear(torch.nn.Linear):
    """A bitsandbytes 4- or 8-bit linear layer, computed unquantized, with the dtypes and saved tensors of its own.

    - 4-bit (`Linear4bit`): casts its input to the compute dtype, multiplies there (autocast does not reach
      bitsandbytes' kernel) and returns its input's dtype; `MatMul4Bit` keeps only the packed weight.
    - 8-bit (`Linear8bitLt`): keeps its input (`MatMul8bitFp` on CPU, `MatMul8bitLt` on CUDA, on the autograd
      context where saved-tensor hooks do not see it: in memory all the same); on CPU the matmul autocasts, on
      CUDA it returns its input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            return _FrozenMatmul.apply(x.to(self.compute_dtype), self.weight, self.bias, self.compute_dtype,
                                       False).to(x.dtype)
        autocast = self.run_device == "cpu" and torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        return _FrozenMatmul.apply(x, self.weight, self.bias, dtype, True)


def use_quantized_layers(model: torch.nn.Module, quantized: dict[int, int], bits: int, compute_dtype: torch.dtype,
                         device: str) -> None:
    """Turn each linear layer whose weight bitsandbytes quantizes into a `QuantizedLinear` (same weight)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear and id(module.weight) in quantized:
            module.__class__ = QuantizedLinear
            module.bits, module.compute_dtype, module.run_device = bits, compute_dtype, device


class CudaDropout(torch.nn.Dropout):
    """torch's dropout as CUDA runs it: one kernel that keeps a bool mask (on CPU torch keeps a float one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_dropout(x, self.p, self.training)[0] if self.p > 0 else x


def as_on_cuda(model: torch.nn.Module, quantized: dict[int, int], autocast: bool) -> None:
    """What a CUDA run computes for LoRA dropout and bitsandbytes' layers, in a model traced on CPU tensors.

    LoRA dropout is torch's CUDA kernel, also where `trainer.cpu_kernels=on` folded it into lora_A
    (`kernels/dropout.py` draws positions on CPU only): lora_A a plain linear again, the dropout a `CudaDropout`,
    so the LoRA layer runs PEFT's forward (`FusedLoraLinear` fuses on CUDA only without dropout, which it still
    does here). PEFT's LoRA layers over bitsandbytes weights leave their input uncast under CUDA autocast
    (`torch.is_autocast_enabled()` reads CUDA's).
    """
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            lora_a = module.lora_A[name]
            if isinstance(lora_a, DroppedLinear):
                lora_a.__class__ = torch.nn.Linear
                dropouts[name] = CudaDropout(lora_a.p)
            elif isinstance(dropout, torch.nn.Dropout):
                dropouts[name] = CudaDropout(dropout.p)
        base = module.get_base_layer()
        if autocast and getattr(base, "weight", None) is not None and id(base.weight) in quantized:
            module.cast_input_dtype_enabled = False


def meta_teacher(cfg: RunCfg, device: str = "cuda") -> tuple[torch.nn.Module, dict[int, int]]:
    """The frozen distillation teacher as `model/load.py`'s `load_teacher` loads it, on the meta device."""
    model = meta_model(load_model_config(cfg.distill.teacher, "distill.teacher"), cfg.model.dtype,
                       cfg.model.attn_implementation)
    bits = cfg.distill.teacher_bits
    quantized = quantized_storage(model, bits, cfg.quant.double_quant) if bits else {}
    use_quantized_layers(model, quantized, bits, quant_compute_dtype(cfg.quant.compute_dtype, device), device)
    model.requires_grad_(False)
    return model.eval(), quantized


def quantized_storage(model: torch.nn.Module, bits: int, double_quant: bool) -> dict[int, int]:
    """Map id(weight) to the storage bytes of each weight transformers' bitsandbytes integration quantizes.

    That is every nn.Linear but the ones `modules_kept_unquantized` names (the output head, tied weights).
    """
    skip = set(modules_kept_unquantized(model))
    return {
        id(module.weight): memory.quantized_bytes(module.weight.numel(), module.out_features, bits, double_quant)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in skip
    }


def embedding_ids(model: torch.nn.Module) -> frozenset[int]:
    """The id() of each embedding weight (their 8-bit optimizer states are kept in 32 bits)."""
    return frozenset(id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding))


def unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter once (tied weights are one tensor)."""
    return list({id(p): p for p in model.parameters()}.values())


