"""Pure validation of a composed `RunCfg`: returns every problem at once, never mutates, imports no torch.

Per-field rules (allowed choices, numeric bounds) are read from the schema's field metadata; cross-field rules
are listed in `CROSS_FIELD_RULES`, one small function each.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
import typing
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from ftune.config.architecture import is_mixture_of_experts, packing_problem, read_model_config, sdpa_problem
from ftune.config.schema import MAPPABLE_ROLES, ModelCfg, RunCfg


def validate(cfg: RunCfg) -> list[str]:
    """All problems with `cfg`, each naming its key and what is allowed; empty when the config is valid."""
    problems = list(field_problems(cfg, prefix=""))
    for rule in CROSS_FIELD_RULES:
        problems.extend(rule(cfg))
    return problems


def field_problems(node: Any, prefix: str):
    """Check each field against its `choices`/`min`/`max` metadata, recursing into nested configs."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from field_problems(value, prefix=f"{key}.")
            continue
        yield from element_problems(f, value, key)
        allowed = allowed_values(f)
        if allowed is not None and value not in allowed:
            yield f"{key}={value!r} is not allowed (expected one of: {', '.join(allowed)})"
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if low is not None and value < low:
            yield f"{key}={value!r} is too small (expected >= {low})"
        if high is not None and value > high:
            yield f"{key}={value!r} is too large (expected <= {high})"


SCALAR_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
"""What a value of each scalar type is, in a user's words (the schema's messages, and compose's)."""


def element_problems(f: dataclasses.Field, value: Any, key: str):
    """The items of a list of strings or numbers that are not one (`lora.target_modules=[{a: 1}]`).

    OmegaConf types the list, not its items: a mapping or a list inside would reach the code that reads it.
    """
    expected = typing.get_args(f.type)[0] if typing.get_origin(f.type) is list else None
    if expected not in (str, int, float) or not isinstance(value, list):
        return
    allowed = (int, float) if expected is float else expected
    for index, item in enumerate(value):
        if not isinstance(item, allowed) or (expected is not str and isinstance(item, bool)):
            yield f"{key}[{index}]={item!r} (expected {SCALAR_WORDS[expected]}: {key} is a list of them)"


def allowed_values(f: dataclasses.Field) -> tuple | None:
    """A field's allowed values: its `choices`, or its extra values plus the keys of its registry (see schema)."""
    if "registry" not in f.metadata:
        return f.metadata.get("choices")
    module, name = f.metadata["registry"].split(":")
    return tuple(dict.fromkeys((*f.metadata["extra"], *getattr(importlib.import_module(module), name))))


def check_lora_targets(cfg: RunCfg) -> list[str]:
    targets = cfg.lora.target_modules
    if cfg.method.name == "lora" and not targets:
        return ["lora.target_modules is empty (expected module names or 'all-linear')"]
    if "all-linear" in targets and len(targets) > 1:
        return [f"lora.target_modules={targets} (expected 'all-linear' alone: it already covers every linear layer)"]
    return []


def check_lora_init(cfg: RunCfg) -> list[str]:
    """The base each initialisation needs: PiSSA an unquantized one, LoftQ a 4-bit one.

    PEFT's PiSSA init takes an SVD of the base weights, which it cannot do on quantized ones. LoftQ corrects the
    4-bit base's quantization error (8-bit weights have little to correct, an unquantized base nothing), and
    DoRA's magnitudes are fixed before LoftQ sets the adapters.
    """
    init, bits, problems = cfg.lora.init, cfg.quant.bits, []
    if init == "pissa" and bits:
        problems.append(f"lora.init=pissa with quant.bits={bits} (expected default, gaussian or olora, or "
                        "quant.bits=0)")
    if init == "loftq" and bits != 4:
        problems.append(f"lora.init=loftq with quant.bits={bits} (expected quant.bits=4: LoftQ starts the adapters "
                        "at the 4-bit base's quantization error)")
    if init == "loftq" and cfg.lora.dora:
        problems.append("lora.init=loftq with lora.dora=true (expected lora.dora=false: DoRA fixes its magnitudes "
                        "before LoftQ sets the adapters)")
    return problems


