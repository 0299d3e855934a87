"""Objectives in the config: the renamed `method=distill`, rules, the start adapter, the early-stopping default."""

import json

import pytest

from ftune.cli import main
from ftune.config.compose import load_run_config
from ftune.errors import ConfigError


@pytest.mark.parametrize("overrides,expected", [
    (["recipe=tiny_lora", "method=distill"], r"^method=distill is now objective=distill"),
    (["recipe=tiny_lora", "objective=distill", "distill.teacher=null"], "objective=distill without distill.teacher"),
    (["recipe=tiny_lora", "distill.teacher=x"], "distill.teacher=x with objective=sft"),
    (["recipe=tiny_dpo", "pref.beta=0"], r"pref.beta=0.0 \(expected > 0\)"),
    (["recipe=tiny_dpo", "pref.label_smoothing=0.1"], "pref.label_smoothing=0.1 with pref.loss=sigmoid"),
    (["recipe=tiny_dpo", "objective=kto", "trainer.micro_batch_size=1"], "micro_batch_size=1 with objective=kto"),
    (["recipe=tiny_dpo", "model.adapter=/nonexistent"], "model.adapter=/nonexistent: no adapter_config.json there"),
    (["recipe=tiny_dpo", "objective=kto", "pref.reference=precompute"], "pref.reference=precompute with objective=kto"),
    (["recipe=tiny_dpo", "pref.loss=simpo", "pref.reference=precompute"],
     r"pref.reference=precompute with pref.loss=simpo \(expected pref.reference=model: simpo uses no reference\)"),
    (["recipe=tiny_grpo", "grpo.reward_funcs=[]"], r"objective=grpo without grpo.reward_funcs \(expected"),
    (["recipe=tiny_lora", "grpo.reward_funcs=[a.py:f]"], r"grpo.reward_funcs=\['a.py:f'\] with objective=sft"),
    (["recipe=tiny_grpo", "grpo.reward_weights=[1.0]"], "grpo.reward_weights has 1 weights for 2 reward functions"),
    (["recipe=tiny_grpo", "grpo.temperature=0"], r"grpo.temperature=0.0 \(expected > 0"),
    (["recipe=tiny_grpo", "grpo.max_completion_length=128"], "data.max_length=128 with grpo.max_completion_length=128"),
    (["recipe=tiny_grpo", "data.packing=true"], "data.packing=true with objective=grpo"),
    (["recipe=tiny_grpo", "method=prompt_tuning"], "method=prompt_tuning with objective=grpo"),
])
def test_bad_objective_settings_are_rejected(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_run_config(overrides)


def test_a_user_recipe_on_method_distill_is_told_the_new_name(tmp_path, monkeypatch):
    (tmp_path / "old.yaml").write_text("defaults:\n  - ftune_schema\n  - method: distill\n  - _self_\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="method=distill is now objective=distill"):
        load_run_config(["recipe=old"])


def adapter_dir(tmp_path, base: str, peft_type: str = "LORA"):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type,
                                                              "base_model_name_or_path": base}))
    return tmp_path


def test_a_start_adapter_of_another_base_or_method_is_refused_in_one_line(tmp_path, tiny_model_path, capsys):
    other = adapter_dir(tmp_path, "meta-llama/Llama-3.1-8B")
    assert main(["train", "recipe=tiny_dpo", f"model.adapter={other}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained on meta-llama/Llama-3.1-8B, not on model.name_or_path=" in err[0]
    assert not (tmp_path / "run").exists()
    ia3 = adapter_dir(tmp_path, str(tiny_model_path), "IA3")
    with pytest.raises(ConfigError, match="is a ia3 adapter with method.name=lora"):
        load_run_config(["recipe=tiny_dpo", f"model.adapter={ia3}"])
    load_run_config(["recipe=tiny_dpo", f"model.adapter={adapter_dir(tmp_path, str(tiny_model_path))}"])


def test_a_start_adapter_that_trained_added_tokens_needs_them_added_again(tmp_path, tiny_model_path):
    adapter = adapter_dir(tmp_path, str(tiny_model_path))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"trainable_token_indices": [1574]}))
    with pytest.raises(ConfigError, match="trained the rows of tokens its run added, and this run adds none"):
        load_run_config(["recipe=tiny_lora", f"model.adapter={adapter}"])


@pytest.mark.parametrize("overrides,metric,mode", [
    (["recipe=tiny_dpo"], "eval_reward_accuracy", "max"),
    (["recipe=tiny_dpo", "objective=kto"], "eval_reward_accuracy", "max"),
    (["recipe=tiny_lora"], "eval_loss", "min"),
    (["recipe=tiny_distill"], "eval_loss", "min"),
    (["recipe=tiny_grpo"], "eval_reward", "max"),
])
def test_early_stopping_follows_the_objective(overrides, metric, mode):
    cfg, _ = load_run_config(overrides)
    assert (cfg.early_stop.metric, cfg.early_stop.mode) == (metric, mode)


def test_dpo_may_stop_on_its_margin_but_not_on_perplexity():
    load_run_config(["recipe=tiny_dpo", "early_stop.metric=eval_reward_margin", "early_stop.mode=max"])
    with pytest.raises(ConfigError, match="early_stop.metric=eval_ppl is not measured by this run"):
        load_run_config(["recipe=tiny_dpo", "early_stop.metric=eval_ppl"])


SEQUENCE = ["recipe=tiny_lora", "objective=distill", "distill.mode=sequence"]


@pytest.mark.parametrize("overrides,expected", [
    (["recipe=tiny_lora", "distill.mode=sequence"], r"^distill.mode=sequence with objective=sft \(expected objective"),
    ([*SEQUENCE, "distill.teacher=null"], "^objective=distill without distill.teacher"),
    ([*SEQUENCE, "data.format=text"], r"^data.format=text with distill.mode=sequence \(expected chat data"),
    ([*SEQUENCE, "data.mix=[{path: a.jsonl}]"], r"^data.mix with distill.mode=sequence \(expected data.path"),
    ([*SEQUENCE, "+data.columns.prompt=input"], r"^data.columns=\{'prompt': 'input'\} with distill.mode=sequence"),
    ([*SEQUENCE, "data.streaming=true", "trainer.max_steps=2"], r"^data.streaming=true with distill.mode=sequence"),
    ([*SEQUENCE, "distill.sample_temperature=-1"], r"^distill.sample_temperature=-1.0 is too small"),
])
def test_bad_sequence_distillation_settings_are_rejected(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_run_config(overrides)


def test_sequence_distillation_accepts_a_teacher_of_any_vocabulary_and_logit_distillation_is_the_default():
    cfg, _ = load_run_config([*SEQUENCE, "distill.teacher=Qwen/Qwen2.5-0.5B-Instruct",
                              "distill.sample_temperature=0.7"])
    assert (cfg.distill.mode, cfg.distill.sample_temperature, cfg.distill.max_new_tokens) == ("sequence", 0.7, 256)
    assert load_run_config(["recipe=tiny_distill"])[0].distill.mode == "logits"
