"""format=hf: a merged, standalone model directory that transformers (vLLM, TGI) loads without ftune or PEFT.

An adapter is merged exactly as `ftune merge` merges it (full-precision base, logit check before saving); the
directory is then read back with plain transformers and its logits compared with the trained model's, and its
chat template must render the conversation the way the trained model's tokenizer does.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftune.config.commands import ExportCfg
from ftune.config.schema import ModelCfg
from ftune.export.parity import PROBE_CONVERSATION, identical, within
from ftune.export.source import ExportSource
from ftune.model.dtypes import DTYPES
from ftune.model.load import from_pretrained, load_base_model
from ftune.model.merge import (
    PROBE_TEXTS,
    carry_generation_config,
    fit_to_adapter,
    load_adapted,
    load_full_precision,
    logit_difference,
    merge_checked,
    probe_logits,
    tokenizer_source,
)
from ftune.model.quant import load_kwargs

MERGE_CHECK = "merged vs base+adapter, max |logit diff|"
QUANTIZED_BASE_GAP = "adapter on the quantized base it trained on vs on the full-precision base, max |logit diff|"
READ_BACK_CHECK = "read back by transformers vs trained, max |logit diff|"
TEMPLATE_CHECK = "chat template, two-turn conversation"


@dataclass
class Standalone:
    """A standalone model saved by `save_standalone`, and what the trained model computed on the probe."""

    directory: Path
    tokenizer: object
    texts: list[str]
    batch: list[torch.Tensor]
    """`texts` as token ids, one sequence each."""
    reference: torch.Tensor
    """Logits of the trained model (base+adapter unmerged, or the model itself) on `batch`."""
    checks: dict
    figures: dict
    """Measured, not checked: for a QLoRA adapter, how far the full-precision base moves its logits."""


def write_hf(cfg: ExportCfg, source: ExportSource, to: Path) -> dict:
    """Save the standalone model in `cfg.dtype` to `to`, read it back with transformers, and compare.

    Returns:
        The parity report (`ftune.export.parity`); the caller refuses the export if a check failed.
    """
    saved = save_standalone(source, cfg.dtype, to, cfg.max_shard_size)
    reloaded = AutoModelForCausalLM.from_pretrained(to, dtype=DTYPES[cfg.dtype]).eval()
    diff, tolerance = logit_difference(probe_logits(reloaded, saved.batch), saved.reference, cfg.dtype)
    checks = saved.checks | {READ_BACK_CHECK: within(diff, tolerance),
                             TEMPLATE_CHECK: identical(render_conversation(AutoTokenizer.from_pretrained(to)),
                                                       render_conversation(saved.tokenizer))}
    return {"runtime": f"transformers {transformers.__version__}", "dtype": cfg.dtype, "checks": checks,
            "figures": saved.figures}


def save_standalone(source: ExportSource, dtype: str, to: Path, max_shard_size: str = "5GB") -> Standalone:
    """Write the source as a standalone model in `dtype` (merging an adapter), with its tokenizer and stop ids.

    Raises:
        ConfigError: merged logits differ from base+adapter beyond the merge tolerance (as `ftune merge`).
    """
    directory = str(source.directory)
    tokenizer_dir = tokenizer_source(directory, source.base) if source.is_adapter else directory
    tokenizer = from_pretrained(AutoTokenizer, tokenizer_dir, "tokenizer")
    texts, batch = encode_probe(tokenizer)
    checks, figures = {}, {}
    if source.is_adapter:
        model = load_adapted(source.base, directory, dtype)
        reference = probe_logits(model, batch)
        if source.quant is not None:
            figures[QUANTIZED_BASE_GAP] = quantized_base_gap(source, batch, reference)
        diff, tolerance = merge_checked(model, batch, dtype, max_shard_size=max_shard_size, to=to)
        checks[MERGE_CHECK] = within(diff, tolerance)
    else:
        model = load_full_precision(directory, dtype)
        reference = probe_logits(model, batch)
        model.save_pretrained(to, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(to)  # the trained model's own: the chat template training rendered with
    carry_generation_config(directory, to)
    return Standalone(to, tokenizer, texts, batch, reference, checks, figures)


def quantized_base_gap(source: ExportSource, batch: list[torch.Tensor], reference: torch.Tensor) -> float:
    """Largest |logit| change when a QLoRA adapter moves from the quantized base it trained on to the full one.

    The export merges into the full-precision base (merging into 4-bit weights would add their rounding to every
    merged weight); the adapter, though, learned to correct the quantized base, so the two differ. Reported,
    not checked, so that a user sees the size of the trade (docs/export.md; huggingface/peft#2105).
    """
    from peft import PeftModel

    kwargs = load_kwargs(source.quant, source.quant.bits, "quant.bits")
    base = load_base_model(ModelCfg(name_or_path=source.base, dtype="fp32"), "base", **kwargs)
    base = fit_to_adapter(base, str(source.directory), source.base)
    adapted = PeftModel.from_pretrained(base, str(source.directory)).eval()
    return (probe_logits(adapted, batch) - reference.float()).abs().max().item()


def encode_probe(tokenizer) -> tuple[list[str], list[torch.Tensor]]:
    """The probe texts of `ftune merge` plus the probe conversation as the chat template renders it, and their ids.

    Encoded without added special tokens: the rendered conversation spells its special tokens out, and a
    runtime is then compared on exactly the ids the trained model saw.

    Returns:
        (the texts, one tensor of token ids of shape (1, length) per text).
    """
    texts = [*PROBE_TEXTS, *([render_conversation(tokenizer)] if tokenizer.chat_template is not None else [])]
    return texts, [torch.tensor([tokenizer.encode(text, add_special_tokens=False)]) for text in texts]


def render_conversation(tokenizer) -> str | None:
    """`PROBE_CONVERSATION` through the tokenizer's chat template; None when it has none."""
    if tokenizer.chat_template is None:
        return None
    return tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False)