def check_computed_init(cfg: RunCfg) -> list[str]:
    """LoftQ and EVA are computed for a new LoRA adapter before the first step (`model.load.initialize_adapter`).

    EVA reads the inputs of the training batches' learned tokens, which GRPO's prompt batches do not have, and
    goes through the batches until its directions settle, which a stream (read once) does not allow.
    """
    init, problems = cfg.lora.init, []
    if init not in ("loftq", "eva"):
        return problems
    if cfg.method.name != "lora":
        problems.append(f"lora.init={init} with method.name={cfg.method.name} (expected method.name=lora: it "
                        "initialises LoRA's matrices)")
    if cfg.model.adapter is not None:
        problems.append(f"lora.init={init} with model.adapter={cfg.model.adapter} (expected lora.init=default: "
                        "training starts from the adapter's weights)")
    if init == "eva" and cfg.objective.name == "grpo":
        problems.append("lora.init=eva with objective.name=grpo (expected an objective that trains on labelled "
                        "tokens: EVA reads the learned tokens' inputs, and GRPO's batches are prompts)")
    if init == "eva" and cfg.data.streaming:
        problems.append("lora.init=eva with data.streaming=true (expected data.streaming=false: EVA goes through "
                        "the training batches until its directions settle, and a stream is read once)")
    return problems


def check_prompt_learning(cfg: RunCfg) -> list[str]:
    """Prompt and prefix tuning prepend virtual tokens: PEFT drops position ids and widens a 2D mask only."""
    method, problems = cfg.method.name, []
    if method in ("prompt_tuning", "prefix_tuning") and cfg.data.packing:
        problems.append(f"data.packing=true with method.name={method} (expected data.packing=false: packed "
                        "documents need 4D masks and position ids, which virtual tokens do not fit)")
    if method == "prefix_tuning" and cfg.model.gradient_checkpointing:
        problems.append("model.gradient_checkpointing=true with method.name=prefix_tuning (expected false: PEFT's "
                        "prefix tuning does not support it)")
    return problems


def check_freeze(cfg: RunCfg) -> list[str]:
    """`method.freeze` and `method.train_only`: regular expressions, for full fine-tuning only."""
    problems = []
    for key, patterns in (("freeze", cfg.method.freeze), ("train_only", cfg.method.train_only)):
        if patterns and cfg.method.name != "full":
            problems.append(f"method.{key}={patterns} with method.name={cfg.method.name} (expected "
                            "method.name=full: adapter methods freeze the whole base already)")
            continue
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(f"method.{key}: {pattern!r} is not a regular expression ({err})")
    return problems


def check_distillation(cfg: RunCfg) -> list[str]:
    distill, problems = cfg.distill, []
    if cfg.objective.name == "distill" and distill.teacher is None:
        problems.append("objective=distill without distill.teacher (expected a teacher model: hub id or directory)")
    if cfg.objective.name != "distill" and distill.teacher is not None:
        problems.append(f"distill.teacher={distill.teacher} with objective={cfg.objective.name} (expected "
                        "objective=distill, or distill.teacher=null)")
    if distill.teacher is None and distill.teacher_bits:
        problems.append(f"distill.teacher_bits={distill.teacher_bits} without distill.teacher (expected a teacher)")
    if distill.teacher is not None and distill.temperature <= 0:
        problems.append(f"distill.temperature={distill.temperature} (expected > 0)")
    return problems


def check_sequence_distillation(cfg: RunCfg) -> list[str]:
    """`distill.mode=sequence` has the teacher answer the conversations of one chat source, read whole."""
    data = cfg.data
    if cfg.distill.mode != "sequence":
        return []
    if cfg.objective.name != "distill":
        return [f"distill.mode=sequence with objective={cfg.objective.name} (expected objective=distill)"]
    problems = []
    if data.format == "text":
        problems.append("data.format=text with distill.mode=sequence (expected chat data: a text record has no "
                        "prompt for the teacher to answer; distill.mode=logits distills on text)")
    if data.mix:
        problems.append("data.mix with distill.mode=sequence (expected data.path alone: the teacher answers the "
                        "prompts of one source)")
    if data.columns:
        problems.append(f"data.columns={dict(data.columns)} with distill.mode=sequence (expected none: they would "
                        "rename the fields of the teacher's answers too; rename the source's columns instead)")
    if data.streaming:
        problems.append("data.streaming=true with distill.mode=sequence (expected false: the teacher answers every "
                        "prompt before the first step, so the source is read whole anyway)")
    return problems



