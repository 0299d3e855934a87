"""ftune train checks, on the model it loaded, that a packed row keeps its documents apart before it trains."""

import pytest
import torch

from ftune.config.schema import RunCfg
from ftune.data.collate import PairCollator
from ftune.errors import ConfigError
from ftune.train.isolation import check_packing_isolates, packing_gap, prompt_sharing_problem
from ftune.train.losses import build_sequence_logps


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


def dpo_config(attn: str = "sdpa", **pref) -> RunCfg:
    cfg = RunCfg()
    cfg.objective.name, cfg.model.attn_implementation = "dpo", attn
    for key, value in pref.items():
        setattr(cfg.pref, key, value)
    return cfg


def sharing_problem(model, cfg: RunCfg) -> str | None:
    return prompt_sharing_problem(cfg, model, build_sequence_logps(model, cfg.trainer), PairCollator(0))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_decoder_that_reads_the_mask_and_positions_shares_the_prompt_row(random_llama, attn):
    model = random_llama(attn=attn).train()
    assert sharing_problem(model, dpo_config(attn)) is None
    assert model.training


def test_pairs_keep_two_rows_where_the_model_or_the_config_rules_the_shared_row_out(random_llama):
    model = random_llama(attn="sdpa")
    assert sharing_problem(model, dpo_config(share_prompt=False)) == "pref.share_prompt=false"
    assert sharing_problem(model, dpo_config("flash_attention_2")) == "flash_attention_2 takes no 4D mask"
    model.register_forward_pre_hook(lambda module, args, kwargs: (args, {
        key: value for key, value in kwargs.items() if key not in ("attention_mask", "position_ids")}),
        with_kwargs=True)  # the rejected response would see the chosen one
    assert sharing_problem(model, dpo_config()).startswith("a probe pair's log-probs in one row differ from two "
                                                           "rows' by ")


def test_a_prompt_tuned_model_keeps_two_rows(random_llama):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(random_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    cfg = dpo_config()
    cfg.method.name = "prompt_tuning"
    assert sharing_problem(model, cfg) == "method=prompt_tuning prepends virtual tokens"
