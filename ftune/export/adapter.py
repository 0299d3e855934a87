"""format=adapter: the PEFT adapter alone (with its tokenizer and chat template), checked against what servers load.

vLLM validates an adapter when it is loaded (`vllm/lora/peft_helper.py`, `vllm/config/lora.py`) and refuses
DoRA, trained biases, `modules_to_save` and ranks above `--max-lora-rank`; TGI's LoRA support covers the same
attention and MLP projections. Each violation is one warning, since the adapter still serves with PEFT itself.
The copy is loaded back with PEFT on the base and must give the source adapter's logits.
"""

import shutil
from pathlib import Path

import peft
from transformers import AutoTokenizer

from ftune.config.commands import ExportCfg
from ftune.export.hf import encode_probe
from ftune.export.parity import within
from ftune.export.source import ExportSource
from ftune.model.load import from_pretrained
from ftune.model.merge import fit_to_adapter, load_full_precision, logit_difference, probe_logits, tokenizer_source

SERVED_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections vLLM (packed as qkv_proj and gate_up_proj) and TGI apply LoRA to in Llama-family models."""
VLLM_DEFAULT_MAX_RANK = 16
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""`--max-lora-rank` choices of vLLM; an adapter's rank must not exceed the one the server was started with."""
READ_BACK_CHECK = "read back by PEFT vs source adapter, max |logit diff|"


def write_adapter(cfg: ExportCfg, source: ExportSource, to: Path) -> dict:
    """Copy the adapter's files to `to` (not PEFT's README: the export writes its own card), then compare.

    Returns:
        The parity report: the copy loaded by PEFT on the base against the source adapter, in fp32.
    """
    for path in source.directory.iterdir():
        if path.is_file() and path.name != "README.md":
            shutil.copy2(path, to / path.name)
    tokenizer = from_pretrained(AutoTokenizer, tokenizer_source(str(source.directory), source.base), "tokenizer")
    _, batch = encode_probe(tokenizer)
    base = fit_to_adapter(load_full_precision(source.base, "fp32"), str(source.directory), source.base)
    model = peft.PeftModel.from_pretrained(base, str(source.directory), adapter_name="source")
    model.load_adapter(str(to), adapter_name="exported")
    logits = {}
    for name in ("source", "exported"):
        model.set_adapter(name)
        logits[name] = probe_logits(model, batch)
    diff, tolerance = logit_difference(logits["exported"], logits["source"], "fp32")
    return {"runtime": f"peft {peft.__version__}", "checks": {READ_BACK_CHECK: within(diff, tolerance)}}


def server_warnings(peft_config) -> list[str]:
    """One line per way the adapter breaks a common server's constraints (empty when vLLM and TGI load it)."""
    kind = peft_config.peft_type.value
    if kind != "LORA":
        return [f"a {kind} adapter: vLLM and TGI serve LoRA adapters only (export format=hf to serve it merged)"]
    warnings = []
    targets = peft_config.target_modules  # a list once saved; a regex string is matched by the server itself
    unserved = [] if isinstance(targets, str) else sorted(set(targets) - set(SERVED_TARGET_MODULES))
    if unserved:
        warnings.append(f"target modules {', '.join(unserved)}: vLLM and TGI apply LoRA only to "
                        f"{', '.join(SERVED_TARGET_MODULES)}")
    ranks = [peft_config.r, *(peft_config.rank_pattern or {}).values()]
    if max(ranks) > VLLM_DEFAULT_MAX_RANK:
        allowed = next((rank for rank in VLLM_RANKS if rank >= max(ranks)), None)
        warnings.append(f"rank {max(ranks)} exceeds vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}: "
                        + (f"start it with --max-lora-rank {allowed}" if allowed else "vLLM cannot load it"))
    if peft_config.modules_to_save:
        warnings.append(f"modules_to_save {sorted(peft_config.modules_to_save)}: vLLM refuses adapters with "
                        "fully trained modules (export format=hf to serve them merged)")
    if peft_config.use_dora:
        warnings.append("DoRA: vLLM does not support it (export format=hf to serve it merged)")
    if peft_config.bias != "none" or getattr(peft_config, "lora_bias", False):
        warnings.append(f"bias={peft_config.bias}: vLLM loads adapters without trained biases only")
    if getattr(peft_config, "target_parameters", None):
        warnings.append("target_parameters (MoE expert weights): vLLM and TGI do not load such adapters")
    if getattr(peft_config, "trainable_token_indices", None):
        warnings.append("trainable_token_indices (the rows of added tokens): vLLM refuses such adapters "
                        "(vllm-project/vllm#36501; export format=hf to serve them merged)")
    return warnings
