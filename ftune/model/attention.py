"""Packed rows on sliding-window models: every layer keeps its own window and every document stays isolated.

The collator (`data/packing.py`) gives sdpa and eager a block-diagonal causal 4D mask. transformers 5 uses a
4D mask as it is, for *every* layer: a sliding-window layer (Mistral v0.1, Phi-3, Gemma 2/3) handed that mask
attends to its whole document, so packed training would silently differ from unpacked training whenever a
document is longer than the window. This module narrows the mask to each layer's window: a dict
{layer type: mask} for decoders that take one (Gemma 2/3, Qwen2/3 with sliding layers), the banded mask for
those that slide every layer (Mistral, Mixtral, Phi-3).

Example, one row of documents [3, 2] with window 2 (1 = attend):
    block-causal            sliding (i - j < 2)
    [[1, 0, 0, 0, 0],       [[1, 0, 0, 0, 0],
     [1, 1, 0, 0, 0],        [1, 1, 0, 0, 0],
     [1, 1, 1, 0, 0],        [0, 1, 1, 0, 0],
     [0, 0, 0, 1, 0],        [0, 0, 0, 1, 0],
     [0, 0, 0, 1, 1]]        [0, 0, 0, 1, 1]]
"""

import torch

from ftune.config.architecture import MASKS_BY_LAYER_TYPE, sliding_layers

FULL, SLIDING = "full_attention", "sliding_attention"


def windowed(mask: torch.Tensor, window: int) -> torch.Tensor:
    """`mask` (bool, True = attend; or additive float) narrowed to keys less than `window` positions back.

    transformers' own sliding mask lets query i see key j when i - j < window; the same rule here.
    """
    width = mask.size(-1)
    index = torch.arange(width, device=mask.device)
    band = (index.view(-1, 1) - index.view(1, -1)) < window
    if mask.dtype == torch.bool:
        return mask & band
    return mask.masked_fill(~band, torch.finfo(mask.dtype).min)


def layer_masks(config, mask: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention input that gives each layer of `config` its own mask of a packed row.

    Args:
        config: the model's (text) config.
        mask: the collator's block-diagonal causal 4D mask.

    Returns:
        `mask` unchanged for models without sliding layers; the banded mask when every layer slides; a dict
        {"full_attention": mask, "sliding_attention": banded} for decoders that take masks by layer type.
    """
    facts = config.to_dict()
    if mask.dim() != 4 or not sliding_layers(facts):
        return mask
    banded = windowed(mask, config.sliding_window)
    if facts["model_type"] in MASKS_BY_LAYER_TYPE:
        return {FULL: mask, SLIDING: banded}
    return banded


def isolate_sliding_windows(model: torch.nn.Module) -> torch.nn.Module:
    """Make the decoder of `model` narrow packed rows' 4D masks to each layer's window; returns `model`.

    A forward pre-hook on the decoder (not on the causal LM: PEFT calls the causal LM's `forward` directly,
    which skips hooks) rewrites the `attention_mask` argument with `layer_masks`. Models without sliding
    layers get no hook. Training, evaluation and a distillation teacher all go through it.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not sliding_layers(config.to_dict()):
        return model

    def narrow(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kwargs["attention_mask"] = layer_masks(config, mask)
        return args, kwargs

    model.get_decoder().register_forward_pre_hook(narrow, with_kwargs=True)
    return model