def check_preference(cfg: RunCfg) -> list[str]:
    """What TRL's losses divide by, and what KTO's batch KL estimate needs."""
    pref, problems = cfg.pref, []
    if not cfg.objective.learns_preferences:
        return []
    if pref.beta <= 0:
        problems.append(f"pref.beta={pref.beta} (expected > 0)")
    if pref.label_smoothing >= 0.5:
        problems.append(f"pref.label_smoothing={pref.label_smoothing} (expected below 0.5: the robust loss divides "
                        "by 1 - 2 * label_smoothing)")
    if pref.label_smoothing and pref.loss != "robust":
        problems.append(f"pref.label_smoothing={pref.label_smoothing} with pref.loss={pref.loss} (expected "
                        "pref.loss=robust, the loss that reads it)")
    if cfg.objective.name == "kto" and cfg.trainer.micro_batch_size < 2:
        problems.append("trainer.micro_batch_size=1 with objective=kto (expected >= 2: the KL estimate pairs each "
                        "prompt with another row's completion)")
    if cfg.objective.name == "kto" and pref.loss != "sigmoid":
        problems.append(f"pref.loss={pref.loss} with objective=kto (expected sigmoid, the default: KTO has its own "
                        "loss)")
    if pref.reference == "precompute" and cfg.objective.name == "kto":
        problems.append("pref.reference=precompute with objective=kto (expected pref.reference=model: KTO's KL rows "
                        "pair each prompt with another row's completion of the same batch, which a table cannot hold)")
    elif pref.reference == "precompute" and not cfg.uses_reference:
        problems.append(f"pref.reference=precompute with pref.loss={pref.loss} (expected pref.reference=model: "
                        f"{pref.loss} uses no reference)")
    return problems


def check_start_adapter(cfg: RunCfg) -> list[str]:
    """`model.adapter` is a PEFT adapter of this base for this method, read from its adapter_config.json."""
    adapter = cfg.model.adapter
    if adapter is None:
        return []
    config_file = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(config_file):
        return [f"model.adapter={adapter}: no adapter_config.json there (expected a trained adapter directory, "
                "such as a run's final/)"]
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    problems = []
    kind = str(config.get("peft_type", "")).lower()
    if kind != cfg.method.name:
        problems.append(f"model.adapter={adapter} is a {kind or 'unknown'} adapter with method.name="
                        f"{cfg.method.name} (expected method.name={kind or 'its method'})")
    base = config.get("base_model_name_or_path")
    if base is not None and not same_model(base, cfg.model.name_or_path):
        problems.append(f"model.adapter={adapter} was trained on {base}, not on model.name_or_path="
                        f"{cfg.model.name_or_path} (expected an adapter of this base)")
    if config.get("trainable_token_indices") and not (cfg.model.add_tokens or cfg.model.add_special_tokens):
        problems.append(f"model.adapter={adapter} trained the rows of tokens its run added, and this run adds none "
                        "(expected the same model.add_tokens / model.add_special_tokens as that run's config.yaml)")
    return problems


VOCABULARY_METHODS = ("full", "lora", "adalora")
"""Methods that train the rows of added tokens: full fine-tuning (every row), LoRA with its variants and AdaLoRA
(the new rows alone, through PEFT's `trainable_token_indices`, which PEFT's other adapters do not have)."""


