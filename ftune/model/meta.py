"""The model as training prepares it, built on the meta device from its config.json: shapes and dtypes, no memory.

`ftune plan` reads parameter counts and dtypes off it. The config comes from a local directory, from the
config.json files shipped for public models (ftune/configs/hub/<org>/<name>/config.json, so planning needs no
network), or from the hub cache.
"""

import warnings

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.quantizers.base import get_keys_to_not_convert

from ftune.config.architecture import HUB_CONFIGS, config_dir
from ftune.config.schema import RunCfg
from ftune.errors import ResourceError
from ftune.model import memory
from ftune.model.adapters import peft_config
from ftune.model.dtypes import DTYPES
from ftune.model.load import freeze_matching


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


def build_meta_model(cfg: RunCfg) -> tuple[torch.nn.Module, dict[int, int]]:
    """The model as training prepares it, on the meta device, and the storage of its quantized weights.

    Mirrors `model/load.py`'s `prepare_model`: quantize (here: note which weights bitsandbytes would quantize
    and their storage), k-bit preparation (freeze, upcast the rest to fp32, as `quant.prepare_quantized`), then
    the method: `method.freeze` for full fine-tuning, or the PEFT adapter.
    """
    model = meta_model(load_model_config(cfg.model.name_or_path), cfg.model.dtype)
    quantized = quantized_storage(model, cfg.quant.bits, cfg.quant.double_quant) if cfg.quant.bits else {}
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.method.name == "full":
        freeze_matching(model, cfg.method.freeze)
        return model, quantized
    with warnings.catch_warnings():  # transformers 5 deprecates a call PEFT makes; nothing a user can act on
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        # low_cpu_mem_usage: PEFT creates the adapter weights on the meta device too (no memory, no init time).
        return get_peft_model(model, peft_config(cfg.method, cfg.lora, model), low_cpu_mem_usage=True), quantized


def meta_model(config: PretrainedConfig, dtype: str) -> torch.nn.Module:
    """The causal LM of `config` in `dtype` on the meta device: shapes and dtypes, no memory.

    Built with eager attention: the kernel changes no parameter, and flash-attention need not be installed.
    """
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], attn_implementation="eager")


def quantized_storage(model: torch.nn.Module, bits: int, double_quant: bool) -> dict[int, int]:
    """Map id(weight) to the storage bytes of each weight transformers' bitsandbytes integration quantizes.

    That is every nn.Linear but the ones `get_keys_to_not_convert` keeps (the output head, tied weights).
    """
    skip = set(get_keys_to_not_convert(model))
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


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (embeddings, `layers`, final `norm`) inside a causal LM or a PeftModel around one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()
