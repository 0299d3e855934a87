"""What ftune knows about model architectures, read from config.json alone (no torch, no transformers).

Validation (`config/validate.py`) refuses a family/feature combination that cannot work before anything loads.
Every fact here is read from the config's own keys, the ones transformers 5's modelling code reads, never from
a list of `model_type`s: a family ftune has never seen is judged by what its config says it does.
"""

import json
from pathlib import Path

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "hub"
"""config.json of public models, at hub/<org>/<name>/config.json (the same folder `plan/meta.py` reads)."""
FULL, SLIDING = "full_attention", "sliding_attention"
"""transformers 5's `layer_types` of causal attention, whole or windowed: the masks ftune builds for packed rows."""
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
"""The config keys transformers 5's mixture-of-experts families keep their number of routed experts under
(Mixtral, GPT-OSS; OLMoE, Qwen-MoE; DeepSeek, GLM-MoE; ERNIE 4.5)."""


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
    """Whether any attention layer of `config` may use a sliding window.

    Qwen2/Qwen3 configs carry a `sliding_window` even when `use_sliding_window` is false, so the flag decides.
    Without `layer_types`, which layers slide is the model class's default (every layer for Mistral, every other
    one for Gemma 2): some layer may, and that is all this says.
    """
    if config.get("sliding_window") is None or config.get("use_sliding_window") is False:
        return False
    types = config.get("layer_types")
    return types is None or SLIDING in types


def unmaskable_layer_types(config: dict) -> list[str]:
    """The config's `layer_types` other than full and sliding attention, in order of first appearance.

    Such layers (chunked, compressed or indexed attention, recurrent `linear_attention`, Mamba blocks) keep what
    they read in a form a packed row's block mask cannot cut per document, or with a mask ftune does not build.
    """
    return list(dict.fromkeys(kind for kind in config.get("layer_types") or () if kind not in (FULL, SLIDING)))


def is_mixture_of_experts(config: dict) -> bool:
    """Whether the config routes tokens to more than one expert."""
    return expert_count(config) > 1


def expert_count(config: dict) -> int:
    """The number of routed experts under any of `EXPERT_COUNTS`; 0 for a dense config.

    ERNIE 4.5's multimodal configs give one count per modality (a list): the largest is taken.
    """
    counts = (config.get(key) or 0 for key in EXPERT_COUNTS)
    return max((max(count, default=0) if isinstance(count, list) else count for count in counts), default=0)


def sdpa_problem(config: dict) -> str | None:
    """Why `attn_implementation=sdpa` cannot run this config faithfully, or None when it can.

    `attn_logit_softcapping` (Gemma 2) is passed to the attention kernel as `softcap`, which torch's sdpa has
    no argument for: transformers 5 raises at the first forward rather than drop it.
    """
    cap = config.get("attn_logit_softcapping")
    if not cap:
        return None
    return f"attn_logit_softcapping={cap}: sdpa cannot soft-cap attention logits (transformers refuses it)"


def packing_problem(config: dict) -> str | None:
    """Why packed rows cannot keep this architecture's documents apart, or None when they can."""
    kinds = unmaskable_layer_types(config)
    if not kinds:
        return None
    return (f"layer_types {', '.join(kinds)} cannot be isolated per document in a packed row "
            "(set data.packing=false)")
