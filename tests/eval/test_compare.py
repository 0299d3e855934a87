"""`ftune.eval.compare`: what a model argument is, the rows of a comparison and the metrics measured across rows.

Also the benchmarks scored, and `evaluate_models` on two tiny random models with the embedded model's tokenizer,
checked against a hand computation of the same figures.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from ftune.config.commands import EvalCfg
from ftune.config.schema import DataCfg, ModelCfg, ProbeCfg
from ftune.data.formats import load_texts
from ftune.data.labels import tokenize_text
from ftune.data.mask import IGNORE_INDEX
from ftune.data.pipeline import build_split
from ftune.errors import ResourceError
from ftune.eval.compare import (
    ModelRef,
    add_pair_metrics,
    add_probe_drift,
    benchmark_limit,
    benchmark_names,
    describe_model,
    evaluate_models,
    model_refs,
)
from ftune.eval.loss import cross_entropy
from ftune.eval.pairs import pair_logps, pair_metrics, reward_accuracy
from ftune.model.load import load_tokenizer

PROBE_LENGTH = 32


def model_dir(path: Path) -> Path:
    """A directory `describe_model` takes for a model: it only looks for config.json."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def adapter_dir(path: Path, base: str | None) -> Path:
    """A PEFT LoRA adapter directory (its config only) recording `base` as its base model."""
    LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=base).save_pretrained(str(path))
    return path


def merged_dir(path: Path, base: str) -> Path:
    """A model directory as `ftune merge` writes it: config.json and the merge's provenance."""
    model_dir(path)
    (path / "ftune_merge.json").write_text(json.dumps({"base": base}))
    return path


def eval_cfg(model: str, *models: str, **settings) -> EvalCfg:
    """An EvalCfg with nothing to measure but what `settings` switch on (no held-out data, no probe)."""
    data = settings.pop("data", DataCfg(eval_path=None, num_proc=1))
    probe = settings.pop("probe", ProbeCfg(path=None))
    return EvalCfg(model=model, models=list(models), data=data, probe=probe, **settings)


# --- describe_model ---------------------------------------------------------------------------------------------


def test_a_hub_id_that_is_no_path_here_is_a_plain_model_and_its_own_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert describe_model("org/model", "model") == ModelRef("org/model", "org/model", "model", "org/model")


@pytest.mark.parametrize("missing", ["./nowhere", "/nowhere/ftune-test-model", "runs/x/final", "~/ftune-no-such-dir"])
def test_a_missing_local_path_is_refused_naming_its_key(tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ResourceError) as raised:
        describe_model(missing, "models")
    assert raised.value.message == f"models={missing}: no such file or directory"
    assert raised.value.hint == "expected a model or adapter directory, or a hub id"


def test_a_directory_with_neither_config_is_refused_pointing_at_its_final(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ResourceError) as raised:
        describe_model(str(run), "model")
    assert raised.value.message == (f"model={run}: neither a model (config.json) nor an adapter "
                                    "(adapter_config.json)")
    assert raised.value.hint == "expected e.g. <run>/final"
    (run / "final").mkdir()
    with pytest.raises(ResourceError) as raised:
        describe_model(str(run), "model")
    assert raised.value.hint == f"did you mean {run / 'final'}?"


def test_an_adapter_is_evaluated_on_the_base_it_records_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = model_dir(tmp_path / "base")
    adapter_dir(tmp_path / "local", "base")  # relative to the working directory
    adapter_dir(tmp_path / "hub", "org/base")
    assert describe_model("local", "model") == ModelRef("local", "local", "adapter", str(base.resolve()))
    assert describe_model("hub", "model") == ModelRef("hub", "hub", "adapter", "org/base")


@pytest.mark.parametrize("base", [None, "/nowhere/ftune-test-base", "./gone"])
def test_an_adapter_whose_base_is_unrecorded_or_gone_is_refused(tmp_path, monkeypatch, base):
    monkeypatch.chdir(tmp_path)
    adapter = adapter_dir(tmp_path / "adapter", base)
    with pytest.raises(ResourceError) as raised:
        describe_model(str(adapter), "models")
    assert raised.value.message == (f"models={adapter}: its base model {base!r} (base_model_name_or_path in "
                                    "adapter_config.json) is missing")
    assert raised.value.hint.startswith("point base_model_name_or_path at the base")


def test_a_merged_model_names_the_base_of_its_merge_and_a_plain_model_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    merged_dir(tmp_path / "merged", "org/base")
    plain = model_dir(tmp_path / "plain")
    assert describe_model("merged", "models") == ModelRef("merged", "merged", "merged", "org/base")
    assert describe_model("plain", "models") == ModelRef("plain", "plain", "model", str(plain.resolve()))


# --- model_refs -------------------------------------------------------------------------------------------------


