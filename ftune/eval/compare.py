"""Evaluate several models side by side: bases, adapter directories and merged models.

Each model is measured with the code training uses, so the numbers compare with metrics.jsonl: the held-out
loss goes through the training data pipeline (`build_split` + `build_loader`, packing included) and
`evaluate_loss`, and the forgetting probe through `build_probe_loader` + `probe_ppl`. lm-eval tasks score the
same loaded model (an adapter unmerged on its base). The base of the first model is always evaluated too, as
the reference row that drifts are measured against.

Models are loaded one at a time and released before the next, so comparing N models needs the memory of one.
"""

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftune.config.commands import EvalCfg
from ftune.config.schema import ModelCfg
from ftune.errors import ResourceError
from ftune.eval.generation import (
    GenerationScore,
    generation_records,
    held_out_conversations,
    score_generations,
    summarize,
)
from ftune.eval.loss import BatchLoss, autocast_forward, cross_entropy, evaluate_loss, on_this_process
from ftune.eval.pairs import holds_pairs, pair_logps, pair_metrics, reward_accuracy
from ftune.eval.probe import build_probe_loader, probe_ppl
from ftune.eval.tasks import flat_scores, load_tasks, run_tasks
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


@dataclass
class Comparison:
    """What `ftune eval` measured: a row of metrics per model, and every generation with each model's answer."""

    rows: dict[str, dict]
    """`{model name: {kind, base, eval_loss, eval_ppl, probe_ppl, probe_drift, exact_match, f1, "task/metric",
    "task/metric_stderr", ...}}`, the reference base first; on preference pairs `pair_accuracy`, `pair_margin`,
    `pairs` and (but the reference) `reward_accuracy` instead of the loss and generations."""
    generations: list[dict]
    """`generation_records`: prompt, reference and every model's answer with its scores."""


def evaluate_models(cfg: EvalCfg, loss_for: Callable[[object], BatchLoss] = lambda model: cross_entropy) -> Comparison:
    """Evaluate the reference base and every model of `cfg`.

    Args:
        cfg: an `EvalCfg` that passed `eval_problems` (and, with `run=`, took that run's settings).
        loss_for: the loss of a loaded model's batches; `ftune eval run=` passes the run's own (chunked) loss.

    Returns:
        The rows and generations; metrics whose data is switched off (data.eval_path=null, probe.path=null,
        generate=0, no tasks) are absent.
    """
    from accelerate import PartialState

    device = PartialState().device
    refs = model_refs(cfg)
    pairs = cfg.data.eval_path is not None and holds_pairs(cfg.data)
    conversations = held_out_conversations(cfg.data.eval_path, cfg.data, cfg.generate) \
        if cfg.data.eval_path is not None and cfg.generate and not pairs else []
    names = benchmark_names(cfg)
    tasks = load_tasks(names, cfg.task_dir or cfg.probe.task_dir, "tasks") if names else None  # fails before loading
    rows: dict[str, dict] = {}
    answers: dict[str, list] = {}
    scored_pairs: dict[str, object] = {}
    for ref in refs:
        model, tokenizer = load_model(ref, cfg.dtype)
        model.to(device)
        autocast_forward(model, cfg.mixed_precision)
        if pairs:
            scored_pairs[ref.name] = pair_logps(model, tokenizer, cfg.data, cfg.batch_size)
        row, answers[ref.name] = evaluate_model(model, tokenizer, cfg, conversations, loss_for(model), pairs)
        if tasks is not None:
            row |= flat_scores(run_tasks(model, tokenizer, tasks, names, benchmark_limit(cfg), cfg.batch_size))
        rows[ref.name] = {"kind": ref.kind, "base": ref.base, **row}
        del model
        gc.collect()
    add_probe_drift(rows)
    add_pair_metrics(rows, scored_pairs)
    return Comparison(rows, generation_records(conversations, answers) if conversations else [])


def benchmark_names(cfg: EvalCfg) -> list[str]:
    """The lm-eval tasks to score: `tasks`, then `probe.tasks` (a run's forgetting probe), each once."""
    return list(dict.fromkeys([*cfg.tasks, *cfg.probe.tasks]))


def benchmark_limit(cfg: EvalCfg) -> int | None:
    """Examples per task: `limit`, else the probe's when its tasks are scored."""
    return cfg.limit if cfg.limit is not None else cfg.probe.limit


def evaluate_model(model, tokenizer, cfg: EvalCfg, conversations: list[list[dict]],
                   loss: BatchLoss, pairs: bool = False) -> tuple[dict, list[GenerationScore]]:
    """Held-out loss and perplexity, probe perplexity and generation scores of one loaded model, and its answers.

    Held-out preference pairs (`pairs`) have no loss of their own here: `add_pair_metrics` scores them.
    """
    from ftune.data.pipeline import build_loader, build_split
    from ftune.data.templates import resolve_template

    row, scores = {}, []
    if cfg.data.eval_path is not None and not pairs:
        # every model here is loaded with ModelCfg's default attention kernel, so packed rows get its mask
        loader = build_loader(build_split(cfg.data.eval_path, tokenizer, cfg.data), tokenizer, cfg.data,
                              ModelCfg().attn_implementation, cfg.batch_size, shuffle=False)
        result = evaluate_loss(model, on_this_process(loader), loss=loss)
        row |= {"eval_loss": result["loss"], "eval_ppl": result["ppl"], "eval_tokens": result["tokens"]}
    if cfg.probe.path is not None:
        loader = build_probe_loader(cfg.probe, tokenizer, cfg.batch_size)
        row["probe_ppl"] = probe_ppl(model, on_this_process(loader), loss=loss)
    if conversations:
        template = resolve_template(cfg.data.chat_template, tokenizer)
        scores = score_generations(model, tokenizer, template, conversations, cfg.max_new_tokens)
        row |= summarize(scores)
    return row, scores


def add_pair_metrics(rows: dict[str, dict], scored: dict) -> None:
    """Each row's preference of the chosen responses, and the others' `reward_accuracy` against the reference row."""
    if not scored:
        return
    reference = next(iter(scored.values()))
    for index, (name, logps) in enumerate(scored.items()):
        rows[name] |= pair_metrics(logps) | ({"reward_accuracy": reward_accuracy(logps, reference)} if index else {})


def add_probe_drift(rows: dict[str, dict]) -> None:
    """`probe_drift` of every row: its probe perplexity over the reference base's, minus one (as in training)."""
    reference = next(iter(rows.values())).get("probe_ppl")
    if reference is None:  # probe.path=null
        return
    for row in rows.values():
        row["probe_drift"] = row["probe_ppl"] / reference - 1.0
