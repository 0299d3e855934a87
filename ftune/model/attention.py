"""Packed rows on sliding-window models: every layer keeps its own window and every document stays isolated.

The collator (`data/packing.py`) gives sdpa and eager a block-diagonal causal 4D mask. transformers 5 uses a
4D mask as it is, for *every* layer: a sliding-window layer (Mistral v0.1, Phi-3, Gemma 2/3, Cohere 2) handed
that mask attends to its whole document, so packed training would silently differ from unpacked training
whenever a document is longer than the window. This module narrows the mask to each layer's window, deciding
from the model's config what its decoder reads, as transformers' own `create_masks_for_generate` does:
- a config class that defines `layer_types` (filled by transformers from `sliding_window_pattern`, from
  `use_sliding_window` and `max_window_layers`, or given) belongs to a decoder that takes `attention_mask` as a
  dict {layer type: 4D mask}: sliding layers get the banded mask, full layers the block mask;
- any other decoder builds one mask for all its layers, the sliding one when `config.sliding_window` is set
  (Mistral, Mixtral, Phi-3, Qwen3-MoE, Starcoder2): every layer gets the banded mask.
A `layer_types` given to a config class that does not define it (Ministral checkpoints saved as `mistral`) is
ignored, as the decoder ignores it. Layer types other than full and sliding attention are refused when a packed
row arrives (`config/architecture.py`).
A preference pair in one row (`PairCollator`'s shared prompt) is narrowed the same way, its window measured on
the tokens' position ids, which restart after the prompt for each response.

Example, one row of documents [3, 2] with window 2 (1 = attend):
    block-causal            sliding (i - j < 2)
    [[1, 0, 0, 0, 0],       [[1, 0, 0, 0, 0],
     [1, 1, 0, 0, 0],        [1, 1, 0, 0, 0],
     [1, 1, 1, 0, 0],        [0, 1, 1, 0, 0],
     [0, 0, 0, 1, 0],        [0, 0, 0, 1, 0],
     [0, 0, 0, 1, 1]]        [0, 0, 0, 1, 1]]
"""

import torch

from ftune.config.architecture import FULL, SLIDING, packing_problem
from ftune.errors import ConfigError


def windowed(mask: torch.Tensor, window: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """`mask` (bool, True = attend; or additive float) narrowed to keys less than `window` positions back.

    transformers' own sliding mask lets query i see key j when i - j < window; the same rule here, on the tokens'
    `position_ids` [batch, width] when given (a shared-prompt pair row's rejected response continues from the
    prompt's end, not from the chosen one's), else on their places in the row.
    """
    if positions is None:
        positions = torch.arange(mask.size(-1), device=mask.device).unsqueeze(0)
    band = ((positions.unsqueeze(2) - positions.unsqueeze(1)) < window).unsqueeze(1)
    if mask.dtype == torch.bool:
        return mask & band
    return mask.masked_fill(~band, torch.finfo(mask.dtype).min)


def takes_masks_by_layer_type(config) -> bool:
    """Whether the decoder of `config` reads `attention_mask` as a dict {layer type: mask}.

    In transformers 5 that is every decoder whose config class defines `layer_types` (a field, or an alias of
    `layers_block_type`), and no other: the class, not the instance, because a config keeps unknown keys too.
    """
    cls = type(config)
    return hasattr(cls, "layer_types") or "layer_types" in cls.attribute_map


def attention_kinds(config) -> set[str]:
    """The attention types of the decoder layers of `config`, as its decoder masks them (see the module docstring)."""
    if takes_masks_by_layer_type(config) and config.layer_types:
        return set(config.layer_types)
    return {FULL if getattr(config, "sliding_window", None) is None else SLIDING}


def layer_masks(config, mask: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention input that gives each layer of `config` its own mask of a packed row.

    Args:
        config: the model's (text) config.
        mask: the collator's 4D mask (a packed row's block-diagonal one, or a shared-prompt pair row's).
        positions: the rows' `position_ids`, which the window is measured on (None: places in the row).

    Returns:
        `mask` unchanged when no layer slides; the banded mask when every layer does; a dict
        {"full_attention": mask, "sliding_attention": banded} for decoders that take masks by layer type.

    Raises:
        ConfigError: a layer type whose mask or state cannot be cut per document (`packing_problem`).
    """
    if mask.dim() != 4:
        return mask
    kinds = attention_kinds(config)
    if why := packing_problem({"layer_types": sorted(kinds)}):
        raise ConfigError(f"data.packing=true with a {config.model_type} model: {why}")
    if SLIDING not in kinds:
        return mask
    banded = windowed(mask, config.sliding_window, positions)
    return banded if kinds == {SLIDING} else {FULL: mask, SLIDING: banded}


def isolate_sliding_windows(model: torch.nn.Module) -> bool:
    """Make the decoder of `model` narrow packed rows' 4D masks to each layer's window; False where none is needed.

    A forward pre-hook on the decoder (not on the causal LM: PEFT calls the causal LM's `forward` directly,
    which skips hooks) rewrites the `attention_mask` argument with `layer_masks`. Models whose layers all
    attend in full get no hook. Training, evaluation and a distillation teacher all go through it.
    """
    config = model.config.get_text_config()
    if attention_kinds(config) == {FULL}:
        return False

    def narrow(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kwargs["attention_mask"] = layer_masks(config, mask, kwargs.get("position_ids"))
        return args, kwargs

    model.get_decoder().register_forward_pre_hook(narrow, with_kwargs=True)
    return True
