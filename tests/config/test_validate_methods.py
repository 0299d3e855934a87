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
