"""Fold a PEFT adapter, or a weighted combination of LoRA adapters, into a standalone model.

The base is always reloaded in full precision (`dtype`), never in the 4 bits a QLoRA adapter was trained on:
merging into quantized weights would add the quantization error of the base to every merged weight. Before
anything is written, the merged model's logits are compared with base+adapter on a probe batch, so an export
that silently dropped the adapter (or mangled it) is refused instead of saved.

The output directory is written next to its final place and renamed into it, so a failed merge leaves
nothing behind, and it holds only what transformers (or PEFT, for a combined adapter) needs to load it, plus
`ftune_merge.json` recording where it came from (`ftune eval` reads the base from it).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig

from ftune.atomic import atomic_dir
from ftune.config.commands import MergeCfg
from ftune.config.schema import ModelCfg
from ftune.device import local_device
from ftune.errors import ConfigError, ResourceError
from ftune.kernels import kernels_on
from ftune.model.adapters import can_merge
from ftune.model.instrument import instrument
from ftune.model.load import from_pretrained, load_base_model
from ftune.model.vocab import grow_to_tokenizer

GENERATION_CONFIG = "generation_config.json"

ADAPTER_CONFIG = "adapter_config.json"
MERGE_INFO = "ftune_merge.json"
"""Provenance written into every merge output: base, adapters, weights, combination, dtype, logit check."""
COMBINED = "default"
"""Name of the combined adapter: PEFT saves the adapter called "default" at the top of the directory."""

LOGIT_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
"""Largest |merged - (base+adapter)| logit difference accepted, relative to the largest |logit| of the batch.

Merging adds B@A into W once instead of applying it per token, which only reorders floating-point sums:
fp32 agrees to ~1e-6 of the logit scale, while bf16/fp16 round the merged weight to 8/11 mantissa bits.
"""
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France? Answer: Paris.",
    "def add(a, b):\n    return a + b",
)
"""The probe batch of the logit check: short texts of different kinds, tokenized by the model's tokenizer."""

PEFT_COMBINATION = {"linear": "cat", "ties": "ties", "dare_ties": "dare_ties"}
"""ftune's combination names -> PEFT's `combination_type`.

`linear` is the exact weighted sum of the updates, sum_i w_i * B_i @ A_i, which PEFT computes as "cat" (the
combined rank is the sum of the ranks). PEFT's own "linear" mixes the A and B matrices separately, which adds
cross terms B_i @ A_j: the same adapter combined with itself at weights [0.5, 0.5] doubles its update.
"""
UNCOMBINABLE_VARIANTS = ("use_rslora", "use_dora", "lora_bias")
"""LoRA variants `add_weighted_adapter` combines wrongly without raising (huggingface/peft#3761)."""


@dataclass
class MergeResult:
    """What `merge` wrote and how the logit check went."""

    out: Path
    base: str
    kind: str
    """"model" (merged weights) or "adapter" (a combined adapter, merge=false)."""
    max_abs_diff: float | None
    """Largest |merged - (base+adapter)| logit on the probe batch; None when nothing was merged."""
    tolerance: float | None
    adapter_effect: float
    """Largest |base+adapter - base| logit: how much the adapter changes the model at all."""


def merge(cfg: MergeCfg) -> MergeResult:
    """Merge (or combine) the adapters of `cfg` and write the result atomically to `cfg.out`.

    Args:
        cfg: a `MergeCfg` that passed `merge_problems`.

    Returns:
        Where the result went, which base was used, and the logit check.

    Raises:
        ResourceError: a missing adapter, base or tokenizer.
        ConfigError: an adapter that cannot be merged or combined, a base that does not fit it, an `out` that
            overlaps an input or already holds files, or merged logits that do not match base+adapter.
    """
    dirs, base = check_inputs(cfg)
    out = Path(cfg.out)
    model = load_adapted(base, dirs[0], cfg.dtype)
    if len(dirs) > 1:
        weights = cfg.weights or [1.0 / len(dirs)] * len(dirs)
        combine_adapters(model, dirs, weights, cfg.combination, cfg.density, cfg.seed)
    # saved as it is: load_tokenizer would add a pad token the model never had
    tokenizer = from_pretrained(AutoTokenizer, tokenizer_source(dirs[0], base), "adapter")
    batch = probe_batch(tokenizer)
    effect = adapter_effect(model, batch)
    with atomic_dir(out) as staging:
        if cfg.merge:
            diff, tolerance = merge_checked(model, batch, cfg.dtype, max_shard_size=cfg.max_shard_size, to=staging)
        else:
            diff, tolerance = None, None
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)  # from the adapter's directory: the chat template it was trained with
        carry_generation_config(dirs[0], staging)
        write_merge_info(staging, cfg, base, dirs, diff)
    return MergeResult(out, base, "model" if cfg.merge else "adapter", diff, tolerance, effect)


