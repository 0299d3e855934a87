"""`lora.init=loftq` and `lora.init=eva`: the adapters' start computed from the base's weights or the training data."""

import json

import pytest
import torch
from peft.tuners.lora import LoraLayer

from ftune.cli import main
from ftune.config.compose import ASSETS_DIR, load_run_config
from ftune.errors import ResourceError
from ftune.eval.loss import model_inputs
from ftune.model import load
from ftune.model.load import initialize_adapter, load_tokenizer, prepare_model, stored_weights
from ftune.train.objectives import build_objective

bnb = pytest.importorskip("bitsandbytes")

TINY = ASSETS_DIR / "models" / "tiny"
EVA_TARGETS = ("q_proj", "down_proj")
"""Fewer layers than all-linear keep EVA's SVDs quick; q_proj's input is shared with k and v, down_proj's is not."""


def config(*overrides: str):
    typed, _ = load_run_config(list(overrides))
    return typed


@pytest.fixture(scope="module")
def few_examples(tmp_path_factory):
    """The first 4 conversations of the shipped chat data: one micro-batch of 4."""
    lines = (ASSETS_DIR / "data" / "chat" / "train.jsonl").read_text().splitlines()[:4]
    path = tmp_path_factory.mktemp("data") / "few.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def four_bit_layers(model):
    """(name in the base model, LoRA layer) of every LoRA layer on a 4-bit linear."""
    return [(name, layer) for name, layer in model.get_base_model().named_modules()
            if isinstance(layer, LoraLayer) and isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)]


def test_loftq_starts_each_4bit_layer_at_its_best_rank_r_correction():
    """||W - (Q + scaling B A)|| is the error of W - Q's best rank-r approximation (Eckart-Young), below ||W - Q||."""
    cfg = config("recipe=tiny_qlora", "lora.init=loftq")
    model = prepare_model(cfg)
    initialize_adapter(model, cfg, [], model_inputs)
    read, layers = stored_weights(str(TINY)), four_bit_layers(model)
    assert len(layers) == 6 * 7  # every linear of the 6 blocks
    for name, layer in layers:
        weight = read(f"{name}.weight").float()
        base = layer.get_base_layer().weight
        error = weight - bnb.functional.dequantize_4bit(base.data, base.quant_state).float()
        best = torch.linalg.svdvals(error)[cfg.lora.r:].norm()
        corrected = (error - layer.get_delta_weight("default")).norm()
        torch.testing.assert_close(corrected, best, rtol=1e-4, atol=0, msg=name)
        assert corrected < 0.97 * error.norm(), name


def test_loftq_without_the_stored_weights_is_one_line(tmp_path):
    with pytest.raises(ResourceError, match=f"lora.init=loftq: no safetensors weights in {tmp_path}"):
        stored_weights(str(tmp_path))
    with pytest.raises(ResourceError, match="no tensor model.layers.9.mlp.up_proj.weight in the safetensors files"):
        stored_weights(str(TINY))("model.layers.9.mlp.up_proj.weight")
    assert stored_weights(str(TINY))("model.norm.weight").shape == (256,)


def eva_model(data):
    """The tiny model with a new EVA-initialised adapter on EVA_TARGETS, and its one training batch."""
    cfg = config("recipe=tiny_lora", "lora.init=eva", f"lora.target_modules=[{','.join(EVA_TARGETS)}]",
                 f"data.path={data}", "data.eval_path=null", "trainer.micro_batch_size=4")
    loader = build_objective(cfg).build_loaders(load_tokenizer(cfg.model), None)[0]["train"]
    model = prepare_model(cfg)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    initialize_adapter(model, cfg, loader, model_inputs)
    assert {name: p.shape for name, p in model.named_parameters()} == shapes  # rank r everywhere: plan counts it
    return model, next(iter(loader))


def learned_inputs(model, batch: dict, name: str) -> torch.Tensor:
    """The inputs of layer `name` of the base (adapters off) at the batch's learned tokens."""
    seen = []
    handle = model.get_base_model().get_submodule(name).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad(), model.disable_adapter():
        model.eval()(**model_inputs(batch))
    handle.remove()
    return seen[0][batch["labels"] != -100].float()


def test_eva_starts_a_at_the_principal_directions_of_the_learned_tokens_inputs(few_examples):
    model, batch = eva_model(few_examples)
    start = model.peft_config["default"]
    assert (start.init_lora_weights, start.rank_pattern, start.alpha_pattern) == ("eva", {}, {})
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.5.mlp.down_proj"):
        layer = model.get_base_model().get_submodule(name)
        inputs = learned_inputs(model, batch, name)
        directions = torch.linalg.svd(inputs - inputs.mean(0), full_matrices=False).Vh[:layer.r["default"]]
        a = layer.lora_A["default"].weight
        cosines = (a @ directions.T).diagonal().abs()  # unit rows; a direction's sign is arbitrary
        assert cosines.min() > 0.999, (name, cosines)
        assert not layer.lora_B["default"].weight.any()  # the model starts as the base


@pytest.mark.slow
def test_eva_run_trains_resumes_without_recomputing_and_loads_with_peft_alone(tmp_path, few_examples, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    calls = []
    computed = load.eva_init
    monkeypatch.setattr(load, "eva_init", lambda *args: calls.append(1) or computed(*args))
    run = ["train", "recipe=tiny_lora", "lora.init=eva", f"data.path={few_examples}", f"data.eval_path={few_examples}",
           "trainer.micro_batch_size=4", "trainer.eval_every=0", "probe.path=null", "trainer.save_every=2",
           f"output_dir={tmp_path}"]
    assert main([*run, "trainer.max_steps=2"]) == 0
    assert main([*run, "trainer.max_steps=3", "resume=auto"]) == 0
    assert calls == [1]  # the resumed run started from its checkpoint
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and "eval_loss" not in r] == [1, 2, 3]
    peft = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "final")
    assert peft.peft_config["default"].init_lora_weights == "eva"
    assert all(p.abs().max() > 0 for n, p in peft.named_parameters() if "lora_B" in n)  # B starts at zero


@pytest.mark.slow
def test_loftq_run_trains_and_loads_with_peft_alone(tmp_path, few_examples):
    from peft import AutoPeftModelForCausalLM

    assert main(["train", "recipe=tiny_qlora", "lora.init=loftq", f"data.path={few_examples}",
                 f"data.eval_path={few_examples}", "trainer.micro_batch_size=4", "trainer.max_steps=2",
                 "trainer.eval_every=2", "probe.path=null", f"output_dir={tmp_path}"]) == 0
    peft = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "final")
    tokens = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(peft(input_ids=tokens).logits).all()