def check_added_tokens(cfg: RunCfg) -> list[str]:
    """`model.add_tokens` and `model.add_special_tokens`: distinct new tokens, for a run that can train their rows.

    The tokenizer of a local model is read here (small, no weights); a hub model's is checked when it loads, still
    before the weights (`ftune.model.vocab`).
    """
    model = cfg.model
    tokens = [*model.add_tokens, *model.add_special_tokens]
    if not tokens:
        return []
    problems = [f"model.{key}[{index}]='' (expected a non-empty token)"
                for key in ("add_tokens", "add_special_tokens")
                for index, token in enumerate(getattr(model, key)) if token == ""]
    problems += [f"model.add_tokens/add_special_tokens: {token!r} is listed {tokens.count(token)} times (expected each "
                 "token once, in one of the two lists)" for token in dict.fromkeys(tokens) if tokens.count(token) > 1]
    if cfg.method.name not in VOCABULARY_METHODS:
        problems.append(f"model.add_tokens/add_special_tokens with method={cfg.method.name} (expected one of method="
                        f"{', '.join(VOCABULARY_METHODS)}: the new rows must train, and PEFT trains single rows beside "
                        "LoRA adapters only)")
    if cfg.objective.name == "distill" and cfg.distill.mode == "logits":
        problems.append("model.add_tokens/add_special_tokens with objective=distill distill.mode=logits (expected "
                        "distill.mode=sequence: the teacher has no logits for the new tokens to match)")
    if os.path.isdir(model.name_or_path):
        problems += known_token_problems(model, local_vocabulary(model.name_or_path))
    return problems


def local_vocabulary(directory: str) -> set[str]:
    """Every token of the tokenizer in a local model directory (empty when it has none)."""
    from transformers import AutoTokenizer  # imports torch: only when tokens are added

    try:
        return set(AutoTokenizer.from_pretrained(directory, local_files_only=True).get_vocab())
    except (OSError, ValueError):  # no tokenizer files: the run's own load reports that
        return set()


def known_token_problems(model: ModelCfg, vocabulary: set[str]) -> list[str]:
    """One line per token of `model.add_tokens`/`add_special_tokens` that `vocabulary` already has.

    Adding such a token would give it no new row (the tokenizer keeps its id) and would overwrite a trained row
    with the mean.
    """
    return [f"model.{key}: {token!r} is already a token of model.name_or_path={model.name_or_path} (expected tokens "
            "the tokenizer lacks)" for key in ("add_tokens", "add_special_tokens")
            for token in dict.fromkeys(getattr(model, key)) if token in vocabulary]


def same_model(first: str, second: str) -> bool:
    """Whether two `name_or_path` values name one model: equal hub ids, or the same local directory."""
    if os.path.isdir(first) and os.path.isdir(second):
        return os.path.samefile(first, second)
    return first.rstrip("/") == second.rstrip("/")


def check_bitsandbytes(cfg: RunCfg) -> list[str]:
    """Quantized weights and 8-bit/paged optimizers need bitsandbytes; found without importing it."""
    needs = {"quant.bits": cfg.quant.bits, "distill.teacher_bits": cfg.distill.teacher_bits}
    needs["optim.name"] = cfg.optim.name if cfg.optim.name != "adamw" else 0
    wanted = [f"{key}={value}" for key, value in needs.items() if value]
    if wanted and importlib.util.find_spec("bitsandbytes") is None:
        return [f"{', '.join(wanted)} needs bitsandbytes, which is not installed (pip install 'bitsandbytes>=0.46')"]
    return []


def check_betas(cfg: RunCfg) -> list[str]:
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        return [f"optim.betas={betas} (expected two values in [0, 1))"]
    return []


def check_schedule(cfg: RunCfg) -> list[str]:
    trainer = cfg.trainer
    if trainer.max_steps == 0:
        return ["trainer.max_steps=0 (expected a positive number of steps, or -1 to run trainer.epochs)"]
    return []


def check_mixed_precision(cfg: RunCfg) -> list[str]:
    if cfg.trainer.mixed_precision == "fp16" and cfg.model.dtype == "bf16":
        return ["trainer.mixed_precision=fp16 with model.dtype=bf16 (expected matching precisions: use bf16 for both)"]
    return []


def check_quantization(cfg: RunCfg) -> list[str]:
    widths = {"quant.bits": cfg.quant.bits, "distill.teacher_bits": cfg.distill.teacher_bits}
    problems = [f"{key}={bits} (expected 0, 4 or 8)" for key, bits in widths.items() if bits not in (0, 4, 8)]
    if cfg.quant.bits and cfg.method.name == "full":
        problems.append("quant.bits with method.name=full (expected an adapter method: quantized weights cannot train)")
    return problems


def check_optimizer(cfg: RunCfg) -> list[str]:
    ratio = cfg.optim.loraplus_lr_ratio
    if ratio is not None and (ratio < 1 or cfg.method.name != "lora"):
        return [f"optim.loraplus_lr_ratio={ratio} (expected >= 1, with method.name=lora)"]
    return []


