"""The model card of a run: facts read from its records, rendered with Hugging Face front matter."""

import json

import pytest
import yaml

from ftune.report.card import render_card
from ftune.train.card import run_card_facts

CONFIG = {
    "recipe": "tiny_qlora", "seed": 7, "model": {"name_or_path": "org/base-1b"},
    "data": {"path": "PLACEHOLDER", "mix": [], "max_length": 256},
    "method": {"name": "lora"}, "quant": {"bits": 4, "type": "nf4"},
    "lora": {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "rslora": False,
             "dora": False, "init": "default"},
    "optim": {"name": "adamw", "lr": 0.001, "scheduler": "cosine", "warmup_ratio": 0.03, "weight_decay": 0.0,
              "betas": [0.9, 0.999]},
    "distill": {"teacher": None},
    "trainer": {"micro_batch_size": 4, "grad_accum": 2, "mixed_precision": "bf16"},
}


@pytest.fixture
def run_dir(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n\n{"text": "c"}\n')
    run = tmp_path / "run"
    run.mkdir()
    mix = [{"path": str(data), "weight": 0.8}, {"path": "org/chat-data", "weight": 0.2}]
    (run / "config.yaml").write_text(yaml.safe_dump(CONFIG | {"data": CONFIG["data"] | {"mix": mix}}))
    rows = [{"step": 1, "epoch": 0.5, "loss": 2.0, "time": 100.0},
            {"step": 2, "epoch": 1.0, "loss": 1.5, "time": 160.0},
            {"step": 2, "eval_loss": 1.25, "eval_ppl": 3.49, "probe_ppl": 6.1, "probe_drift": 0.02}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


def test_facts_come_from_config_metrics_and_data(run_dir):
    facts = run_card_facts(run_dir, hardware="1 x GPU")
    assert facts.method == "qlora" and facts.library == "peft" and facts.base_model == "org/base-1b"
    assert facts.hyperparameters == {
        "lora.r": 8, "lora.alpha": 16.0, "lora.dropout": 0.05, "lora.target_modules": ["q_proj", "v_proj"],
        "lora.rslora": False, "lora.dora": False, "quant.bits": 4, "quant.type": "nf4", "optim.name": "adamw",
        "optim.lr": 0.001, "optim.scheduler": "cosine", "optim.warmup_ratio": 0.03, "optim.weight_decay": 0.0,
        "batch": 8, "mixed_precision": "bf16", "seed": 7}
    assert facts.data_sources == [(str(run_dir.parent / "train.jsonl"), 3), ("org/chat-data", None)]
    assert facts.datasets == ["org/chat-data"]
    assert (facts.max_length, facts.steps, facts.epochs, facts.logged_time_s) == (256, 2, 1.0, 60.0)
    assert facts.wall_time_s is None  # known only once summary.json is written
    assert facts.eval_metrics == {"eval_loss": 1.25, "eval_ppl": 3.49, "probe_ppl": 6.1, "probe_drift": 0.02}
    assert facts.hardware == "1 x GPU" and facts.stop_reason is None


def test_a_finished_run_takes_totals_and_hardware_from_its_summary(run_dir):
    summary = {"steps": 2, "epochs": 1.0, "stop_reason": "max_steps", "wall_time_s": 75.5, "hardware": "CPU"}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    facts = run_card_facts(run_dir)
    assert (facts.stop_reason, facts.wall_time_s, facts.hardware) == ("max_steps", 75.5, "CPU")


def test_the_card_has_hub_front_matter_and_every_fact(run_dir):
    facts = run_card_facts(run_dir, hardware="1 x GPU")
    facts.parity = {"runtime": "llama-cpp-python 0.3", "checks": {
        "log-probs, max |diff|": {"value": 0.012, "tolerance": 0.05, "passed": True},
        "template": {"value": "identical", "tolerance": None, "passed": True}}}
    card = render_card(facts)
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front) == {"base_model": "org/base-1b", "library_name": "peft", "license": "unknown",
                                     "tags": ["ftune", "qlora"], "datasets": ["org/chat-data"],
                                     "pipeline_tag": "text-generation"}
    for text in ("| method | qlora |", "lora.r=8", "quant.type=nf4", "(3 records)", "`org/chat-data` (? records)",
                 "| sequence length | 256 |", "| steps | 2 |", "| epochs | 1.0 |", "| hardware | 1 x GPU |",
                 "| time from first to last step | 60 s |", "| ftune version | 0.1.0 |", "| probe_drift | 0.02 |",
                 "| log-probs, max \\|diff\\| | 0.012 (tolerance 0.05): pass |", "| template | identical: pass |"):
        assert text in body, text


def test_a_local_base_is_named_in_the_text_not_the_front_matter(run_dir):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["name_or_path"] = str(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    card = render_card(run_card_facts(run_dir))
    assert "base_model" not in card.split("---\n")[1] and f"of `{run_dir}`" in card


def test_every_lora_shaped_method_lists_its_lora_keys(run_dir):
    """VeRA, LoHa and LoKr are shaped by `lora.*` too (rank, scale, targets); IA3 is not."""
    for method, listed in (("adalora", True), ("vera", True), ("loha", True), ("lokr", True), ("ia3", False)):
        config = CONFIG | {"method": {"name": method}, "quant": {"bits": 0}}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config | {"data": CONFIG["data"] | {"mix": []}}))
        facts = run_card_facts(run_dir, hardware="CPU")
        assert facts.method == method and ("lora.r" in facts.hyperparameters) == listed


def test_bitfit_is_named_as_such(run_dir):
    config = CONFIG | {"method": {"name": "full", "train_only": ["[.]bias$"]}, "quant": {"bits": 0}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config | {"data": CONFIG["data"] | {"mix": []}}))
    assert run_card_facts(run_dir, hardware="CPU").method == "bitfit"
