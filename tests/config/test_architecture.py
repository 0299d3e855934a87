"""`ftune.config.architecture`: facts read from config.json alone, for validation and packed masks."""

from ftune.config.architecture import is_mixture_of_experts, packing_problem, read_model_config, sliding_layers


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


def test_packing_is_refused_only_for_sliding_architectures_without_known_masks():
    assert packing_problem(read_model_config("google/gemma-2-2b-it")) is None
    assert packing_problem({"model_type": "newarch", "sliding_window": 8}) == (
        "model_type newarch has sliding-window layers ftune cannot mask per document in a packed row "
        "(set data.packing=false)")
    assert packing_problem({"model_type": "newarch", "sliding_window": None}) is None


def test_mixtures_of_experts_are_recognised_by_their_expert_counts():
    assert is_mixture_of_experts(read_model_config("mistralai/Mixtral-8x7B-v0.1"))
    assert is_mixture_of_experts(read_model_config("Qwen/Qwen3-30B-A3B"))
    assert not is_mixture_of_experts(read_model_config("Qwen/Qwen3-8B"))


def test_validation_refuses_what_cannot_work_for_the_family():
    import dataclasses

    from ftune.config.schema import LoraCfg, ModelCfg, QuantCfg, RunCfg
    from ftune.config.validate import check_architecture

    gemma2 = RunCfg(model=ModelCfg(name_or_path="google/gemma-2-2b-it", attn_implementation="sdpa"))
    assert check_architecture(gemma2) == [
        "model.attn_implementation=sdpa with model.name_or_path=google/gemma-2-2b-it (expected eager: sdpa drops "
        "Gemma 2's attention logit soft-capping (transformers refuses it))"]
    assert check_architecture(dataclasses.replace(gemma2, model=ModelCfg(name_or_path="google/gemma-2-2b-it",
                                                                         attn_implementation="eager"))) == []
    mixtral = RunCfg(model=ModelCfg(name_or_path="mistralai/Mixtral-8x7B-v0.1"), lora=LoraCfg(dropout=0.05))
    assert check_architecture(mixtral) == [
        "lora.dropout=0.05 with the mixture-of-experts model.name_or_path=mistralai/Mixtral-8x7B-v0.1 (expected 0: "
        "all-linear adapts the fused expert weights through PEFT's target_parameters, which has no dropout)"]
    assert check_architecture(dataclasses.replace(mixtral, lora=LoraCfg(dropout=0.0))) == []
    qlora = dataclasses.replace(mixtral, lora=LoraCfg(dropout=0.0), quant=QuantCfg(bits=4))
    assert check_architecture(qlora) == [
        "quant.bits=4 with the mixture-of-experts model.name_or_path=mistralai/Mixtral-8x7B-v0.1 (expected 0: "
        "bitsandbytes quantizes linear layers only, so the fused experts, most of the weights, would stay "
        "unquantized and k-bit preparation would upcast them to fp32)"]
