"""`ftune train` with every method's tiny recipe: each trains end to end and fits a fixed batch.

Each run trains and evaluates on the same 8 shipped examples (one micro-batch), so step 1's loss is the
untrained model's loss on exactly the data the final evaluation sees: a method that trains must beat it.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ftune.cli import main
from ftune.config.compose import ASSETS_DIR

STEPS = 8
BATCH = 8
ADAPTER_TYPES = {"tiny_qlora": "LORA", "tiny_ia3": "IA3", "tiny_prompt_tuning": "PROMPT_TUNING",
                 "tiny_prefix_tuning": "PREFIX_TUNING"}
FROZEN = ("model.embed_tokens.", "model.layers.0.")
EXTRA = {"tiny_full": ["method.freeze=[embed_tokens,'layers[.]0[.]']"]}


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    """The first BATCH examples of the shipped chat data."""
    lines = (ASSETS_DIR / "data" / "chat" / "train.jsonl").read_text().splitlines()[:BATCH]
    path = tmp_path_factory.mktemp("data") / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def train(recipe: str, run_dir, data, *overrides: str) -> tuple[list[dict], dict]:
    """Run a short `ftune train` in-process; returns the training rows and the final evaluation row."""
    short = [f"trainer.max_steps={STEPS}", "trainer.eval_every=0", f"trainer.micro_batch_size={BATCH}",
             f"data.path={data}", f"data.eval_path={data}", "probe.path=null"]
    assert main(["train", f"recipe={recipe}", *short, *overrides, f"output_dir={run_dir}"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r and "eval_loss" not in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    return train_rows, next(r for r in rows if "eval_loss" in r)


def assert_loss_falls(rows: list[dict], final_eval: dict) -> None:
    """The first step's loss is the untrained model's on the batch; training must lower it, and keep it lower."""
    assert rows[-1]["loss"] < 0.97 * rows[0]["loss"]
    assert final_eval["eval_loss"] < 0.97 * rows[0]["loss"]


@pytest.mark.parametrize("recipe", ["tiny_qlora", "tiny_full", "tiny_ia3", "tiny_prompt_tuning",
                                    "tiny_prefix_tuning"])
def test_method_fits_a_batch(recipe, tmp_path, one_batch, tiny_model_path):
    rows, final_eval = train(recipe, tmp_path, one_batch, *EXTRA.get(recipe, []))
    assert_loss_falls(rows, final_eval)
    final = tmp_path / "final"
    if recipe in ADAPTER_TYPES:
        assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == ADAPTER_TYPES[recipe]
        trained = load_file(final / "adapter_model.safetensors")
        assert trained and not (final / "model.safetensors").exists()  # the base is not in the artefact
        assert all(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # B starts at zero: it trained
    else:
        assert_only_unfrozen_weights_changed(load_file(final / "model.safetensors"), tiny_model_path)


@pytest.mark.parametrize("method, peft_type, lr", [("vera", "VERA", "1e-2"), ("loha", "LOHA", "2e-3"),
                                                   ("lokr", "LOKR", "2e-3"), ("adalora", "ADALORA", "2e-3")])
def test_peft_methods_train_load_with_peft_alone_and_merge(method, peft_type, lr, tmp_path, one_batch):
    """`recipe=tiny_lora method=<each>` fits the batch, and its final/ loads with PEFT alone.

    `ftune merge`'s model then computes what the adapter on its base does.
    """
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert_loss_falls(*train("tiny_lora", run, one_batch, f"method={method}", f"optim.lr={lr}"))
    final = run / "final"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == peft_type
    ids = torch.tensor([[1, 20, 21, 22, 23, 24]])
    with torch.no_grad():
        adapted = AutoPeftModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        logits = adapted(input_ids=ids).logits
        with adapted.disable_adapter():
            assert (adapted(input_ids=ids).logits - logits).abs().max() > 1e-3  # the adapter trained
        assert main(["merge", f"adapter={final}", f"out={tmp_path / 'merged'}"]) == 0
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)


def assert_only_unfrozen_weights_changed(trained: dict, base_path) -> None:
    """Full fine-tuning with `method.freeze`: frozen tensors equal the base's, every other one moved."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).state_dict()
    for name, value in trained.items():
        assert torch.equal(value, base[name]) == name.startswith(FROZEN), name


def test_gradual_unfreezing_trains_the_blocks_from_the_top_one_every_n_steps(tmp_path, one_batch, tiny_model_path):
    """6 blocks and a tied head, a block joining every 2 of 8 steps: blocks 5 to 2 train, 0 and 1 stay the base's."""
    from transformers import AutoModelForCausalLM

    rows, final_eval = train("tiny_full", tmp_path, one_batch, "method.unfreeze_every=2", "optim.lr=1e-3")
    assert_loss_falls(rows, final_eval)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    block = sum(p.numel() for p in base.model.layers[0].parameters())
    top = sum(p.numel() for p in base.parameters()) - 5 * block  # the tied embedding and head, the norm, block 5
    assert [row["trainable_params"] for row in rows] == [top + block * (step // 2) for step in range(8)]
    trained = load_file(tmp_path / "final" / "model.safetensors")
    for name, value in trained.items():
        frozen = name.startswith(("model.layers.0.", "model.layers.1."))
        assert torch.equal(value, base.state_dict()[name]) == frozen, name


def test_distillation_logs_both_terms(tmp_path, one_batch):
    rows, final_eval = train("tiny_distill", tmp_path, one_batch)
    for row in rows:  # alpha 0.5: the loss is the mean of the two per-token terms
        assert row["loss"] == pytest.approx(0.5 * row["ce_loss"] + 0.5 * row["kd_loss"], rel=1e-4)
        assert row["kd_loss"] > 0
    assert_loss_falls(rows, final_eval)
    assert rows[-1]["kd_loss"] < rows[0]["kd_loss"]  # the student moves towards the teacher
    assert (tmp_path / "final" / "model.safetensors").is_file()  # the student, trained in full
    config = (tmp_path / "config.yaml").read_text()
    assert "models/micro" in config and "models/tiny" in config