def carry_generation_config(adapter_dir: str, out: Path) -> None:
    """Keep the adapter's generation settings (an ftune run's stop at its template's end-of-turn token).

    The merged model would otherwise carry the base's, which may stop only at EOS and so run past the turn.
    """
    if (Path(adapter_dir) / GENERATION_CONFIG).is_file():
        GenerationConfig.from_pretrained(adapter_dir).save_pretrained(out)


def check_inputs(cfg: MergeCfg) -> tuple[list[str], str]:
    """Every check that needs no weights, run before any load: the adapters, their base and `out`.

    Returns:
        The adapter directories and the base to load (absolute when local).
    """
    dirs = [cfg.adapter] if cfg.adapter is not None else list(cfg.adapters)
    configs = [read_adapter_config(path, "adapter" if cfg.adapter is not None else "adapters") for path in dirs]
    if len(dirs) > 1:
        check_combinable(configs, dirs, cfg.combination)
    elif not can_merge(configs[0].peft_type.value.lower()):
        raise ConfigError(
            f"adapter={dirs[0]}: a {configs[0].peft_type.value} adapter adds virtual tokens instead of changing "
            "weights, so it cannot be merged", "use the adapter directory itself (e.g. ftune eval model=DIR)")
    recorded = shared_base(configs, dirs) if cfg.base is None or len(dirs) > 1 else None
    base = canonical_base(cfg.base) if cfg.base is not None else recorded
    check_output_dir(Path(cfg.out), [*dirs, base], cfg.overwrite)
    return dirs, base


def read_adapter_config(path: str, key: str):
    """The PEFT config of the adapter directory `path` (named `key=` in messages).

    Raises:
        ResourceError: `path` is missing or has no adapter_config.json.
    """
    from peft import PeftConfig

    directory = Path(path)
    if not directory.is_dir():
        raise ResourceError(f"{key}={path}: no such directory", "expected a PEFT adapter directory, e.g. <run>/final")
    if not (directory / ADAPTER_CONFIG).is_file():
        nested = directory / "final" / ADAPTER_CONFIG
        hint = f"did you mean {directory / 'final'}?" if nested.is_file() else "expected a PEFT adapter directory"
        raise ResourceError(f"{key}={path}: no {ADAPTER_CONFIG} in this directory", hint)
    try:
        return PeftConfig.from_pretrained(str(directory))
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise ResourceError(f"{key}={path}: unreadable {ADAPTER_CONFIG}: {str(err).splitlines()[0]}") from None


def shared_base(configs: list, dirs: list[str]) -> str:
    """The base every adapter records (`base_model_name_or_path`), local paths made absolute.

    Raises:
        ConfigError: an adapter records no base, or two adapters record different ones.
    """
    bases = [canonical_base(config.base_model_name_or_path) for config in configs]
    for path, base in zip(dirs, bases, strict=True):
        if not base and len(dirs) == 1:
            raise ConfigError(f"{path}/{ADAPTER_CONFIG}: no base_model_name_or_path", "pass base=PATH_OR_ID")
        if base != bases[0]:
            raise ConfigError(
                f"adapters: {path} was trained on {base} but {dirs[0]} on {bases[0]}",
                "only adapters of the same base can be combined")
    return bases[0]


def canonical_base(name_or_path: str | None) -> str | None:
    """A local base as an absolute path (so two spellings of one directory compare equal); hub ids as they are."""
    if name_or_path and Path(name_or_path).exists():
        return str(Path(name_or_path).resolve())
    return name_or_path


def check_combinable(configs: list, dirs: list[str], combination: str) -> None:
    """Refuse adapters that `combination` cannot combine faithfully, naming the first offender.

    Raises:
        ConfigError: a non-LoRA adapter, a LoRA variant PEFT combines wrongly, or (for ties/dare_ties, which
            combine the adapters' matrices entry by entry) different ranks or target modules.
    """
    first = configs[0]
    for path, config in zip(dirs, configs, strict=True):
        if config.peft_type.value != "LORA":
            raise ConfigError(f"adapters: {path} is a {config.peft_type.value} adapter (expected LoRA adapters)")
        variants = [name for name in UNCOMBINABLE_VARIANTS if getattr(config, name, False)]
        if variants:
            raise ConfigError(f"adapters: {path} uses {', '.join(variants)}, which PEFT cannot combine correctly "
                              "(huggingface/peft#3761)", "merge such adapters one at a time")
        if combination == "linear":
            continue
        if (config.r, config.rank_pattern) != (first.r, first.rank_pattern):
            raise ConfigError(f"adapters: {path} has rank r={config.r} but {dirs[0]} has r={first.r} "
                              f"(combination={combination} needs equal ranks)", "use combination=linear")
        if target_set(config) != target_set(first):
            raise ConfigError(f"adapters: {path} adapts other modules than {dirs[0]} "
                              f"(combination={combination} needs the same target modules)", "use combination=linear")


