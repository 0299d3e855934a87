"""`ftune merge` end to end: a merged model is written, and every bad input is one line, exit 2, nothing written."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftune.cli import main


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_path):
    """A small LoRA adapter of the embedded model with non-zero B, saved with the model's tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter") / "final"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(out)
    return out


def copy_adapter(source, out, config_changes: dict, weights=lambda key, value: value):
    """A copy of `source` with its adapter_config.json edited and its tensors mapped by `weights`."""
    out.mkdir()
    config = json.loads((source / "adapter_config.json").read_text()) | config_changes
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(source / "adapter_model.safetensors")
    save_file({k: weights(k, v) for k, v in tensors.items()}, out / "adapter_model.safetensors")
    return out


def test_merge_writes_a_model_and_reports_the_logit_check(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", f"adapter={adapter}", f"out={out}"]) == 0
    printed = capsys.readouterr().err
    assert "max |merged - (base+adapter)| logit" in printed and "tolerance" in printed
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "ftune_merge.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".merged*"))  # the staging directory was renamed, not left behind


def test_existing_output_is_refused_unless_overwrite(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", f"adapter={adapter}", f"out={out}"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["merge", f"adapter={adapter}", f"out={out}", "overwrite=true"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


@pytest.fixture
def bad_inputs(adapter, tmp_path, random_llama):
    """Every way `ftune merge` must refuse (by case name): the arguments, and the text of the one-line error."""
    from peft import PromptTuningConfig, get_peft_model

    empty = tmp_path / "empty"
    empty.mkdir()
    small_base = tmp_path / "small_base"
    random_llama().save_pretrained(small_base)
    prompt = tmp_path / "prompt"
    get_peft_model(random_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)).save_pretrained(
        prompt)
    other_base = copy_adapter(adapter, tmp_path / "other_base", {"base_model_name_or_path": str(small_base)})
    rank_2 = copy_adapter(adapter, tmp_path / "rank_2", {"r": 2},
                          lambda k, v: (v[:2] if "lora_A" in k else v[:, :2]).contiguous())
    nan = copy_adapter(adapter, tmp_path / "nan", {}, lambda k, v: torch.full_like(v, float("nan")))
    return {
        "no adapter config": ([f"adapter={empty}"], "no adapter_config.json in this directory"),
        "missing adapter": ([f"adapter={tmp_path / 'nowhere'}"], "no such directory"),
        "missing base": ([f"adapter={adapter}", f"base={tmp_path / 'nowhere'}"], "no such directory"),
        "base of other shapes": ([f"adapter={adapter}", f"base={small_base}"], "size mismatch for"),
        "out is the adapter": ([f"adapter={adapter}", f"out={adapter}"], "overlaps the input"),
        "out inside the adapter": ([f"adapter={adapter}", f"out={adapter / 'merged'}"], "overlaps the input"),
        "prompt tuning": ([f"adapter={prompt}"], "cannot be merged"),
        "different bases": ([f"adapters=[{adapter},{other_base}]"], f"was trained on {small_base}"),
        "different ranks": ([f"adapters=[{adapter},{rank_2}]", "combination=ties"], "needs equal ranks"),
        "failed logit check": ([f"adapter={nan}"], "merge check failed"),
        "unknown key": ([f"adapter={adapter}", "adaptor=x"], "adaptor: unknown key"),
        "bad value": ([f"adapter={adapter}", "dtype=fp8"], "dtype='fp8' is not allowed"),
        "no out": ([f"adapter={adapter}", "out=null"], "out: missing"),
    }


@pytest.mark.parametrize("case", ["no adapter config", "missing adapter", "missing base", "base of other shapes",
                                  "out is the adapter", "out inside the adapter", "prompt tuning", "different bases",
                                  "different ranks", "failed logit check", "unknown key", "bad value", "no out"])
def test_bad_input_is_one_line_and_writes_nothing(bad_inputs, adapter, tmp_path, capsys, case):
    arguments, expected = bad_inputs[case]
    out = tmp_path / "out"
    if not any(a.startswith("out=") for a in arguments):
        arguments = [*arguments, f"out={out}"]
    before = sorted(p.name for p in adapter.iterdir())
    assert main(["merge", *arguments]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ftune: error: ")]
    assert len(errors) == 1 and expected in errors[0] and err.strip().endswith(errors[0]), err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*")) and not (adapter / "merged").exists()
    assert sorted(p.name for p in adapter.iterdir()) == before
