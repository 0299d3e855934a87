"""`ftune plan` from the command line: offline for every 7B recipe, JSON schema, one-line errors with exit 2."""

import json

import pytest

from ftune.cli import main

SEVEN_B = {
    "qlora_7b": [],
    "lora_7b": [],
    "full_7b_fsdp": ["gpus=8", "sharding=fsdp"],
    "full_7b_zero3": ["gpus=8", "sharding=zero3"],
    "full_7b_zero2": ["gpus=8", "sharding=zero2"],
    "distill_7b_to_1b": [],
    "dpo_qlora_llama3_1_8b": [],
}
MEMORY_KEYS = {"weights_gb", "grads_gb", "optimizer_gb", "activations_gb", "total_gb"}


def plan_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", SEVEN_B)
def test_every_7b_recipe_plans_offline(recipe, capsys):
    plan = plan_json(capsys, f"recipe={recipe}", *SEVEN_B[recipe])
    assert set(plan["params"]) == {"total", "trainable"} and MEMORY_KEYS <= set(plan["memory"])
    assert 0 < plan["params"]["trainable"] <= plan["params"]["total"]
    memory = plan["memory"]
    parts = sum(value for key, value in memory.items() if key != "total_gb")
    assert memory["total_gb"] == pytest.approx(parts, abs=1e-3)
    assert 2 < memory["total_gb"] < 80  # each recipe fits the GPUs its comment names
    assert plan["distribution"]["gpus"] == (8 if SEVEN_B[recipe] else 1)


def test_plan_reports_the_recipe_model_and_method(capsys):
    qlora = plan_json(capsys, "recipe=qlora_7b")
    assert (qlora["model"], qlora["method"], qlora["optimizer"]) == \
        ("meta-llama/Llama-2-7b-hf", "qlora", "paged_adamw_8bit")
    assert qlora["params"] == {"total": 6_738_415_616 + 39_976_960, "trainable": 39_976_960}
    assert qlora["batch"]["effective_batch"] == 16
    full = plan_json(capsys, "recipe=full_7b_fsdp", "gpus=8", "sharding=fsdp")
    assert full["params"] == {"total": 6_738_415_616, "trainable": 6_738_415_616}
    distill = plan_json(capsys, "recipe=distill_7b_to_1b")
    assert distill["params"]["total"] == 1_100_048_384 and distill["memory"]["teacher_gb"] > 3
    sequence = plan_json(capsys, "recipe=distill_7b_to_1b", "distill.mode=sequence")  # the teacher answered before
    assert sequence["memory"]["teacher_gb"] == 0 and sequence["memory"]["total_gb"] < distill["memory"]["total_gb"]



def test_a_grpo_step_plans_every_completion_of_each_prompt(capsys):
    grpo = plan_json(capsys, "recipe=grpo_qlora_qwen3_8b")
    assert grpo["batch"]["sequences_per_example"] == 8
    four = plan_json(capsys, "recipe=grpo_qlora_qwen3_8b", "grpo.num_generations=4")
    assert grpo["memory"]["activations_gb"] == pytest.approx(2 * four["memory"]["activations_gb"], rel=0.05)

def test_a_dpo_step_counts_both_sequences_of_each_pair_and_a_full_runs_reference_copy(capsys):
    dpo, sft = plan_json(capsys, "recipe=tiny_dpo"), plan_json(capsys, "recipe=tiny_dpo", "objective=sft")
    assert (dpo["batch"]["sequences_per_example"], sft["batch"]["sequences_per_example"]) == (2, 1)
    assert dpo["memory"]["activations_gb"] == pytest.approx(2 * sft["memory"]["activations_gb"], rel=0.05)
    assert dpo["memory"]["reference_gb"] == 0  # LoRA: the policy with its adapter off
    full = plan_json(capsys, "recipe=tiny_dpo", "method=full")
    assert full["memory"]["reference_gb"] == full["memory"]["weights_gb"] > 0
    assert plan_json(capsys, "recipe=tiny_dpo", "method=full", "pref.loss=simpo")["memory"]["reference_gb"] == 0
    assert plan_json(capsys, "recipe=tiny_dpo", "method=full", "pref.reference=precompute")["memory"][
        "reference_gb"] == 0  # a table of log-probs instead of the copy


def test_overrides_change_the_plan(capsys):
    base = plan_json(capsys, "recipe=lora_7b")
    bigger = plan_json(capsys, "recipe=lora_7b", "lora.r=64", "trainer.micro_batch_size=8")
    assert bigger["params"]["trainable"] == 4 * base["params"]["trainable"]
    assert bigger["memory"]["activations_gb"] > base["memory"]["activations_gb"]


def test_sweep_prints_one_plan_per_job(capsys):
    assert main(["plan", "-m", "recipe=lora_7b", "lora.r=8,16", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert [p["params"]["trainable"] for p in plans] == [19_988_480, 39_976_960]


def test_table_output(capsys):
    assert main(["plan", "recipe=qlora_7b"]) == 0
    err = capsys.readouterr().err  # rich prints tables to stderr, like every ftune table
    assert "total per GPU" in err and "4-bit" in err and "6,778,392,576" in err


@pytest.mark.parametrize("argv, message", [
    (["recipe=nope"], "recipe=nope: no such recipe"),
    (["recipe=lora_7b", "sharding=zero4"], "sharding=zero4"),
    (["recipe=lora_7b", "gpus=two"], "gpus=two"),
    (["recipe=lora_7b", "lora.rank=8"], "lora.rank"),
    (["recipe=lora_7b", "model.name_or_path=nobody/none"], "model.name_or_path=nobody/none: no config.json"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(["plan", *argv, "--json"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
