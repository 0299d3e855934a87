"""The forgetting probe: perplexity on general text, against the base model's.

The base measurement is cached per (base model, probe set, settings), since it never changes between runs.
For adapter models the base is the same model with its adapters disabled, so no second copy is loaded.
"""

import json
from contextlib import nullcontext

from ftune.atomic import write_text
from ftune.cache import cache_dir, file_signature, fingerprint
from ftune.config.schema import ModelCfg, ProbeCfg
from ftune.data.collate import PadCollator
from ftune.data.formats import load_texts
from ftune.data.labels import tokenize_text
from ftune.data.pipeline import private_generator
from ftune.eval.loss import BatchLoss, cross_entropy, evaluate_loss


def build_probe_loader(cfg: ProbeCfg, tokenizer, batch_size: int):
    """Padded batches of the probe documents, each truncated to `cfg.max_length` and fully learned."""
    from torch.utils.data import DataLoader

    examples = []
    for _, text in load_texts(cfg.path):
        example = tokenize_text(text, tokenizer)
        examples.append({"input_ids": example.input_ids[: cfg.max_length], "labels": example.labels[: cfg.max_length]})
    return DataLoader(examples, batch_size=batch_size, collate_fn=PadCollator(tokenizer.pad_token_id, 8),
                      generator=private_generator())


def probe_ppl(model, loader, loss: BatchLoss = cross_entropy) -> float:
    """Perplexity of `model` on the probe loader (`loss`: the training run's cross-entropy, see evaluate_loss)."""
    return evaluate_loss(model, loader, loss=loss)["ppl"]


def base_probe_ppl(model, loader, model_cfg: ModelCfg, probe_cfg: ProbeCfg, mixed_precision: str) -> float:
    """The base model's probe perplexity, from the cache or measured now (adapters disabled).

    Cached per autocast dtype too (`mixed_precision`, as the run resolved it): bf16 autocast moves the tiny
    model's probe perplexity by 5e-4 of itself, so a bf16 run served an fp32 run's figure would start at that drift.
    """
    from accelerate import PartialState

    key = fingerprint(base_signature(model_cfg), file_signature(probe_cfg.path), probe_cfg.max_length, mixed_precision)
    cached = cache_dir("probe") / f"{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())["ppl"]
    with adapters_disabled(model):
        ppl = probe_ppl(model, loader)
    if PartialState().is_main_process:
        write_text(cached, json.dumps({"ppl": ppl, "model": model_cfg.name_or_path, "probe": probe_cfg.path}))
    return ppl


def adapters_disabled(model):
    """A context in which a PEFT model (even wrapped for DDP) runs as its base; a no-op for other models."""
    from accelerate.utils import extract_model_from_parallel

    unwrapped = extract_model_from_parallel(model)
    return unwrapped.disable_adapter() if hasattr(unwrapped, "disable_adapter") else nullcontext()


def base_signature(cfg: ModelCfg) -> dict:
    """What identifies the base model's weights and numerics for the cache.

    Added tokens (`model.add_tokens`) are part of it, when there are any (other runs keep their keys): their rows
    join every softmax, and their tokenizer encodes the text.
    """
    from pathlib import Path

    local = Path(cfg.name_or_path)
    weights = sorted(local.glob("*.safetensors")) if local.is_dir() else []
    added = {"added_tokens": [cfg.add_tokens, cfg.add_special_tokens]} if cfg.add_tokens or cfg.add_special_tokens \
        else {}
    return {"model": cfg.name_or_path, "weights": [file_signature(w) for w in weights], "dtype": cfg.dtype,
            "attn": cfg.attn_implementation, **added}
