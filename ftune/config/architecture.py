"""What ftune knows about model architectures, read from config.json alone (no torch, no transformers).

Validation (`config/validate.py`) refuses a family/feature combination that cannot work before anything loads,
and `model/attention.py` builds the per-layer masks of packed rows from the same facts.
"""

import json
from pathlib import Path

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "hub"
"""config.json of public models, at hub/<org>/<name>/config.json (the same folder `model/meta.py` reads)."""
MASKS_BY_LAYER_TYPE = frozenset({"gemma2", "gemma3_text", "qwen2", "qwen3"})
"""model_types whose decoder takes `attention_mask` as a dict {layer type: 4D mask} (transformers 5), so
sliding and global layers can get different masks inside one packed row."""
ONE_MASK_SLIDING = frozenset({"mistral", "mixtral", "phi3", "qwen3_moe"})
"""model_types that slide every layer when `sliding_window` is set, with one mask for all layers. Both sets
list only what was checked against transformers 5.24's modelling code and the model matrix (pytest -m models)."""
NO_SDPA = {"gemma2": "sdpa drops Gemma 2's attention logit soft-capping (transformers refuses it)"}
"""model_type -> why `attn_implementation=sdpa` cannot run it faithfully."""


def read_model_config(name_or_path: str) -> dict | None:
    """config.json of a local directory or of a model shipped under `HUB_CONFIGS`; None when neither has one.

    A hub id that is only in the hub cache is not read here: validation then checks nothing about it.
    """
    directory = config_dir(name_or_path)
    if directory is None:
        return None
    config = json.loads((directory / "config.json").read_text())
    return config.get("text_config") or config  # multimodal checkpoints nest the decoder's config


def config_dir(name_or_path: str) -> Path | None:
    """The directory holding `name_or_path`'s config.json: the local directory itself, else the shipped copy."""
    return next((d for d in (Path(name_or_path), HUB_CONFIGS / name_or_path) if (d / "config.json").is_file()), None)


def sliding_layers(config: dict) -> bool:
    """Whether any attention layer of `config` uses a sliding window.

    Qwen2/Qwen3 configs carry a `sliding_window` even when `use_sliding_window` is false, so the flag decides.
    """
    if config.get("sliding_window") is None or config.get("use_sliding_window") is False:
        return False
    types = config.get("layer_types")
    return types is None or "sliding_attention" in types  # without layer_types, every layer (or Gemma's pattern)


def is_mixture_of_experts(config: dict) -> bool:
    """Whether the config routes tokens to experts (Mixtral's `num_local_experts`, Qwen-MoE's `num_experts`)."""
    return bool(config.get("num_local_experts") or config.get("num_experts"))


def packing_problem(config: dict) -> str | None:
    """Why packed rows cannot be masked faithfully for this architecture, or None when they can."""
    model_type = config.get("model_type")
    if not sliding_layers(config) or model_type in MASKS_BY_LAYER_TYPE | ONE_MASK_SLIDING:
        return None
    return (f"model_type {model_type} has sliding-window layers ftune cannot mask per document in a packed row "
            "(set data.packing=false)")
