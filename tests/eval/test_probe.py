"""The base model's probe perplexity, cached once per base, probe set and autocast dtype."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftune.config.schema import ModelCfg, ProbeCfg
from ftune.eval.loss import autocast_forward
from ftune.eval.probe import base_probe_ppl, build_probe_loader, probe_ppl

DOCUMENTS = 8
"""Probe documents used: enough for bf16 to move the perplexity, few enough to stay fast with bf16 emulated."""


def test_a_bf16_run_measures_its_own_base_perplexity_not_an_fp32_runs(tmp_path, monkeypatch, tiny_model_path):
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    probe = tmp_path / "probe.jsonl"
    shipped = tiny_model_path.parents[1] / "data" / "probe" / "general.jsonl"
    probe.write_text("\n".join(shipped.read_text().splitlines()[:DOCUMENTS]) + "\n")
    model_cfg, probe_cfg = ModelCfg(name_or_path=str(tiny_model_path)), ProbeCfg(path=str(probe), max_length=64)
    loader = build_probe_loader(probe_cfg, AutoTokenizer.from_pretrained(tiny_model_path), 4)
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    autocast_forward(bf16, "bf16")

    fp32_ppl = base_probe_ppl(fp32, loader, model_cfg, probe_cfg, "no")
    bf16_ppl = base_probe_ppl(bf16, loader, model_cfg, probe_cfg, "bf16")
    assert bf16_ppl == probe_ppl(bf16, loader) != fp32_ppl
    assert base_probe_ppl(bf16, loader, model_cfg, probe_cfg, "no") == fp32_ppl  # each is cached under its own key
