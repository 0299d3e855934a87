"""`ftune.model.attention`: packed rows' block masks narrowed to each sliding layer's window."""

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3MoeConfig, Qwen3NextConfig

from ftune.data.packing import block_causal_mask
from ftune.errors import ConfigError
from ftune.model.attention import attention_kinds, layer_masks, windowed

BLOCK = block_causal_mask([[3, 2]], 5, None)
SLIDING = torch.tensor([[1, 0, 0, 0, 0],
                        [1, 1, 0, 0, 0],
                        [0, 1, 1, 0, 0],
                        [0, 0, 0, 1, 0],
                        [0, 0, 0, 1, 1]], dtype=torch.bool)


def test_a_window_of_two_keeps_the_block_and_drops_keys_two_or_more_back():
    assert torch.equal(windowed(BLOCK, 2)[0, 0], SLIDING)


def test_an_additive_mask_is_narrowed_with_the_dtype_minimum():
    additive = block_causal_mask([[3, 2]], 5, torch.float32)
    narrowed = windowed(additive, 2)[0, 0]
    assert torch.equal(narrowed == 0, SLIDING)
    assert torch.all(narrowed[~SLIDING] == torch.finfo(torch.float32).min)


def test_each_architecture_gets_the_masks_its_decoder_reads():
    assert layer_masks(LlamaConfig(), BLOCK) is BLOCK  # no sliding layer: unchanged
    assert torch.equal(layer_masks(MistralConfig(sliding_window=2), BLOCK)[0, 0], SLIDING)  # every layer slides
    masks = layer_masks(Gemma2Config(sliding_window=2), BLOCK)  # sliding and global layers alternate
    assert masks.keys() == {"full_attention", "sliding_attention"} and masks["full_attention"] is BLOCK
    assert torch.equal(masks["sliding_attention"][0, 0], SLIDING)


def test_layer_kinds_come_from_the_config_as_its_decoder_reads_them():
    assert attention_kinds(Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                       num_hidden_layers=2)) == {"full_attention", "sliding_attention"}
    assert attention_kinds(Qwen2Config(use_sliding_window=False, sliding_window=4)) == {"full_attention"}
    assert attention_kinds(Qwen3MoeConfig(use_sliding_window=True, sliding_window=4)) == {"sliding_attention"}
    assert attention_kinds(Qwen3MoeConfig(use_sliding_window=False, sliding_window=4)) == {"full_attention"}
    # a Ministral checkpoint saved as `mistral`: MistralModel builds one sliding mask for every layer
    ministral = MistralConfig(sliding_window=2, num_hidden_layers=2,
                              layer_types=["sliding_attention", "full_attention"])
    assert attention_kinds(ministral) == {"sliding_attention"}
    assert torch.equal(layer_masks(ministral, BLOCK)[0, 0], SLIDING)


def test_a_packed_row_is_refused_for_layers_whose_state_crosses_documents():
    hybrid = Qwen3NextConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    padding = torch.ones(1, 5, dtype=torch.long)
    assert layer_masks(hybrid, padding) is padding  # a padded batch's 2D mask: not a packed row
    with pytest.raises(ConfigError) as err:
        layer_masks(hybrid, BLOCK)
    assert str(err.value) == ("data.packing=true with a qwen3_next model: layer_types linear_attention cannot be "
                              "isolated per document in a packed row (set data.packing=false)")


def test_decoders_take_masks_by_layer_type_exactly_when_their_config_class_defines_layer_types():
    """`takes_masks_by_layer_type` against the modelling code of every causal LM of the installed transformers.

    A decoder takes a dict where its forward checks `isinstance(attention_mask, dict)`; 197 families in 5.25, 10 s.

    State-space models (Mamba) define `layer_types` but read no mask at all: packing refuses them by layer type.
    """
    import importlib
    import re
    from pathlib import Path

    from huggingface_hub.errors import StrictDataclassClassValidationError
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ftune.model.attention import takes_masks_by_layer_type

    models = Path(importlib.import_module("transformers").__file__).parent / "models"
    takes_dict = re.compile(r"isinstance\((?:\w+ := )?attention_mask, dict\)")
    checked, disagree = 0, []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.keys() & CONFIG_MAPPING.keys():
        try:
            config = CONFIG_MAPPING[model_type]().get_text_config()
        except (ValueError, StrictDataclassClassValidationError):  # no default config (an assistant model's)
            continue
        if not attention_kinds(config) & {"full_attention", "sliding_attention"}:
            continue
        source = "".join(path.read_text() for path in (models / type(config).__module__.split(".")[-2]).glob(
            "modeling_*.py"))
        checked += 1
        if takes_masks_by_layer_type(config) != bool(takes_dict.search(source)):
            disagree.append(model_type)
    assert checked > 150 and disagree == []
