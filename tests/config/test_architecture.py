"""`ftune.config.architecture`: facts read from config.json alone, for validation and packed masks."""

import dataclasses

from ftune.config.architecture import (
    is_mixture_of_experts,
    packing_problem,
    read_model_config,
    sdpa_problem,
    sliding_layers,
)
from ftune.config.schema import LoraCfg, MethodCfg, ModelCfg, QuantCfg, RunCfg
from ftune.config.validate import advisories, check_architecture


def test_shipped_configs_are_read_and_unknown_ids_are_not(tmp_path):
    assert read_model_config("Qwen/Qwen3-30B-A3B")["model_type"] == "qwen3_moe"
    assert read_model_config("nobody/nothing") is None
    assert read_model_config(str(tmp_path)) is None


def test_sliding_layers_follow_the_config_switches():
    assert sliding_layers(read_model_config("mistralai/Mistral-7B-v0.1"))  # sliding_window 4096, every layer
    assert sliding_layers(read_model_config("google/gemma-3-1b-it"))  # five sliding layers per global one
    assert not sliding_layers(read_model_config("mistralai/Mistral-7B-v0.3"))  # sliding_window null
    assert not sliding_layers(read_model_config("Qwen/Qwen2.5-7B-Instruct"))  # a window, but use_sliding_window false
    assert not sliding_layers({"sliding_window": 8, "layer_types": ["full_attention"]})


def test_packing_is_refused_only_for_layer_types_a_block_mask_cannot_cut():
    assert packing_problem(read_model_config("google/gemma-2-2b-it")) is None
    assert packing_problem({"model_type": "newarch", "sliding_window": 8}) is None  # every layer slides
    cohere2 = {"model_type": "cohere2", "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
    assert packing_problem(cohere2) is None
    hybrid = {"layer_types": ["linear_attention", "linear_attention", "full_attention", "chunked_attention"]}
    assert packing_problem(hybrid) == ("layer_types linear_attention, chunked_attention cannot be isolated per "
                                       "document in a packed row (set data.packing=false)")


def test_sdpa_is_refused_where_the_config_soft_caps_attention_logits():
    assert sdpa_problem(read_model_config("google/gemma-2-2b-it")) == (
        "attn_logit_softcapping=50.0: sdpa cannot soft-cap attention logits (transformers refuses it)")
    assert sdpa_problem(read_model_config("google/gemma-3-1b-it")) is None  # the key is there, set to null
    assert sdpa_problem(read_model_config("meta-llama/Llama-3.2-1B")) is None


def test_mixtures_of_experts_are_recognised_by_any_expert_count_key():
    assert is_mixture_of_experts(read_model_config("mistralai/Mixtral-8x7B-v0.1"))  # num_local_experts
    assert is_mixture_of_experts(read_model_config("Qwen/Qwen3-30B-A3B"))  # num_experts
    assert is_mixture_of_experts({"n_routed_experts": 256, "num_experts_per_tok": 8})  # DeepSeek-V3
    assert is_mixture_of_experts({"moe_num_experts": [64, 64]})  # ERNIE 4.5 VL: one count per modality
    assert not is_mixture_of_experts({"num_experts": 1})
    assert not is_mixture_of_experts(read_model_config("Qwen/Qwen3-8B"))


def test_validation_refuses_what_cannot_work_for_the_family():
    gemma2 = RunCfg(model=ModelCfg(name_or_path="google/gemma-2-2b-it", attn_implementation="sdpa"))
    assert check_architecture(gemma2) == [
        "model.attn_implementation=sdpa with model.name_or_path=google/gemma-2-2b-it (expected eager: "
        "attn_logit_softcapping=50.0: sdpa cannot soft-cap attention logits (transformers refuses it))"]
    assert check_architecture(dataclasses.replace(gemma2, model=ModelCfg(name_or_path="google/gemma-2-2b-it",
                                                                         attn_implementation="eager"))) == []
    mixtral = RunCfg(model=ModelCfg(name_or_path="mistralai/Mixtral-8x7B-v0.1"), lora=LoraCfg(dropout=0.05))
    assert check_architecture(mixtral) == []
    assert check_architecture(dataclasses.replace(mixtral, lora=LoraCfg(dora=True))) == [
        "lora.dora=true with the mixture-of-experts model.name_or_path=mistralai/Mixtral-8x7B-v0.1 (expected false: "
        "all-linear adapts the fused expert weights through PEFT's target_parameters, which have no DoRA)"]
    assert check_architecture(dataclasses.replace(mixtral, lora=LoraCfg(dora=True, target_modules=["attention"]))) \
        == []
    qlora = dataclasses.replace(mixtral, quant=QuantCfg(bits=4))
    assert check_architecture(qlora) == [
        "quant.bits=4 with the mixture-of-experts model.name_or_path=mistralai/Mixtral-8x7B-v0.1 (expected 0: "
        "bitsandbytes quantizes linear layers only, so the fused experts, most of the weights, would stay "
        "unquantized and k-bit preparation would upcast them to fp32)"]


def test_lora_dropout_on_a_mixture_of_experts_runs_with_a_note_on_the_experts():
    note = ("lora.dropout=0.05 applies to the attention and dense linear layers of the mixture-of-experts "
            "model.name_or_path=mistralai/Mixtral-8x7B-v0.1, not to its fused expert weights: PEFT adapts those "
            "through target_parameters, which have no dropout")
    mixtral = RunCfg(model=ModelCfg(name_or_path="mistralai/Mixtral-8x7B-v0.1"), lora=LoraCfg(dropout=0.05))
    assert note in advisories(mixtral)
    no_note = [dataclasses.replace(mixtral, lora=LoraCfg(dropout=0.0)),
               dataclasses.replace(mixtral, lora=LoraCfg(dropout=0.05, target_modules=["attention"])),
               dataclasses.replace(mixtral, method=MethodCfg(name="full")),
               dataclasses.replace(mixtral, model=ModelCfg(name_or_path="Qwen/Qwen3-8B"))]
    assert [cfg for cfg in no_note if any("fused expert" in line for line in advisories(cfg))] == []
