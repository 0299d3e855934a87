"""`ftune.model.merge` on the embedded model: merged logits equal base+adapter (LoRA and QLoRA).

They agree in this process and in a fresh one with transformers alone; linear and TIES combinations differ
as they should.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftune.config.commands import MergeCfg
from ftune.model.merge import merge

IDS = torch.tensor([[5, 17, 42, 99, 7, 256, 31, 8], [64, 3, 12, 12, 600, 77, 5, 19]])
"""A fixed probe batch of token ids, independent of the merge's own check."""
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def load_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def adapter_logits(base_path, adapter_dir) -> torch.Tensor:
    """Logits of the fp32 base with the adapter attached, unmerged."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_path), adapter_dir).eval()(IDS).logits


def save_random_lora(base_path, out, targets, seed: int = 0):
    """A LoRA adapter with random A and B (PEFT's init_lora_weights=False), so it changes the logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(load_base(base_path), config).save_pretrained(out)
    return out


def save_qlora(base_path, out):
    """A QLoRA adapter: the base loaded in NF4 (bitsandbytes runs it on CPU), LoRA trained a few steps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quant, device_map={"": "cpu"})
    assert base.is_loaded_in_4bit
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_path):
    """A LoRA and a QLoRA adapter of the embedded model, both with non-zero B."""
    root = tmp_path_factory.mktemp("adapters")
    return {"lora": save_random_lora(tiny_model_path, root / "lora", "all-linear"),
            "qlora": save_qlora(tiny_model_path, root / "qlora")}


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_merged_logits_equal_base_plus_adapter(adapters, tiny_model_path, tmp_path, kind):
    out = tmp_path / "merged"
    result = merge(MergeCfg(adapter=str(adapters[kind]), out=str(out)))
    assert result.max_abs_diff <= 1e-4 and result.adapter_effect > 1e-2
    expected = adapter_logits(tiny_model_path, adapters[kind])
    with torch.no_grad():
        merged = load_base(out)(IDS).logits
    assert (merged - expected).abs().max() <= 1e-4
    assert (expected - load_base(tiny_model_path)(IDS).logits).abs().max() > 1e-2  # the adapter does something
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / "ftune_merge.json").read_text())["base"] == str(tiny_model_path.resolve())


def test_qlora_merge_adds_the_update_to_the_full_precision_base(adapters, tiny_model_path, tmp_path):
    """Each merged weight is the fp32 base weight plus scale * B @ A: no NF4 round trip of the base."""
    out = tmp_path / "merged"
    merge(MergeCfg(adapter=str(adapters["qlora"]), out=str(out)))
    merged = load_file(out / "model.safetensors")
    base = load_base(tiny_model_path).state_dict()
    lora = load_file(adapters["qlora"] / "adapter_model.safetensors")
    config = json.loads((adapters["qlora"] / "adapter_config.json").read_text())
    for key in [k for k in lora if "lora_A" in k]:
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        update = config["lora_alpha"] / config["r"] * lora[key.replace("lora_A", "lora_B")] @ lora[key]
        assert update.abs().max() > 0 and (merged[name] - base[name] - update).abs().max() <= 1e-6, name
    untouched = [k for k in merged if "lora" not in k and "proj" not in k]
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)


FRESH_PROCESS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
assert tokenizer.chat_template, "the chat template travels with the merged model"
with torch.no_grad():
    print(json.dumps(model(torch.tensor(json.loads(sys.argv[2]))).logits.tolist()))
"""


def test_merged_model_loads_with_plain_transformers_in_a_fresh_process(adapters, tiny_model_path, tmp_path):
    out = tmp_path / "merged"
    merge(MergeCfg(adapter=str(adapters["lora"]), out=str(out)))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(out), json.dumps(IDS.tolist())],
                          capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    fresh = torch.tensor(json.loads(done.stdout.splitlines()[-1]))
    assert (fresh - adapter_logits(tiny_model_path, adapters["lora"])).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def opposing_adapters(tmp_path_factory, tiny_model_path):
    """Two adapters with the same A; b's B is -0.8 times a's, so b's update is -0.8 times a's, entry by entry."""
    root = tmp_path_factory.mktemp("opposing")
    a = save_random_lora(tiny_model_path, root / "a", ATTENTION)
    b = root / "b"
    b.mkdir()
    (b / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    weights = load_file(a / "adapter_model.safetensors")
    save_file({k: -0.8 * v if "lora_B" in k else v for k, v in weights.items()}, b / "adapter_model.safetensors")
    return a, b


def weight_update(model_dir, base_path, key: str = "model.layers.0.self_attn.q_proj.weight") -> torch.Tensor:
    """Merged weight minus base weight of one adapted matrix."""
    return load_file(model_dir / "model.safetensors")[key] - load_base(base_path).state_dict()[key]


def test_linear_averages_opposing_updates_while_ties_keeps_the_majority_sign(opposing_adapters, tiny_model_path,
                                                                             tmp_path):
    a, b = opposing_adapters
    merge(MergeCfg(adapter=str(a), out=str(tmp_path / "a")))
    delta_a = weight_update(tmp_path / "a", tiny_model_path)
    for combination in ("linear", "ties"):
        merge(MergeCfg(adapters=[str(a), str(b)], weights=[0.5, 0.5], combination=combination, density=1.0,
                       out=str(tmp_path / combination)))
    linear = weight_update(tmp_path / "linear", tiny_model_path)
    ties = weight_update(tmp_path / "ties", tiny_model_path)
    scale = delta_a.abs().max()
    # linear: 0.5 * delta_a + 0.5 * (-0.8 * delta_a), the updates cancel down to a tenth
    assert (linear - 0.1 * delta_a).abs().max() <= 1e-5 * scale
    # ties: the sign of a (larger) wins every entry of B and b's opposing entries are dropped; A agrees, so
    # its disjoint mean is A: what is left is a's update at a's weight
    assert (ties - 0.5 * delta_a).abs().max() <= 1e-5 * scale


def test_combined_adapter_saved_unmerged_equals_the_merged_combination(opposing_adapters, tiny_model_path,
                                                                       tmp_path):
    a, b = opposing_adapters
    common = {"adapters": [str(a), str(b)], "weights": [0.7, 0.3], "combination": "linear"}
    merge(MergeCfg(**common, merge=False, out=str(tmp_path / "adapter")))
    merge(MergeCfg(**common, out=str(tmp_path / "model")))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8  # linear is exact: the ranks of the two adapters are concatenated
    with torch.no_grad():
        merged = load_base(tmp_path / "model")(IDS).logits
    assert (adapter_logits(tiny_model_path, tmp_path / "adapter") - merged).abs().max() <= 1e-4
