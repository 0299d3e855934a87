"""The cross-field rules issue 12 added to `validate()`: each checked on a composed config, before anything loads."""

import pytest

from ftune.config.compose import load_run_config
from ftune.config.validate import advisories
from ftune.errors import ConfigError


def problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_run_config(list(overrides))
    return err.value.one_line()


def test_auto_metric_follows_the_held_out_loss_then_the_probe_then_nothing():
    assert load_run_config([])[0].early_stop.metric == "eval_loss"
    no_eval, resolved = load_run_config(["data.eval_path=null"])
    assert (no_eval.early_stop.metric, no_eval.trainer.final_weights) == ("probe_ppl", "best")
    assert resolved.early_stop.metric == "probe_ppl"  # config.yaml records what ran
    assert any("follow probe_ppl" in note for note in advisories(no_eval))
    nothing, _ = load_run_config(["data.eval_path=null", "probe.path=null"])
    assert (nothing.early_stop.metric, nothing.trainer.final_weights) == ("none", "last")
    assert any("last step's weights" in note for note in advisories(nothing))


def test_an_explicit_metric_must_be_one_the_evaluation_measures():
    line = problems("data.eval_path=null", "early_stop.metric=eval_loss")
    assert "early_stop.metric=eval_loss is not measured by this run (data.eval_path is null" in line
    assert "expected one of: probe_ppl, probe_drift, or auto" in line
    assert "eval_ppl" in problems("early_stop.metric=accuracy")
    load_run_config(["early_stop.metric=probe_drift"])  # measured: accepted


def test_patience_needs_an_evaluation():
    line = problems("data.eval_path=null", "probe.path=null", "early_stop.patience=2")
    assert "early_stop.patience=2 with no evaluation" in line


@pytest.mark.parametrize("weight", ["0", "-0.5", "nan", "inf"])
def test_mix_weights_must_be_positive_finite_shares(weight):
    line = problems(f"data.mix=[{{path: a.jsonl}},{{path: b.jsonl, weight: {weight}}}]")
    assert line == (f"data.mix[1].weight={float(weight)} (expected > 0: the share of training examples drawn "
                    "from b.jsonl)")


def test_mix_formats_and_roles_are_checked():
    from ftune.data.formats import FORMATS

    assert problems("data.mix=[{path: a, format: csv}]") == (
        f"data.mix[0].format='csv' is not allowed (expected one of: {', '.join(('auto', *FORMATS))})")
    assert "data.roles.bot='robot' (expected one of: system, user, assistant, tool, tool_call)" in problems(
        "+data.roles.bot=robot")
    assert load_run_config(["+data.roles.fn=tool_call"])[0].data.roles["fn"] == "tool_call"


def test_deepspeed_with_accumulation_is_refused(monkeypatch):
    load_run_config(["trainer.grad_accum=4"])  # our own loop accumulates exactly
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert "trainer.grad_accum=4 under DeepSpeed (expected 1" in problems("trainer.grad_accum=4")
    load_run_config(["trainer.grad_accum=1"])


def test_qlora_pitfalls_warn_with_the_reason():
    plain, _ = load_run_config(["recipe=tiny_qlora"])
    assert not [n for n in advisories(plain) if "quant." in n]
    fp16, _ = load_run_config(["recipe=tiny_qlora", "quant.compute_dtype=fp16"])
    assert any("quant.compute_dtype=fp16" in n and "overflow" in n for n in advisories(fp16))
    fp4, _ = load_run_config(["recipe=tiny_qlora", "quant.type=fp4"])
    assert any("quant.type=fp4" in n and "NF4" in n for n in advisories(fp4))


@pytest.mark.parametrize(("key", "registry"), [("method.name", "ftune.model.adapters:PEFT_CONFIGS"),
                                              ("optim.name", "ftune.train.optim:BNB_OPTIMIZERS"),
                                              ("data.format", "ftune.data.formats:FORMATS")])
def test_choices_come_from_the_registry_that_implements_them(key, registry, monkeypatch):
    import importlib

    module, name = registry.split(":")
    assert "is not allowed" in problems(f"{key}=newcomer")
    monkeypatch.setitem(getattr(importlib.import_module(module), name), "newcomer", None)
    assert getattr(getattr(load_run_config([f"{key}=newcomer"])[0], key.split(".")[0]), key.split(".")[1]) == "newcomer"


def test_streaming_needs_max_steps_and_refuses_what_a_stream_cannot_do():
    assert problems("data.streaming=true") == (
        "data.streaming=true with trainer.max_steps=-1 (expected a positive number of steps: a stream's length is "
        "unknown until it ends, so trainer.epochs cannot be counted)")
    line = problems("data.streaming=true", "trainer.max_steps=10", "data.dedup=exact", "trainer.num_workers=2",
                    "data.mix=[{path: a.jsonl}]")
    assert "data.mix with data.streaming=true (expected data.path alone" in line
    assert "data.dedup=exact with data.streaming=true (expected none" in line
    assert "trainer.num_workers=2 with data.streaming=true (expected 0" in line
    streaming, _ = load_run_config(["data.streaming=true", "trainer.max_steps=10", "data.packing=true"])
    assert streaming.data.shuffle_buffer == 10000


def test_list_items_of_the_wrong_type_are_named_with_what_each_item_must_be():
    import dataclasses as dc

    from ftune.config.validate import field_problems

    @dc.dataclass
    class Lists:
        names: list[str] = dc.field(default_factory=list)
        counts: list[int] = dc.field(default_factory=list)
        rates: list[float] = dc.field(default_factory=list)

    assert list(field_problems(Lists(["a", {"b": 1}], [1, True, 2.5], [0.5, 2, "x"]), prefix="")) == [
        "names[1]={'b': 1} (expected a string: names is a list of them)",
        "counts[1]=True (expected a whole number: counts is a list of them)",
        "counts[2]=2.5 (expected a whole number: counts is a list of them)",
        "rates[2]='x' (expected a number: rates is a list of them)",
    ]
    assert list(field_problems(Lists(["a"], [1], [0.5, 2]), prefix="")) == []