def target_set(config) -> frozenset[str] | str:
    """The adapter's target modules in a comparable form (a saved adapter lists them; a regex stays a string)."""
    targets = config.target_modules
    return targets if isinstance(targets, str) else frozenset(targets)


def check_output_dir(out: Path, inputs: list[str], overwrite: bool) -> None:
    """Refuse an `out` that would overwrite an input or existing files; runs before anything is loaded.

    Raises:
        ConfigError: `out` is an input, lies inside one or contains one, is a file, or is a non-empty
            directory without overwrite=true.
    """
    target = out.resolve()
    for source in inputs:
        if not Path(source).exists():
            continue
        source_path = Path(source).resolve()
        if target == source_path or source_path in target.parents or target in source_path.parents:
            raise ConfigError(f"out={out}: overlaps the input {source}", "write the merged model to another directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out}: is a file", "expected a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={out}: already exists and is not empty", "pass overwrite=true to replace it")


def load_adapted(base: str, adapter_dir: str, dtype: str):
    """The base in full precision with the adapter of `adapter_dir` attached (a PeftModel), computing as it trained.

    Instrumented as `ftune train` instruments a model on this machine (`trainer.cpu_kernels=auto`): on a CPU,
    under bf16 autocast, PEFT's own layer rounds base and adapter outputs separately before adding them where the
    fused layer adds first, which moved the tiny model's held-out loss by 1e-3, so `ftune eval run=` would not
    reproduce the run's evaluation.

    Raises:
        ResourceError: the base is missing or cannot be loaded.
        ConfigError: the base is a quantized checkpoint, or does not fit the adapter (shapes, module names).
    """
    from peft import PeftModel

    config = read_adapter_config(adapter_dir, "adapter")
    base_model = fit_to_adapter(load_full_precision(base, dtype, instrumented=False), adapter_dir, base)
    try:
        model = PeftModel.from_pretrained(base_model, adapter_dir, adapter_name="ftune_0", config=config)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"base={base} does not fit adapter={adapter_dir}: {mismatch_detail(err)}",
                          "pass the base the adapter was trained on with base=PATH_OR_ID") from None
    instrument(model, kernels=kernels_on("auto", local_device()))
    return model


def fit_to_adapter(base_model, adapter_dir: str, base: str):
    """`base_model` with a row for every token of the adapter's tokenizer, ready for the adapter to load onto.

    A run that added tokens (`model.add_tokens`) saves a tokenizer longer than the base's embedding and the
    trained rows of its new tokens; PEFT loads them only onto a base grown to that length (as
    `AutoPeftModelForCausalLM` grows it). A base already long enough is left as it is, and so is a base whose
    adapter ships no tokenizer: it has no token its base lacks.
    """
    if tokenizer_source(adapter_dir, base) == adapter_dir:
        grow_to_tokenizer(base_model, from_pretrained(AutoTokenizer, adapter_dir, "adapter"))
    return base_model


def load_full_precision(base: str, dtype: str, instrumented: bool = True):
    """The base model in `dtype` (`instrumented` as `load_base_model`), refusing quantized checkpoints.

    Raises:
        ResourceError: a local base that does not exist, or a base transformers cannot load.
        ConfigError: the checkpoint's config.json carries a quantization_config.
    """
    from transformers import AutoConfig

    if looks_local(base) and not Path(base).is_dir():
        raise ResourceError(f"base={base}: no such directory", "pass base=PATH_OR_ID of the adapter's base model")
    if getattr(from_pretrained(AutoConfig, base, "base"), "quantization_config", None) is not None:
        raise ConfigError(f"base={base}: is a quantized checkpoint; merging into quantized weights adds their "
                          "quantization error to every merged weight", "pass the full-precision base with base=")
    return load_base_model(ModelCfg(name_or_path=base, dtype=dtype), "base", instrumented)


def looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id (`org/name`): absolute, relative to `.`/`~`, or with more than one `/`."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or Path(name_or_path).exists()


def mismatch_detail(err: Exception) -> str:
    """The first line of PEFT's complaint that names a parameter or module (its reports run to many lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "size mismatch" in line or "not found" in line]
    return (named or lines or [type(err).__name__])[0]


def combine_adapters(model, dirs: list[str], weights: list[float], combination: str, density: float,
                     seed: int) -> None:
    """Load every adapter of `dirs` into `model` and combine them into the one active adapter, `COMBINED`.

    The first adapter is already attached as "ftune_0". The sources are deleted afterwards, so saving or
    merging the model sees only the combination.
    """
    names = [f"ftune_{index}" for index in range(len(dirs))]
    for name, path in zip(names[1:], dirs[1:], strict=True):
        try:
            model.load_adapter(path, adapter_name=name)
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"adapters: {path} does not fit the base of {dirs[0]}: {mismatch_detail(err)}",
                              "combine adapters trained on the same base") from None
    torch.manual_seed(seed)  # dare_ties drops entries at random
    model.add_weighted_adapter(names, weights, COMBINED, combination_type=PEFT_COMBINATION[combination],
                               density=density if combination != "linear" else None)
    model.set_adapter(COMBINED)
    for name in names:
        model.delete_adapter(name)


def tokenizer_source(adapter_dir: str, base: str) -> str:
    """The adapter's own tokenizer when it ships one (ftune's final/ does, with the chat template), else the base's."""
    return adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base


def probe_batch(tokenizer) -> list[torch.Tensor]:
    """`PROBE_TEXTS` as token ids, one unpadded sequence each (so the tokenizer needs no pad token)."""
    return [torch.tensor([tokenizer.encode(text)]) for text in PROBE_TEXTS]


@torch.no_grad()
def probe_logits(model, batch: list[torch.Tensor]) -> torch.Tensor:
    """fp32 logits of every position of the probe sequences, concatenated."""
    return torch.cat([model(input_ids=ids.to(model.device)).logits[0].float() for ids in batch])


def adapter_effect(model, batch: list[torch.Tensor]) -> float:
    """Largest |base+adapter - base| logit: ~0 for an untrained adapter, whose merge would change nothing."""
    with model.disable_adapter():
        base = probe_logits(model, batch)
    return (probe_logits(model, batch) - base).abs().max().item()


def merge_checked(model, batch: list[torch.Tensor], dtype: str, max_shard_size: str, to: Path) -> tuple[float, float]:
    """Fold the active adapter into the weights, check the logits against base+adapter, then save to `to`.

    Returns:
        The largest absolute logit difference and the tolerance it was held to.

    Raises:
        ConfigError: the difference exceeds `LOGIT_TOLERANCE[dtype]` of the logit scale (nothing is saved).
    """
    reference = probe_logits(model, batch)
    merged = model.merge_and_unload()
    diff, tolerance = logit_difference(probe_logits(merged, batch), reference, dtype)
    if not diff <= tolerance:  # also catches NaN
        raise ConfigError(f"merge check failed: merged logits differ from base+adapter by {diff:.3g} "
                          f"(tolerance {tolerance:.3g} for dtype={dtype}); nothing was written",
                          "try dtype=fp32, or report the adapter")
    merged.save_pretrained(to, max_shard_size=max_shard_size)
    return diff, tolerance


def logit_difference(logits: torch.Tensor, reference: torch.Tensor, dtype: str) -> tuple[float, float]:
    """Largest |logits - reference| and the tolerance it is held to: `LOGIT_TOLERANCE[dtype]` of the logit scale.

    Shared by the merge check and every export's read-back check, so both accept the same rounding.
    """
    diff = (logits - reference).abs().max().item()
    return diff, LOGIT_TOLERANCE[dtype] * max(1.0, reference.abs().max().item())


def write_merge_info(directory: Path, cfg: MergeCfg, base: str, dirs: list[str], diff: float | None) -> None:
    """`ftune_merge.json`: what was merged, how, and how closely the result matched base+adapter."""
    info = {
        "base": base,
        "adapters": [str(Path(path).resolve()) for path in dirs],
        "weights": list(cfg.weights) if len(dirs) > 1 else None,
        "combination": cfg.combination if len(dirs) > 1 else None,
        "density": cfg.density if len(dirs) > 1 and cfg.combination != "linear" else None,
        "merged": cfg.merge,
        "dtype": cfg.dtype,
        "max_abs_logit_diff": diff,
    }
    (directory / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
