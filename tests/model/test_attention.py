"""`ftune.model.attention`: packed rows' block masks narrowed to each sliding layer's window."""

import torch
from transformers import Gemma2Config, LlamaConfig, MistralConfig

from ftune.data.packing import block_causal_mask
from ftune.model.attention import layer_masks, windowed

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
