"""Cross-field rules of the fine-tuning methods: each bad combination is one line naming its keys."""

import functools
import sys

import pytest

from ftune.config.compose import load_run_config
from ftune.errors import ConfigError


@pytest.mark.parametrize("overrides,expected", [
    (["recipe=tiny_prompt_tuning", "data.packing=true"], "data.packing=true with method.name=prompt_tuning"),
    (["recipe=tiny_prefix_tuning", "data.packing=true"], "data.packing=true with method.name=prefix_tuning"),
    (["recipe=tiny_prefix_tuning", "model.gradient_checkpointing=true"],
     "model.gradient_checkpointing=true with method.name=prefix_tuning"),
    (["recipe=tiny_lora", "method.freeze=[embed]"], r"method.freeze=\['embed'\] with method.name=lora"),
    (["recipe=tiny_full", "method.freeze=['layers[0']"], "method.freeze: 'layers\\[0' is not a regular expression"),
    (["recipe=tiny_full", "distill.teacher_bits=4"], "distill.teacher_bits=4 without distill.teacher"),
    (["recipe=tiny_distill", "distill.temperature=0"], r"distill.temperature=0.0 \(expected > 0\)"),
    (["recipe=tiny_qlora", "lora.init=pissa"], "lora.init=pissa with quant.bits=4"),
    (["recipe=tiny_lora", "lora.target_modules=[all-linear,q_proj]"], "expected 'all-linear' alone"),
    (["recipe=tiny_full", "quant.bits=4"], "quant.bits with method.name=full"),
])
def test_bad_method_combinations_are_rejected(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_run_config(overrides)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["recipe=tiny_qlora", "lora.init=olora", "lora.dora=true", "lora.target_modules=[attention,up_proj]"],
     {"lora.init": "olora", "lora.dora": True, "lora.target_modules": ["attention", "up_proj"], "quant.bits": 4}),
    (["recipe=tiny_full", "method.freeze=[embed_tokens,'layers[.]0[.]']", "optim.name=paged_adamw_8bit"],
     {"method.freeze": ["embed_tokens", "layers[.]0[.]"], "optim.name": "paged_adamw_8bit", "method.name": "full"}),
    (["recipe=tiny_distill", "distill.teacher_bits=4", "optim.name=adamw_8bit"],
     {"distill.teacher_bits": 4, "optim.name": "adamw_8bit", "objective.name": "distill"}),
    (["recipe=tiny_lora", "optim.loraplus_lr_ratio=16", "lora.rslora=true"],
     {"optim.loraplus_lr_ratio": 16.0, "lora.rslora": True, "method.name": "lora"}),
])
def test_good_method_combinations_pass_with_their_values(overrides, expected):
    typed, _ = load_run_config(overrides)
    for key, value in expected.items():
        assert functools.reduce(getattr, key.split("."), typed) == value, key


def test_bitsandbytes_users_need_it_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec: not installed
    with pytest.raises(ConfigError, match="quant.bits=4, optim.name=adamw_8bit needs bitsandbytes"):
        load_run_config(["recipe=tiny_qlora", "optim.name=adamw_8bit"])
    load_run_config(["recipe=tiny_lora"])  # plain LoRA with torch's AdamW does not


@pytest.mark.parametrize("overrides,expected", [
    (["method=adalora", "method.adalora.target_r=16"], "method.adalora.target_r=16 above lora.r=12"),
    (["method=adalora", "method.adalora.warmup=0.5", "method.adalora.final=0.5"], "expected a sum below 1"),
    (["method=adalora", "trainer.max_steps=2", "method.adalora.warmup=0.3", "method.adalora.final=0.4"],
     "leave no step of trainer.max_steps=2"),
    (["method=adalora", "lora.dora=true"], "method=adalora with lora.dora or lora.init"),
    (["method.unfreeze_every=5"], "method.unfreeze_every=5 with method=lora"),
])
def test_impossible_adalora_and_unfreezing_runs_are_refused(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_run_config(["recipe=tiny_lora", *overrides])


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_unfreezing_under_a_sharded_optimizer_is_refused(monkeypatch, variable):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConfigError, match="method.unfreeze_every=2 under (FSDP|DeepSpeed)"):
        load_run_config(["recipe=tiny_full", "method.unfreeze_every=2"])