HELD_OUT_METRICS = {
    "sft": (("eval_loss", "min"), ("eval_ppl", "min")),
    "distill": (("eval_loss", "min"), ("eval_ppl", "min")),
    "dpo": (("eval_reward_accuracy", "max"), ("eval_reward_margin", "max"), ("eval_loss", "min")),
    "kto": (("eval_reward_accuracy", "max"), ("eval_reward_margin", "max"), ("eval_loss", "min")),
    "grpo": (("eval_reward", "max"),),
}
"""What each objective's evaluation logs on held-out data (`ftune.train.objectives`), its default early-stopping
metric first, with the direction in which it improves."""
PROBE_METRICS = (("probe_ppl", "min"), ("probe_drift", "min"))


def evaluation_metrics(objective: str, eval_path: str | None, probe_path: str | None) -> list[tuple[str, str]]:
    """(metric, mode) pairs an evaluation row will hold: the objective's held-out ones, and the probe's."""
    return list(HELD_OUT_METRICS[objective] if eval_path else ()) + list(PROBE_METRICS if probe_path else ())


def resolve_automatic(cfg: DictConfig) -> None:
    """Decide the `auto` settings of a composed config in place, so config.yaml records what ran.

    `early_stop.metric=auto` follows the objective's first held-out metric (the loss, or the reward accuracy of a
    preference objective), else the probe perplexity, else nothing: with no evaluation at all,
    `trainer.final_weights=best` has nothing to pick by and becomes `last`. `advisories` tells the user which
    fallback was taken.
    """
    metrics = evaluation_metrics(cfg.objective.name, cfg.data.eval_path, cfg.probe.path)
    if cfg.early_stop.metric == "auto":
        cfg.early_stop.metric, cfg.early_stop.mode = metrics[0] if metrics else ("none", "min")
    if not metrics and cfg.trainer.final_weights == "best":
        cfg.trainer.final_weights = "last"


def check_early_stop(cfg: RunCfg) -> list[str]:
    """The metric that picks the best checkpoint and stops early must be one the evaluation produces."""
    metrics = [name for name, _ in evaluation_metrics(cfg.objective.name, cfg.data.eval_path, cfg.probe.path)]
    metric, patience = cfg.early_stop.metric, cfg.early_stop.patience
    if not metrics:
        return [f"early_stop.patience={patience} with no evaluation (expected data.eval_path or probe.path, or "
                "early_stop.patience=0)"] if patience else []
    if metric not in (*metrics, "auto"):
        why = "" if cfg.data.eval_path else " (data.eval_path is null, so there is no held-out loss)"
        return [f"early_stop.metric={metric} is not measured by this run{why} (expected one of: "
                f"{', '.join(metrics)}, or auto)"]
    return []


def check_data_sources(cfg: RunCfg) -> list[str]:
    """`data.mix` weights are shares (> 0) and `data.roles` map onto ftune's roles."""
    problems = []
    for index, source in enumerate(cfg.data.mix):
        if not (math.isfinite(source.weight) and source.weight > 0):
            problems.append(f"data.mix[{index}].weight={source.weight} (expected > 0: the share of training "
                            f"examples drawn from {source.path})")
        problems += field_problems(source, prefix=f"data.mix[{index}].")
    problems += [f"data.roles.{name}={role!r} (expected one of: {', '.join(MAPPABLE_ROLES)})"
                 for name, role in cfg.data.roles.items() if role not in MAPPABLE_ROLES]
    return problems


def check_streaming(cfg: RunCfg) -> list[str]:
    """What a stream cannot do: know its length (for epochs), or see all records at once (for dedup and mix)."""
    data, trainer = cfg.data, cfg.trainer
    if not data.streaming:
        return []
    problems = []
    if trainer.max_steps <= 0:
        problems.append(f"data.streaming=true with trainer.max_steps={trainer.max_steps} (expected a positive number "
                        "of steps: a stream's length is unknown until it ends, so trainer.epochs cannot be counted)")
    if data.mix:
        problems.append("data.mix with data.streaming=true (expected data.path alone: mixing by weight needs each "
                        "source's size before the first step)")
    if data.dedup != "none":
        problems.append(f"data.dedup={data.dedup} with data.streaming=true (expected none: finding duplicates "
                        "keeps a hash of every record, which a stream does not)")
    if trainer.num_workers:
        problems.append(f"trainer.num_workers={trainer.num_workers} with data.streaming=true (expected 0: the stream "
                        "is read and tokenized in the training process)")
    return problems


