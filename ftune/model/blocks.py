"""Where a causal LM keeps its decoder and the decoder its blocks, whatever the architecture names them.

`ftune plan` measures one block of each kind, and gradual unfreezing (`ftune.train.method_steps`) unfreezes them
from the top.
"""

import torch

from ftune.errors import ConfigError


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (embeddings, layers, final norm) inside a causal LM or a PeftModel around one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's layers: the longest `nn.ModuleList` among the decoder's own children.

    Architectures name it differently (`layers` for Llama and most, `h` for GPT-2, Falcon and Bloom, `blocks`
    elsewhere), and hybrid ones mix layer classes in it (attention and Mamba layers), so it is found by place
    and length, not by name or class. A direct child, so that a layer's own lists (unfused MoE experts, often
    more than the layers) are not taken for it.
    """
    decoder = decoder_of(model)
    lists = [child for child in decoder.children() if isinstance(child, torch.nn.ModuleList)]
    if not lists:
        raise ConfigError(f"model.name_or_path: {type(decoder).__name__} (model_type {decoder.config.model_type}) "
                          "holds its layers in no nn.ModuleList; expected a decoder with a list of layers")
    return max(lists, key=len)