@pytest.mark.parametrize("overrides,expected", [
    (["model.add_special_tokens=['<|im_end|>']"],
     r"model.add_special_tokens: '<\|im_end\|>' is already a token of model.name_or_path=.*tiny"),
    (["model.add_tokens=['<x>','<y>','<x>']"], r"'<x>' is listed 2 times \(expected each token once"),
    (["model.add_tokens=['<x>']", "model.add_special_tokens=['<x>']"], "'<x>' is listed 2 times"),
    (["model.add_tokens=['']"], r"model.add_tokens\[0\]='' \(expected a non-empty token\)"),
    (["model.add_tokens=['<x>']", "method=ia3"], "add_special_tokens with method=ia3 .expected one of method=full"),
    (["model.add_tokens=['<x>']", "method=prompt_tuning"], "with method=prompt_tuning"),
    (["model.add_tokens=['<x>']", "objective=distill", "distill.teacher=x"], "expected distill.mode=sequence"),
])
def test_bad_added_tokens_are_one_line_before_any_model_loads(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as refused:
        load_run_config(["recipe=tiny_lora", *overrides])
    assert "\n" not in refused.value.one_line()


@pytest.mark.parametrize("recipe", ["tiny_lora", "tiny_full", "tiny_qlora"])
def test_new_tokens_pass_with_a_method_that_trains_their_rows(recipe):
    typed, _ = load_run_config([f"recipe={recipe}", "model.add_tokens=['<think>']",
                                "model.add_special_tokens=['<|end|>']"])
    assert (typed.model.add_tokens, typed.model.add_special_tokens) == (["<think>"], ["<|end|>"])


def test_an_existing_token_exits_2_with_one_line(capsys, tmp_path):
    from ftune.cli import main

    assert main(["train", "recipe=tiny_lora", "model.add_tokens=['<|im_start|>']", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.add_tokens: '<|im_start|>' is already a token" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides,expected", [
    (["recipe=tiny_lora", "lora.init=loftq"], r"lora.init=loftq with quant.bits=0 \(expected quant.bits=4"),
    (["recipe=tiny_qlora", "quant.bits=8", "lora.init=loftq"], "lora.init=loftq with quant.bits=8"),
    (["recipe=tiny_qlora", "lora.init=loftq", "lora.dora=true"], "lora.init=loftq with lora.dora=true"),
    (["recipe=tiny_qlora", "lora.init=loftq", "method.name=ia3"], r"lora.init=loftq with method.name=ia3 \(expected"),
    (["recipe=tiny_lora", "lora.init=eva", "method=vera"], r"lora.init=eva with method.name=vera \(expected"),
    (["recipe=tiny_grpo", "lora.init=eva"], r"lora.init=eva with objective.name=grpo \(expected an objective"),
    (["recipe=tiny_lora", "lora.init=eva", "data.streaming=true"], "lora.init=eva with data.streaming=true"),
])
def test_loftq_and_eva_are_refused_where_they_cannot_start_the_adapter(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as refused:
        load_run_config(overrides)
    assert "\n" not in refused.value.one_line()


def test_loftq_and_eva_are_refused_with_a_start_adapter(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    for init in ("loftq", "eva"):
        with pytest.raises(ConfigError, match=f"lora.init={init} with model.adapter={tmp_path} .expected lora.init="
                                              "default: training starts from the adapter's weights"):
            load_run_config(["recipe=tiny_qlora", f"lora.init={init}", f"model.adapter={tmp_path}"])


@pytest.mark.parametrize("overrides", [["recipe=tiny_qlora", "lora.init=loftq"], ["recipe=tiny_lora", "lora.init=eva"],
                                       ["recipe=tiny_qlora", "lora.init=eva"], ["recipe=tiny_dpo", "lora.init=eva"]])
def test_loftq_and_eva_pass_where_they_apply(overrides):
    typed, _ = load_run_config(overrides)
    assert typed.lora.init == overrides[1].split("=")[1]
