"""format=hf and format=adapter from real runs: the export computes what was trained and carries its template."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftune.cli import main

IDS = torch.tensor([[5, 17, 42, 99, 7, 256, 31, 8], [64, 3, 12, 12, 600, 77, 5, 19]])
"""A probe of the test's own, independent of the export's checks."""


@torch.no_grad()
def adapter_on_full_precision_base(base_path, adapter_dir) -> torch.Tensor:
    """Logits of the trained adapter, unmerged, on the fp32 base (not the 4-bit one a QLoRA run trained on)."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()(IDS).logits


def read_card(out) -> tuple[dict, str]:
    """(front matter, body) of the export's README.md."""
    _, front, body = (out / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.mark.slow
def test_hf_from_a_qlora_run_equals_the_adapter_on_the_full_precision_base(qlora_run, tiny_model_path, tmp_path,
                                                                          conversation, training_render):
    out = tmp_path / "hf"
    assert main(["export", f"run={qlora_run}", "format=hf", "max_shard_size=8MB", f"out={out}"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) == 3  # 19 MB of fp32 weights, read back from the shards
    expected = adapter_on_full_precision_base(tiny_model_path, qlora_run / "final")
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)(IDS).logits
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(IDS).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter matters, so equality below means something
    assert (exported - expected).abs().max() <= 1e-4 * expected.abs().max()  # merge's fp32 tolerance

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == training_render(conversation)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"][0] == end_of_turn

    report = json.loads((out / "export_report.json").read_text())
    assert all(check["passed"] for check in report["parity"]["checks"].values())
    (gap,) = report["parity"]["figures"].values()  # the adapter trained on 4-bit weights, merged into full ones
    assert gap > 1e-4
    front, body = read_card(out)
    assert front["library_name"] == "transformers" and front["tags"] == ["ftune", "qlora", "hf"]
    for text in ("| method | qlora |", "quant.type=nf4", "(400 records)", "| sequence length | 512 |", "| steps | 2 |",
                 "| hardware | CPU", "| wall time |", "| probe_drift |", "read back by transformers vs trained",
                 "quantized base it trained on vs on the full-precision base"):
        assert text in body, text


@pytest.mark.slow
def test_adapter_export_is_the_adapter_with_its_template_and_a_card(lora_run, tiny_model_path, tmp_path, capsys,
                                                                    conversation, training_render):
    out = tmp_path / "adapter"
    assert main(["export", f"run={lora_run}", "format=adapter", f"out={out}"]) == 0
    assert capsys.readouterr().err.count("warning: ") == 0  # r=8 on the seven projections: every server loads it
    assert torch.equal(adapter_on_full_precision_base(tiny_model_path, out),
                       adapter_on_full_precision_base(tiny_model_path, lora_run / "final"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == training_render(conversation)
    front, body = read_card(out)
    assert front["library_name"] == "peft" and "| method | lora |" in body
    assert (lora_run / "final" / "README.md").read_text().startswith("---\n")  # final/ has ftune's card too
    assert "| time from first to last step |" in (lora_run / "final" / "README.md").read_text()
