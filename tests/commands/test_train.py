"""`ftune train` end to end on the embedded model: the run directory contract and a loss that falls."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ftune.cli import main
from ftune.model.dtypes import native_mixed_precision

SHORT_RUN = ["trainer.max_steps=24", "trainer.eval_every=12", "trainer.micro_batch_size=8"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One short tiny_lora run shared by the tests of this module."""
    run_dir = tmp_path_factory.mktemp("runs") / "lora"
    assert main(["train", "recipe=tiny_lora", *SHORT_RUN, "optim.lr=0.003", f"output_dir={run_dir}"]) == 0
    return run_dir


def read_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contract(lora_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plots/loss.png", "plots/probe.png",
                 "final/adapter_config.json", "final/adapter_model.safetensors", "final/tokenizer.json"):
        assert (lora_run / name).is_file(), name
    assert "lr: 0.003" in (lora_run / "config.yaml").read_text()
    assert OmegaConf.load(lora_run / "config.yaml").trainer.mixed_precision == native_mixed_precision()  # not auto
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["stop_reason"] == "max_steps" and summary["steps"] == 24
    adapter = load_file(lora_run / "final" / "adapter_model.safetensors")
    assert summary["trainable_params"] == sum(t.numel() for t in adapter.values())
    assert summary["trainable_params"] < summary["total_params"]
    assert not list(lora_run.glob(".tmp*"))


def base_eval_loss(model_path) -> float:
    """The untrained model's loss on the shipped validation set, through ftune's own eval pipeline."""
    from transformers import AutoModelForCausalLM

    from ftune.config.compose import load_run_config
    from ftune.data.pipeline import build_loader, build_split
    from ftune.eval.loss import evaluate_loss
    from ftune.model.load import load_tokenizer

    cfg, _ = load_run_config([])
    tokenizer = load_tokenizer(cfg.model)
    loader = build_loader(build_split(cfg.data.eval_path, tokenizer, cfg.data), tokenizer, cfg.data, "sdpa", 8,
                          shuffle=False)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return evaluate_loss(model, loader)["loss"]


def test_metrics_rows_and_falling_loss(lora_run, tiny_model_path):
    rows = read_rows(lora_run)
    train = [r for r in rows if "loss" in r and "eval_loss" not in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 25))
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(train[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert sum(r["loss"] for r in train[-4:]) / 4 < train[0]["loss"]  # step 1's loss is the untrained model's
    assert evals[-1]["eval_loss"] < 0.9 * base_eval_loss(tiny_model_path)
    assert [r["step"] for r in evals] == [12, 24]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert {"probe_ppl", "probe_drift"} <= set(evals[0])


def test_final_adapter_loads_with_peft_and_only_lora_weights_changed(lora_run, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        base_logits = base(ids).logits
        model = PeftModel.from_pretrained(base, lora_run / "final")
        adapted_logits = model(ids).logits
    adapter = load_file(lora_run / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)  # the frozen base is not in the artefact
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    assert (adapted_logits - base_logits).abs().max() > 1e-3


def test_existing_run_dir_is_refused_without_resume(lora_run, capsys):
    assert main(["train", *SHORT_RUN, f"output_dir={lora_run}"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_eval_on_start_logs_the_base_and_sampling_writes_the_same_prompts_each_time(tmp_path):
    run_dir = tmp_path / "sampled"
    assert main(["train", "recipe=tiny_lora", "trainer.max_steps=4", "trainer.eval_every=2", "optim.lr=0.003",
                 "trainer.eval_on_start=true", "trainer.sample_every=2", "trainer.sample_prompts=2",
                 "probe.path=null", f"output_dir={run_dir}"]) == 0
    evals = [r for r in read_rows(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_step"] == 4  # the base's row at step 0 is logged, never judged: it has no checkpoint
    records = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 0, 2, 2, 4, 4]
    assert records[0]["prompt"] == records[2]["prompt"] == records[4]["prompt"] != records[1]["prompt"]
    assert records[0]["prompt"][-1]["role"] == "user" and records[0]["reference"]
    assert all({"answer", "exact_match", "f1", "new_tokens"} <= set(r) for r in records)
