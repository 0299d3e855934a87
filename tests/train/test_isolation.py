"""ftune train checks, on the model it loaded, that a packed row keeps its documents apart before it trains."""

import pytest
import torch

from ftune.errors import ConfigError
from ftune.train.isolation import check_packing_isolates, packing_gap


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_decoder_masked_per_document_passes_with_no_gap(random_llama, attn):
    model = random_llama(attn=attn).train()
    assert packing_gap(model, 0, attn) < 1e-6
    check_packing_isolates(model, 0, attn, "llama")
    assert model.training  # the check ran in eval mode and gave the model back as it found it


def test_a_model_that_drops_the_block_mask_is_refused_in_one_line(random_llama):
    """What BLOOM-like modelling code that rebuilds its own mask from the input does: every token sees the row."""
    model = random_llama(attn="sdpa")
    model.register_forward_pre_hook(lambda module, args, kwargs: (args, {
        key: value for key, value in kwargs.items() if key not in ("attention_mask", "position_ids")}),
        with_kwargs=True)
    with pytest.raises(ConfigError) as err:
        check_packing_isolates(model, 0, "sdpa", "some/model")
    message = err.value.message
    assert message.startswith("data.packing=true with model.name_or_path=some/model: a packed document's logits "
                              "differ from its own by ") and "\n" not in message
    assert err.value.hint == "set data.packing=false"


def test_a_model_whose_forward_fails_on_a_packed_row_is_refused_with_its_reason(random_llama):
    model = random_llama(attn="eager")

    def refuse_4d_masks(module, args, kwargs):
        if kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 4:
            raise ValueError("too many values to unpack (expected 2)\nsecond line")

    model.register_forward_pre_hook(refuse_4d_masks, with_kwargs=True)
    with pytest.raises(ConfigError, match=r"^data.packing=true with model.name_or_path=m: its forward fails on a "
                                          r"packed row \(too many values to unpack \(expected 2\)\): "):
        check_packing_isolates(model, 0, "eager", "m")
    assert torch.is_grad_enabled()