@pytest.fixture
def family(tmp_path, monkeypatch):
    """A base directory and two adapters and a merge of it, named relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    base = str(model_dir(tmp_path / "base").resolve())
    adapter_dir(tmp_path / "a1", base)
    adapter_dir(tmp_path / "a2", base)
    merged_dir(tmp_path / "m", base)
    return base


def test_the_first_models_base_is_the_reference_row_then_every_model_once_in_order(family):
    refs = model_refs(eval_cfg("a1", "m", "a2", "a1", "org/other"))
    assert refs == [ModelRef(family, family, "base", family), ModelRef("a1", "a1", "adapter", family),
                    ModelRef("m", "m", "merged", family), ModelRef("a2", "a2", "adapter", family),
                    ModelRef("org/other", "org/other", "model", "org/other")]


@pytest.mark.parametrize("spelling", ["base", "./base", "base/"])
def test_the_base_given_among_the_models_is_the_reference_row_under_the_name_given(family, spelling):
    refs = model_refs(eval_cfg("a1", spelling))
    assert refs == [ModelRef(spelling, family, "base", family), ModelRef("a1", "a1", "adapter", family)]


def test_a_base_alone_is_one_row(family):
    assert model_refs(eval_cfg("org/model")) == [ModelRef("org/model", "org/model", "base", "org/model")]
    assert model_refs(eval_cfg("base")) == [ModelRef("base", family, "base", family)]


# --- metrics across rows ----------------------------------------------------------------------------------------


def test_probe_drift_is_each_rows_perplexity_over_the_references_minus_one():
    rows = {"base": {"probe_ppl": 4.0}, "worse": {"probe_ppl": 5.0}, "better": {"probe_ppl": 3.0}}
    add_probe_drift(rows)
    assert {name: row["probe_drift"] for name, row in rows.items()} == {"base": 0.0, "worse": 0.25, "better": -0.25}


def test_no_probe_no_drift():
    rows = {"base": {"eval_loss": 1.0}, "other": {"eval_loss": 2.0}}
    add_probe_drift(rows)
    assert rows == {"base": {"eval_loss": 1.0}, "other": {"eval_loss": 2.0}}


def test_pair_metrics_go_to_every_row_and_reward_accuracy_to_all_but_the_reference():
    rows = {"base": {"kind": "base"}, "dpo": {"kind": "adapter"}}
    base = torch.tensor([[-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-4.0, -5.0]])  # margins 1, -2, 0, 1
    dpo = torch.tensor([[-0.5, -3.0], [-2.0, -2.0], [-2.0, -3.0], [-4.0, -4.0]])  # margins 2.5, 0, 1, 0
    add_pair_metrics(rows, {"base": base, "dpo": dpo})
    # gained over base: chosen +0.5 +1 0 0, rejected -1 -1 -1 +1: the chosen gained more on 3 of 4
    assert rows == {"base": {"kind": "base", "pair_accuracy": 0.5, "pair_margin": 0.0, "pairs": 4},
                    "dpo": {"kind": "adapter", "pair_accuracy": 0.5, "pair_margin": 0.875, "pairs": 4,
                            "reward_accuracy": 0.75}}


def test_no_pairs_leave_the_rows_as_they_are():
    rows = {"base": {"kind": "base", "eval_loss": 1.5}}
    add_pair_metrics(rows, {})
    assert rows == {"base": {"kind": "base", "eval_loss": 1.5}}


@pytest.mark.parametrize(("tasks", "probe_tasks", "expected"), [
    ([], [], []),
    (["hellaswag"], [], ["hellaswag"]),
    ([], ["tinyworld_tense"], ["tinyworld_tense"]),
    (["b", "a", "b"], ["a", "c"], ["b", "a", "c"]),
])
def test_benchmarks_are_the_tasks_then_the_probes_each_once(tasks, probe_tasks, expected):
    cfg = eval_cfg("org/model", tasks=tasks, probe=ProbeCfg(path=None, tasks=probe_tasks))
    assert benchmark_names(cfg) == expected


@pytest.mark.parametrize(("limit", "probe_limit", "expected"), [(None, None, None), (None, 5, 5), (3, 5, 3),
                                                                (3, None, 3)])
def test_the_benchmark_limit_is_limit_else_the_probes(limit, probe_limit, expected):
    cfg = eval_cfg("org/model", limit=limit, probe=ProbeCfg(path=None, limit=probe_limit))
    assert benchmark_limit(cfg) == expected


# --- evaluate_models --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return load_tokenizer(ModelCfg(name_or_path=str(tiny_model_path)), "model")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tiny_model_path):
    """The first held-out conversations, preference pairs and probe documents of the shipped data sets."""
    assets = tiny_model_path.parents[1] / "data"
    root = tmp_path_factory.mktemp("data")
    files = {}
    for name, source, count in (("chat", "chat/validation.jsonl", 6), ("pairs", "pairs/validation.jsonl", 6),
                                ("probe", "probe/general.jsonl", 4)):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("\n".join((assets / source).read_text().splitlines()[:count]) + "\n")
    return files


@pytest.fixture
def two_models(tmp_path, random_llama, tokenizer):
    """Two different tiny random Llamas over the embedded tokenizer's vocabulary, saved as model directories."""
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"model{seed}"
        random_llama(vocab_size=len(tokenizer), seed=seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def hand_mean_loss(model, sequences: list[tuple[list[int], list[int]]]) -> float:
    """Summed next-token cross-entropy of every labelled token, one unpadded sequence at a time, over their count."""
    total, count = 0.0, 0
    for ids, labels in sequences:
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        for position in range(1, len(ids)):
            if labels[position] != IGNORE_INDEX:
                total -= float(log_probs[position - 1, labels[position]])
                count += 1
    return total / count


def hand_figures(path: str, tokenizer, data: DataCfg, probe: Path) -> dict[str, float]:
    """What a row must hold: the held-out loss and perplexity, and the probe's perplexity, computed by hand."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = build_split(data.eval_path, tokenizer, data).rows
    held_out = hand_mean_loss(model, [(list(row["input_ids"]), list(row["labels"])) for row in rows])
    documents = [tokenize_text(text, tokenizer) for _, text in load_texts(str(probe))]
    probe_loss = hand_mean_loss(model, [(d.input_ids[:PROBE_LENGTH], d.labels[:PROBE_LENGTH]) for d in documents])
    return {"eval_loss": held_out, "eval_ppl": math.exp(held_out), "probe_ppl": math.exp(probe_loss)}


def test_each_row_holds_the_held_out_loss_probe_and_generations_of_its_model(two_models, small_data, tokenizer):
    first, second = two_models
    data = DataCfg(eval_path=str(small_data["chat"]), num_proc=1)
    cfg = eval_cfg(first, second, data=data, probe=ProbeCfg(path=str(small_data["probe"]), max_length=PROBE_LENGTH),
                   batch_size=4, generate=2, max_new_tokens=3)
    comparison = evaluate_models(cfg)
    assert list(comparison.rows) == [first, second]
    for path, row in comparison.rows.items():
        expected = hand_figures(path, tokenizer, data, small_data["probe"])
        assert (row["kind"], row["base"]) == ("base" if path == first else "model", str(Path(path).resolve()))
        assert set(row) == {"kind", "base", "eval_loss", "eval_ppl", "eval_tokens", "probe_ppl", "probe_drift",
                            "exact_match", "f1", "answer_tokens", "generated"}
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-5), key
        assert row["generated"] == 2 and 0 <= row["answer_tokens"] <= 3
    rows = list(comparison.rows.values())
    assert rows[0]["probe_drift"] == 0.0 and rows[1]["probe_drift"] == rows[1]["probe_ppl"] / rows[0]["probe_ppl"] - 1
    assert [len(record["answers"]) for record in comparison.generations] == [2, 2]
    assert [list(record["answers"]) for record in comparison.generations] == [[first, second]] * 2


def test_the_loss_a_run_passes_is_the_one_of_the_held_out_loss_and_the_probe(two_models, small_data):
    def doubled(model):
        return lambda model_, batch: {"loss": 2 * cross_entropy(model_, batch)["loss"]}

    cfg = eval_cfg(two_models[0], data=DataCfg(eval_path=str(small_data["chat"]), num_proc=1),
                   probe=ProbeCfg(path=str(small_data["probe"]), max_length=PROBE_LENGTH), generate=0)
    (plain,) = evaluate_models(cfg).rows.values()
    (twice,) = evaluate_models(cfg, loss_for=doubled).rows.values()
    assert twice["eval_loss"] == pytest.approx(2 * plain["eval_loss"], rel=1e-6)
    assert twice["eval_tokens"] == plain["eval_tokens"] > 0
    assert twice["probe_ppl"] == pytest.approx(plain["probe_ppl"] ** 2, rel=1e-5)


def test_held_out_pairs_give_pair_metrics_and_no_loss_or_generations(two_models, small_data, tokenizer):
    from transformers import AutoModelForCausalLM

    first, second = two_models
    data = DataCfg(eval_path=str(small_data["pairs"]), num_proc=1)
    comparison = evaluate_models(eval_cfg(first, second, data=data, generate=4))
    logps = [pair_logps(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer, data, 8)
             for path in two_models]
    base = str(Path(first).resolve())
    assert comparison.rows == {
        first: {"kind": "base", "base": base, **pair_metrics(logps[0])},
        second: {"kind": "model", "base": str(Path(second).resolve()), **pair_metrics(logps[1]),
                 "reward_accuracy": reward_accuracy(logps[1], logps[0])},
    }
    assert comparison.rows[first]["pairs"] == 6 and comparison.generations == []
