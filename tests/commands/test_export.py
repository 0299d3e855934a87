"""`ftune export` refuses bad input before loading any weights: one line naming the key, exit 2, nothing written."""

import json
import shutil

import pytest
import torch

from ftune.cli import main


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_path):
    """A small LoRA adapter of the embedded model, saved with the model's tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter") / "final"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(out)
    return out


def model_dir_with(tmp_path, tiny_model_path, name: str, config_changes=None, tokenizer_changes=None):
    """A copy of the embedded model's config and tokenizer (no weights: they must never be needed) with edits."""
    directory = tmp_path / name
    directory.mkdir()
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_path / file, directory / file)
    for file, changes in (("config.json", config_changes), ("tokenizer.json", tokenizer_changes)):
        content = json.loads((directory / file).read_text())
        (directory / file).write_text(json.dumps(content | (changes or {})))
    return directory


@pytest.fixture
def bad_inputs(adapter, tmp_path, tiny_model_path, random_llama):
    """Every way `ftune export` must refuse (by case name): the arguments, and the text of the one-line error."""
    from peft import PromptTuningConfig, get_peft_model

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    prompt = tmp_path / "prompt"
    get_peft_model(random_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)).save_pretrained(
        prompt)
    gemma = model_dir_with(tmp_path, tiny_model_path, "gemma", {"architectures": ["Gemma2ForCausalLM"]})
    yarn_rope = model_dir_with(tmp_path, tiny_model_path, "yarn_rope",
                               {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})
    sliding = model_dir_with(tmp_path, tiny_model_path, "sliding", {"architectures": ["MistralForCausalLM"],
                                                                     "sliding_window": 4096})
    metaspace = model_dir_with(tmp_path, tiny_model_path, "metaspace", None, {"pre_tokenizer": {"type": "Metaspace"}})
    return {
        "no source": ([], "run / adapter / model: give exactly one (got none"),
        "two sources": ([f"run={tmp_path}", f"adapter={adapter}"], "give exactly one (got run, adapter"),
        "quant without gguf": ([f"adapter={adapter}", "quant=q8_0"], "quant=q8_0 with format=hf (expected format=gguf"),
        "bad format": ([f"adapter={adapter}", "format=onnx"], "format='onnx' is not allowed"),
        "bad quant": ([f"adapter={adapter}", "format=gguf", "quant=q4_k"], "quant='q4_k' is not allowed"),
        "unknown key": ([f"adapter={adapter}", "quantize=f16"], "quantize: unknown key"),
        "no out": ([f"adapter={adapter}", "out=null"], "out: missing"),
        "push without repo": ([f"adapter={adapter}", "push=true"], "push=true without repo_id"),
        "adapter of a model": ([f"model={tiny_model_path}", "format=adapter"], "format=adapter with model="),
        "missing run": ([f"run={tmp_path / 'nowhere'}"], "no such directory"),
        "unfinished run": ([f"run={unfinished}"], "no final/ (the run has not finished)"),
        "missing adapter": ([f"adapter={tmp_path / 'nowhere'}"], "no such directory"),
        "out inside the adapter": ([f"adapter={adapter}", f"out={adapter / 'hf'}"], "overlaps the input"),
        "prompt tuning merged": ([f"adapter={prompt}", "format=gguf"], "format=gguf cannot merge it"),
        "gguf of another architecture": ([f"model={gemma}", "format=gguf"],
                                         "architecture Gemma2ForCausalLM is not supported"),
        "gguf of yarn rope": ([f"model={yarn_rope}", "format=gguf"], "RoPE type 'yarn' is not supported"),
        "gguf with a sliding window": ([f"model={sliding}", "format=gguf"], "sliding-window attention is not mapped"),
        "gguf of another tokenizer": ([f"model={metaspace}", "format=gguf"],
                                      "only byte-level BPE tokenizers with GPT-2's or Qwen2's pre-tokenizer"),
    }


CASES = ["no source", "two sources", "quant without gguf", "bad format", "bad quant", "unknown key", "no out",
         "push without repo", "adapter of a model", "missing run", "unfinished run", "missing adapter",
         "out inside the adapter", "prompt tuning merged", "gguf of another architecture", "gguf of yarn rope",
         "gguf with a sliding window", "gguf of another tokenizer"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(bad_inputs, adapter, tmp_path, capsys, case):
    if case.startswith("gguf "):
        pytest.importorskip("gguf")  # the converter's own checks; llama-cpp-python is not needed to refuse
    arguments, expected = bad_inputs[case]
    out = tmp_path / "out"
    if not any(a.startswith("out=") for a in arguments):
        arguments = [*arguments, f"out={out}"]
    before = sorted(p.name for p in adapter.iterdir())
    assert main(["export", *arguments]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ftune: error: ")]
    assert len(errors) == 1 and expected in errors[0] and err.strip().endswith(errors[0]), err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-out*")) and not (adapter / "hf").exists()
    assert sorted(p.name for p in adapter.iterdir()) == before