def check_deepspeed_accumulation(cfg: RunCfg) -> list[str]:
    """DeepSpeed with accumulation is refused: it would silently step on every micro-batch.

    accelerate steps the DeepSpeed engine on every backward outside `accelerator.accumulate`, so ftune's
    token-normalised accumulation (no_sync over a step's micro-batches) cannot hold there.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true") and cfg.trainer.grad_accum > 1:
        return [f"trainer.grad_accum={cfg.trainer.grad_accum} under DeepSpeed (expected 1: DeepSpeed steps on every "
                "micro-batch; raise trainer.micro_batch_size, or launch with an FSDP config, where accumulation "
                "is exact)"]
    return []


def check_probe(cfg: RunCfg) -> list[str]:
    """The guard needs something to measure; probe tasks need lm-eval and a positive limit."""
    probe, problems = cfg.probe, []
    drift = probe.max_drift
    if drift is not None and (drift <= 0 or (probe.path is None and not probe.tasks)):
        problems.append(f"probe.max_drift={drift} (expected a positive fraction, with probe.path or probe.tasks set)")
    if probe.tasks and importlib.util.find_spec("lm_eval") is None:
        problems.append(f"probe.tasks={probe.tasks} needs lm-eval, which is not installed (pip install 'ftune[eval]')")
    if probe.limit is not None and probe.limit < 1:
        problems.append(f"probe.limit={probe.limit} (expected a positive number of examples per task, or null)")
    return problems


def check_neftune(cfg: RunCfg) -> list[str]:
    """NEFTune perturbs instruction tuning's inputs; preference and RL objectives compare log-probs it would shift."""
    alpha, objective = cfg.trainer.neftune_alpha, cfg.objective.name
    if alpha and objective not in ("sft", "distill"):
        return [f"trainer.neftune_alpha={alpha} with objective={objective} (expected objective=sft or distill: the "
                "noise would shift the log-probs the policy and its reference or its samples are compared by)"]
    return []


def check_ewc(cfg: RunCfg) -> list[str]:
    """EWC holds trained base weights near the base, by a Fisher estimated on the probe, in a token objective."""
    weight = cfg.ewc.weight
    if not weight:
        return []
    problems = []
    if cfg.method.name != "full":
        problems.append(f"ewc.weight={weight} with method={cfg.method.name} (expected method=full or bitfit: EWC holds "
                        "trained base weights near the base, and an adapter leaves the base frozen)")
    if not cfg.probe.path:
        problems.append(f"ewc.weight={weight} without probe.path (expected the probe's text: the Fisher information "
                        "is estimated on it)")
    if cfg.objective.name not in ("sft", "distill"):
        problems.append(f"ewc.weight={weight} with objective={cfg.objective.name} (expected objective=sft or distill)")
    return problems


def check_adalora(cfg: RunCfg) -> list[str]:
    """AdaLoRA cuts ranks from `lora.r` down to `target_r` over a schedule that needs a step between its phases."""
    if cfg.method.name != "adalora":
        return []
    ada, problems = cfg.method.adalora, []
    if ada.target_r > cfg.lora.r:
        problems.append(f"method.adalora.target_r={ada.target_r} above lora.r={cfg.lora.r} (expected at most the "
                        "starting rank: AdaLoRA only cuts ranks)")
    if ada.warmup + ada.final >= 1:
        problems.append(f"method.adalora.warmup={ada.warmup} + method.adalora.final={ada.final} (expected a sum below "
                        "1: the ranks are allocated between the two phases)")
    elif cfg.trainer.max_steps > 0 and round(ada.warmup * cfg.trainer.max_steps) >= \
            cfg.trainer.max_steps - round(ada.final * cfg.trainer.max_steps):
        problems.append(f"method.adalora.warmup={ada.warmup} and final={ada.final} leave no step of "
                        f"trainer.max_steps={cfg.trainer.max_steps} to allocate ranks in (expected more steps)")
    if cfg.lora.dora or cfg.lora.init != "default":
        problems.append("method=adalora with lora.dora or lora.init (expected neither: AdaLoRA has its own SVD-shaped "
                        "update and initialisation)")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        problems.append("method=adalora under FSDP (expected DDP or DeepSpeed: the rank allocator reads each adapter "
                        "weight's whole gradient, which FSDP shards)")
    return problems


