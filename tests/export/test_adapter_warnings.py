"""`server_warnings`: one line per constraint of vLLM/TGI an adapter breaks, none for a plain LoRA."""

from peft import LoraConfig, PromptTuningConfig

from ftune.export.adapter import server_warnings

SERVED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_a_plain_lora_on_the_projections_has_no_warning():
    assert server_warnings(LoraConfig(r=16, target_modules=SERVED)) == []


def test_each_violation_is_one_warning_that_names_it():
    config = LoraConfig(r=24, target_modules=[*SERVED, "embed_tokens", "lm_head"], modules_to_save=["norm"],
                        use_dora=True, bias="lora_only")
    warnings = server_warnings(config)
    assert len(warnings) == 5, warnings
    assert warnings[0].startswith("target modules embed_tokens, lm_head:")
    assert warnings[1] == ("rank 24 exceeds vLLM's default --max-lora-rank 16: start it with --max-lora-rank 32")
    assert warnings[2].startswith("modules_to_save ['norm']:")
    assert warnings[3].startswith("DoRA:")
    assert warnings[4].startswith("bias=lora_only:")


def test_a_rank_pattern_counts_and_a_rank_beyond_vllm_cannot_load():
    warnings = server_warnings(LoraConfig(r=8, target_modules=SERVED, rank_pattern={"q_proj": 1024}))
    assert warnings == ["rank 1024 exceeds vLLM's default --max-lora-rank 16: vLLM cannot load it"]


def test_a_prompt_tuning_adapter_is_not_served():
    warnings = server_warnings(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert warnings == ["a PROMPT_TUNING adapter: vLLM and TGI serve LoRA adapters only "
                        "(export format=hf to serve it merged)"]


def test_trained_rows_of_added_tokens_are_not_served_by_vllm():
    warnings = server_warnings(LoraConfig(r=8, target_modules=SERVED, trainable_token_indices=[1574, 1575]))
    assert warnings == ["trainable_token_indices (the rows of added tokens): vLLM refuses such adapters "
                        "(vllm-project/vllm#36501; export format=hf to serve them merged)"]
