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
from ftune.export.parity import PROBE_CONVERSATION, identical, within
from ftune.export.source import ExportSource
from ftune.model.dtypes import DTYPES
from ftune.model.load import from_pretrained
from ftune.model.merge import (
    PROBE_TEXTS,
    carry_generation_config,
    load_adapted,
    load_full_precision,
    logit_difference,
    merge_checked,
    probe_logits,
    tokenizer_source,
)

MERGE_CHECK = "merged vs base+adapter, max |logit diff|"
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
    """fp32 logits of the trained model (base+adapter unmerged, or the model itself) on `batch`."""
    checks: dict


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
    return {"runtime": f"transformers {transformers.__version__}", "dtype": cfg.dtype, "checks": checks}


def save_standalone(source: ExportSource, dtype: str, to: Path, max_shard_size: str = "5GB") -> Standalone:
    """Write the source as a standalone model in `dtype` (merging an adapter), with its tokenizer and stop ids.

    Raises:
        ConfigError: merged logits differ from base+adapter beyond the merge tolerance (as `ftune merge`).
    """
    directory = str(source.directory)
    tokenizer_dir = tokenizer_source(directory, source.base) if source.is_adapter else directory
    tokenizer = from_pretrained(AutoTokenizer, tokenizer_dir, "tokenizer")
    texts = probe_texts(tokenizer)
    batch = [torch.tensor([tokenizer.encode(text, add_special_tokens=False)]) for text in texts]
    checks = {}
    if source.is_adapter:
        model = load_adapted(source.base, directory, dtype)
        reference = probe_logits(model, batch)
        diff, tolerance = merge_checked(model, batch, dtype, max_shard_size=max_shard_size, to=to)
        checks[MERGE_CHECK] = within(diff, tolerance)
    else:
        model = load_full_precision(directory, dtype)
        reference = probe_logits(model, batch)
        model.save_pretrained(to, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(to)  # the trained model's own: the chat template training rendered with
    carry_generation_config(directory, to)
    return Standalone(to, tokenizer, texts, batch, reference, checks)


def probe_texts(tokenizer) -> list[str]:
    """The probe texts of `ftune merge`, plus the probe conversation as the chat template renders it.

    Encoded without added special tokens: the rendered conversation spells its special tokens out, and a
    runtime is then compared on exactly the ids the trained model saw.
    """
    return [*PROBE_TEXTS, *([render_conversation(tokenizer)] if tokenizer.chat_template is not None else [])]


def render_conversation(tokenizer) -> str | None:
    """`PROBE_CONVERSATION` through the tokenizer's chat template; None when it has none."""
    if tokenizer.chat_template is None:
        return None
    return tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False)