def check_unfreezing(cfg: RunCfg) -> list[str]:
    """Gradual unfreezing stages the base's own weights, so it needs them trainable and unsharded."""
    every = cfg.method.unfreeze_every
    if not every:
        return []
    problems = []
    if cfg.method.name != "full":
        problems.append(f"method.unfreeze_every={every} with method={cfg.method.name} (expected method=full: an "
                        "adapter's base stays frozen, there is nothing to unfreeze)")
    sharded = [name for name in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true"]
    if sharded:
        problems.append(f"method.unfreeze_every={every} under {sharded[0].replace('DEEPSPEED', 'DeepSpeed')} (expected "
                        "DDP or one process: a sharded optimizer cannot take weights joining during the run)")
    return problems


def check_grpo(cfg: RunCfg) -> list[str]:
    """What GRPO needs: reward functions, a sampling distribution, room for completions, unpacked rows."""
    grpo, problems = cfg.grpo, []
    if cfg.objective.name != "grpo":
        return [f"grpo.reward_funcs={list(grpo.reward_funcs)} with objective={cfg.objective.name} (expected "
                "objective=grpo, or no reward functions)"] if grpo.reward_funcs else []
    if not grpo.reward_funcs:
        problems.append("objective=grpo without grpo.reward_funcs (expected [path/to/file.py:function, ...] or "
                        "[package.module:function, ...])")
    if grpo.reward_weights is not None and len(grpo.reward_weights) != len(grpo.reward_funcs):
        problems.append(f"grpo.reward_weights has {len(grpo.reward_weights)} weights for {len(grpo.reward_funcs)} "
                        "reward functions (expected one per function, or null)")
    if grpo.temperature <= 0:
        problems.append(f"grpo.temperature={grpo.temperature} (expected > 0: completions are sampled)")
    if grpo.top_p <= 0:
        problems.append(f"grpo.top_p={grpo.top_p} (expected in (0, 1])")
    if grpo.epsilon_high is not None and grpo.epsilon_high < 0:
        problems.append(f"grpo.epsilon_high={grpo.epsilon_high} (expected >= 0, or null for grpo.epsilon)")
    if cfg.data.max_length <= grpo.max_completion_length:
        problems.append(f"data.max_length={cfg.data.max_length} with grpo.max_completion_length="
                        f"{grpo.max_completion_length} (expected data.max_length larger: it holds the prompt and the "
                        "completion)")
    if cfg.data.packing or cfg.data.streaming:
        problems.append(f"data.{'packing' if cfg.data.packing else 'streaming'}=true with objective=grpo (expected "
                        "false: each row is a prompt and one sampled completion)")
    if cfg.method.name in ("prompt_tuning", "prefix_tuning"):
        problems.append(f"method={cfg.method.name} with objective=grpo (expected lora, ia3 or full: sampling through "
                        "virtual tokens is not tested)")
    return problems


def check_sampling(cfg: RunCfg) -> list[str]:
    """Sampled answers need held-out conversations to prompt with (GRPO logs the completions it trains on)."""
    if cfg.objective.name == "grpo":
        return []
    if cfg.trainer.sample_every and (cfg.data.eval_path is None or cfg.data.format == "text"):
        return [f"trainer.sample_every={cfg.trainer.sample_every} needs held-out conversations (expected "
                "data.eval_path set to chat data, or trainer.sample_every=0)"]
    return []


def check_architecture(cfg: RunCfg) -> list[str]:
    """Family/feature combinations that cannot work, read from the model's (and teacher's) config.json.

    Only configs found without loading anything (a local directory or ftune/configs/hub) are checked; see
    `config/architecture.py` for the facts and docs/models.md for the list of refusals.
    """
    problems = []
    for key, name in (("model.name_or_path", cfg.model.name_or_path), ("distill.teacher", cfg.distill.teacher)):
        config = read_model_config(name) if name else None
        if config and cfg.model.attn_implementation == "sdpa" and (why := sdpa_problem(config)):
            problems.append(f"model.attn_implementation=sdpa with {key}={name} (expected eager: {why})")
        if config and cfg.data.packing and (why := packing_problem(config)):
            problems.append(f"data.packing=true with {key}={name}: {why}")
    config = read_model_config(cfg.model.name_or_path)
    if config and is_mixture_of_experts(config):
        problems += mixture_of_experts_problems(cfg)
    return problems


def mixture_of_experts_problems(cfg: RunCfg) -> list[str]:
    """What cannot work on a mixture-of-experts model (fused 3-D expert weights, transformers 5)."""
    name, problems = cfg.model.name_or_path, []
    if cfg.method.name == "lora" and cfg.lora.target_modules == ["all-linear"] and cfg.lora.dora:
        problems.append(f"lora.dora=true with the mixture-of-experts model.name_or_path={name} (expected false: "
                        "all-linear adapts the fused expert weights through PEFT's target_parameters, which have "
                        "no DoRA)")
    if cfg.quant.bits:
        problems.append(f"quant.bits={cfg.quant.bits} with the mixture-of-experts model.name_or_path={name} "
                        "(expected 0: bitsandbytes quantizes linear layers only, so the fused experts, most of the "
                        "weights, would stay unquantized and k-bit preparation would upcast them to fp32)")
    return problems


CROSS_FIELD_RULES: list[Callable[[RunCfg], list[str]]] = [
    check_quantization,
    check_optimizer,
    check_probe,
    check_sampling,
    check_lora_targets,
    check_lora_init,
    check_computed_init,
    check_prompt_learning,
    check_freeze,
    check_distillation,
    check_sequence_distillation,
    check_preference,
    check_grpo,
    check_neftune,
    check_ewc,
    check_adalora,
    check_unfreezing,
    check_start_adapter,
    check_added_tokens,
    check_bitsandbytes,
    check_betas,
    check_schedule,
    check_mixed_precision,
    check_early_stop,
    check_data_sources,
    check_streaming,
    check_deepspeed_accumulation,
    check_architecture,
]


def advisories(cfg: RunCfg) -> list[str]:
    """Valid but risky or automatic choices, one line each, printed at the start of a run (never fatal)."""
    notes = []
    if cfg.quant.bits == 4 and cfg.quant.compute_dtype == "fp16":
        notes.append("quant.compute_dtype=fp16: QLoRA's dequantized matmuls can overflow in fp16 (loss spikes to "
                     "inf/NaN); bf16 keeps fp32's range, use it where the GPU has it (Ampere or newer)")
    if cfg.quant.bits == 4 and cfg.quant.type == "fp4":
        notes.append("quant.type=fp4: NF4 matches normally distributed weights and gave better results than FP4 in "
                     "the QLoRA paper (Dettmers et al., 2023); prefer quant.type=nf4")
    if not cfg.data.eval_path and cfg.probe.path and cfg.early_stop.metric.startswith("probe"):
        notes.append(f"data.eval_path is null: the best checkpoint and early stopping follow {cfg.early_stop.metric}")
    if cfg.early_stop.metric == "none":
        notes.append("no evaluation data and no probe: final/ holds the last step's weights")
    if expert_weights_without_dropout(cfg):
        notes.append(f"lora.dropout={cfg.lora.dropout} applies to the attention and dense linear layers of the "
                     f"mixture-of-experts model.name_or_path={cfg.model.name_or_path}, not to its fused expert "
                     "weights: PEFT adapts those through target_parameters, which have no dropout")
    return notes


def expert_weights_without_dropout(cfg: RunCfg) -> bool:
    """Whether LoRA with dropout reaches the fused experts of an MoE model (`all-linear` targets them too)."""
    if cfg.method.name != "lora" or not cfg.lora.dropout or cfg.lora.target_modules != ["all-linear"]:
        return False
    config = read_model_config(cfg.model.name_or_path)
    return bool(config) and is_mixture_of_experts(config)
