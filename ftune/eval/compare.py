"""Evaluate several models side by side: bases, adapter directories and merged models.

Each model is measured with the code training uses, so the numbers compare with metrics.jsonl: the held-out
loss goes through the training data pipeline (`build_split` + `build_loader`, packing included) and
`evaluate_loss`, and the forgetting probe through `build_probe_loader` + `probe_ppl`. The base of the first
model is always evaluated too, as the reference row that `probe_drift` is measured against.

Models are loaded one at a time and released before the next, so comparing N models needs the memory of one.
"""

import gc
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from ftune.config.commands import EvalCfg
from ftune.config.schema import DataCfg, ModelCfg, ProbeCfg
from ftune.errors import ResourceError
from ftune.eval.generation import score_generations, summarize
from ftune.eval.loss import evaluate_loss, on_this_process
from ftune.eval.probe import build_probe_loader, probe_ppl
from ftune.model.load import load_base_model, load_tokenizer
from ftune.model.merge import (
    ADAPTER_CONFIG,
    MERGE_INFO,
    canonical_base,
    load_adapted,
    looks_local,
    read_adapter_config,
    tokenizer_source,
)


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate: its row name, what it is, and the base it was fine-tuned from."""

    name: str
    path: str
    kind: str
    """"base" (the reference row), "adapter" (a PEFT directory), "merged" (by ftune merge) or "model"."""
    base: str


def describe_model(name_or_path: str, key: str) -> ModelRef:
    """What `name_or_path` is, from the files in it; a hub id is taken as a plain model.

    Raises:
        ResourceError: a local path that does not exist, a directory with neither config.json nor
            adapter_config.json, or an adapter whose recorded base is missing.
    """
    path = Path(name_or_path)
    if not path.exists():
        if looks_local(name_or_path):
            raise ResourceError(f"{key}={name_or_path}: no such file or directory",
                                "expected a model or adapter directory, or a hub id")
        return ModelRef(name_or_path, name_or_path, "model", name_or_path)
    if (path / ADAPTER_CONFIG).is_file():
        return ModelRef(name_or_path, name_or_path, "adapter", adapter_base(name_or_path, key))
    if not (path / "config.json").is_file():
        hint = f"did you mean {path / 'final'}?" if (path / "final").is_dir() else "expected e.g. <run>/final"
        raise ResourceError(f"{key}={name_or_path}: neither a model (config.json) nor an adapter ({ADAPTER_CONFIG})",
                            hint)
    if (path / MERGE_INFO).is_file():
        return ModelRef(name_or_path, name_or_path, "merged", json.loads((path / MERGE_INFO).read_text())["base"])
    return ModelRef(name_or_path, name_or_path, "model", canonical_base(name_or_path))


def adapter_base(adapter_dir: str, key: str) -> str:
    """The base an adapter records, checked to exist when it is a local path (eval has no `base=` to override it).

    Raises:
        ResourceError: the adapter records no base, or a local base that is gone.
    """
    base = canonical_base(read_adapter_config(adapter_dir, key).base_model_name_or_path)
    if not base or (looks_local(base) and not Path(base).is_dir()):
        raise ResourceError(f"{key}={adapter_dir}: its base model {base!r} (base_model_name_or_path in "
                            f"{ADAPTER_CONFIG}) is missing", "point base_model_name_or_path at the base, "
                            "or merge it with ftune merge base=PATH_OR_ID")
    return base


def model_refs(cfg: EvalCfg) -> list[ModelRef]:
    """The reference row (the first model's base), then every other model of `cfg` once, in order."""
    given = [describe_model(cfg.model, "model")] if cfg.model is not None else []
    given += [describe_model(name, "models") for name in cfg.models]
    reference = given[0].base
    listed = [ref.name for ref in given if canonical_base(ref.path) == reference]
    rows = {ref.name: ref for ref in given if canonical_base(ref.path) != reference}
    base = ModelRef(listed[0] if listed else reference, reference, "base", reference)
    return [base, *rows.values()]


def load_model(ref: ModelRef, dtype: str):
    """The model of `ref` in eval mode and its tokenizer; an adapter is attached to its base in `dtype`."""
    if ref.kind == "adapter":
        model = load_adapted(ref.base, ref.path, dtype)
        tokenizer = load_tokenizer(ModelCfg(name_or_path=tokenizer_source(ref.path, ref.base)), "model")
    else:
        model = load_base_model(ModelCfg(name_or_path=ref.path, dtype=dtype), "model")
        tokenizer = load_tokenizer(ModelCfg(name_or_path=ref.path), "model")
    return model.eval(), tokenizer


def evaluate_models(cfg: EvalCfg) -> dict[str, dict]:
    """Evaluate the reference base and every model of `cfg`.

    Args:
        cfg: an `EvalCfg` that passed `eval_problems`.

    Returns:
        `{model name: {kind, base, eval_loss, eval_ppl, probe_ppl, probe_drift, exact_match, f1, ...}}`, the
        reference base first; metrics whose data is switched off (data=null, probe=null, generate=0) are absent.
    """
    from accelerate import PartialState

    device = PartialState().device
    refs = model_refs(cfg)
    conversations = held_out_conversations(cfg)
    rows: dict[str, dict] = {}
    for ref in refs:
        model, tokenizer = load_model(ref, cfg.dtype)
        model.to(device)
        rows[ref.name] = {"kind": ref.kind, "base": ref.base, **evaluate_model(model, tokenizer, cfg, conversations)}
        del model
        gc.collect()
    add_probe_drift(rows)
    return rows


def held_out_conversations(cfg: EvalCfg) -> list[list[dict]]:
    """The first `cfg.generate` held-out conversations (all with -1, none with 0 or data=null)."""
    from ftune.data.formats import load_conversations

    if cfg.data is None or cfg.generate == 0:
        return []
    stop = None if cfg.generate < 0 else cfg.generate
    conversations = load_conversations(cfg.data, held_out_data_cfg(cfg))
    return [messages for _, messages in itertools.islice(conversations, stop)]


def evaluate_model(model, tokenizer, cfg: EvalCfg, conversations: list[list[dict]]) -> dict:
    """Held-out loss and perplexity, probe perplexity and generation scores of one loaded model."""
    from ftune.data.pipeline import build_loader, build_split
    from ftune.data.templates import resolve_template

    row = {}
    if cfg.data is not None:
        data_cfg = held_out_data_cfg(cfg)
        # every model here is loaded with ModelCfg's default attention kernel, so packed rows get its mask
        loader = build_loader(build_split(cfg.data, tokenizer, data_cfg), tokenizer, data_cfg,
                              ModelCfg().attn_implementation, cfg.batch_size, shuffle=False)
        result = evaluate_loss(model, on_this_process(loader))
        row |= {"eval_loss": result["loss"], "eval_ppl": result["ppl"], "eval_tokens": result["tokens"]}
    if cfg.probe is not None:
        probe_cfg = ProbeCfg(path=cfg.probe, max_length=cfg.probe_max_length)
        loader = build_probe_loader(probe_cfg, tokenizer, cfg.batch_size)
        row["probe_ppl"] = probe_ppl(model, on_this_process(loader))
    if conversations:
        template = resolve_template(cfg.chat_template, tokenizer)
        row |= summarize(score_generations(model, tokenizer, template, conversations, cfg.max_new_tokens))
    return row


def held_out_data_cfg(cfg: EvalCfg) -> DataCfg:
    """The data settings of training that shape held-out rows, from the eval options."""
    return DataCfg(path=cfg.data, eval_path=None, chat_template=cfg.chat_template, max_length=cfg.max_length,
                   packing=cfg.packing)


def add_probe_drift(rows: dict[str, dict]) -> None:
    """`probe_drift` of every row: its probe perplexity over the reference base's, minus one (as in training)."""
    reference = next(iter(rows.values())).get("probe_ppl")
    if reference is None:  # probe=null
        return
    for row in rows.values():
        row["probe_drift"] = row["probe_ppl"] / reference - 1.0
