"""EWC (`ewc.weight`): the base's Fisher diagonal on the probe, a penalty that enters each step once, less drift."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ftune.cache import cache_dir
from ftune.cli import main
from ftune.eval.loss import cross_entropy
from ftune.train.ewc import ElasticPenalty, fisher_diagonal
from ftune.train.loop import add_penalties


def batches(vocab: int = 64) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(4, vocab, (2, 9), generator=generator) for _ in range(3)]
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()} for ids in rows]


def test_the_fisher_is_the_mean_squared_gradient_of_each_batchs_mean_loss(random_llama):
    model = random_llama()
    fisher = fisher_diagonal(model, batches(), 2, cross_entropy)
    assert all(param.grad is None for param in model.parameters())
    expected = {name: torch.zeros_like(param) for name, param in model.named_parameters()}
    for batch in batches()[:2]:
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten()).backward()
        for name, param in model.named_parameters():
            expected[name] += param.grad.pow(2) / 2
    assert fisher.keys() == expected.keys()
    for name, value in fisher.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-10, msg=name)


def test_the_penalty_is_zero_at_the_start_and_pulls_each_weight_back_by_its_fisher(random_llama):
    model = random_llama()
    fisher = {name: torch.rand_like(param) for name, param in model.named_parameters()}
    penalty = ElasticPenalty(model, fisher, weight=3.0)
    assert penalty().item() == 0.0
    weight = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    with torch.no_grad():
        weight.add_(0.1)
    penalty().backward()
    torch.testing.assert_close(weight.grad, 2 * 3.0 * fisher["model.layers.0.mlp.up_proj.weight"] * 0.1)


def test_add_penalties_adds_each_weighted_term_to_the_loss_under_its_name():
    penalty = lambda: torch.tensor(0.5)  # noqa: E731 -- a penalty is any callable with a name
    penalty.name = "ewc_loss"
    parts = add_penalties([penalty], {"loss": torch.tensor(1.0)}, torch.tensor(8.0))
    assert parts["ewc_loss"] == 4.0 and parts["loss"] == 5.0


def fisher_weighted_drift(run_dir, base_dir) -> float:
    """sum_i F_i (theta_i - theta*_i)^2 of the run's final weights, F read from the cache the EWC run wrote."""
    (cached,) = cache_dir("ewc").glob("*.safetensors")
    fisher, base = load_file(cached), load_file(base_dir / "model.safetensors")
    trained = load_file(run_dir / "final" / "model.safetensors")
    return sum((fisher[name] * (trained[name].float() - base[name].float()).pow(2)).sum().item() for name in fisher)


def test_a_run_logs_its_ewc_loss_and_moves_less_where_the_base_knew_most(tmp_path, tiny_model_path):
    """tiny_full, 4 steps: the penalty is 0 at step 1, then positive.

    The Fisher-weighted drift from the base (what EWC penalises) ends well below the unpenalised run's.
    """
    short = ["recipe=tiny_full", "trainer.max_steps=4", "trainer.eval_every=0", "optim.lr=1e-3",
             "optim.warmup_ratio=0", "ewc.batches=2", "trainer.mixed_precision=no"]
    runs = {weight: tmp_path / f"ewc-{weight}" for weight in (1e6, 0.0)}
    for weight, run_dir in runs.items():
        assert main(["train", *short, f"ewc.weight={weight}", f"output_dir={run_dir}"]) == 0
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        penalties = [row.get("ewc_loss") for row in rows if "loss" in row and "eval_loss" not in row]
        if weight:
            assert penalties[0] == 0.0 and all(value > 0 for value in penalties[1:])
        else:
            assert penalties == [None] * 4
    drifts = {weight: fisher_weighted_drift(run_dir, tiny_model_path) for weight, run_dir in runs.items()}
    assert drifts[1e6] < 0.5 * drifts[0.0], drifts


@pytest.mark.parametrize("overrides, said", [
    (["recipe=tiny_lora"], "ewc.weight=1.0 with method=lora (expected method=full or bitfit"),
    (["recipe=tiny_full", "probe.path=null"], "ewc.weight=1.0 without probe.path"),
])
def test_ewc_where_it_cannot_apply_is_refused(overrides, said, capsys):
    assert main(["train", *overrides, "ewc.weight=1.0"]) == 2
    assert said in capsys.readouterr().err
